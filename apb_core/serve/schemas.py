"""Typed request models of the OpenAI-compatible API, and how a chat becomes (document, question).

Unknown OpenAI fields (n, user, logprobs, ...) are ignored; `apb` is our extension."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ApbOptions(BaseModel):
    """apb's own settings for one request (`"apb": {...}` in the body); None: the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["apb", "star", "full"] | None = None
    anchor_len: int | None = Field(default=None, ge=0)
    passing_len: int | Literal["all"] | None = None
    truncate: Literal["none", "middle", "end"] | None = None
    system: str | None = None  # the chat template's system prompt (system messages are document text)
    cache: bool = True  # false: do not use the document cache for this request
    # true: where the layout reads the question (APB compressing), answer over a kept prefill made for an earlier
    # question about the document (no prefill; not the answer a new prefill gives: docs/quality.md measures it),
    # and keep this request's own prefill for later ones
    reuse: bool = False
    cite: bool = False  # true: the passages the answer attended to most (`apb ask --cite`), in the response
    paged: bool = False  # the document is a PDF's text (`--- page N ---` lines): citations name pages


class ChatCompletionRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # None: 0, greedy (apb's default)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    apb: ApbOptions | None = None

    def document_and_question(self) -> tuple[str, str]:
        """The document is the text of the system and user messages before the last user message (joined by
        blank lines); the last message must be the user's question."""
        last = self.messages[-1]
        if last.role != "user":
            raise ValueError("the last message must have role 'user': it is the question")
        earlier = [m.text for m in self.messages[:-1] if m.role != "assistant" and m.text.strip()]
        return "\n\n".join(earlier), last.text

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
