"""`apb ask --server URL`: the same request sent to a running `apb serve`, streamed back as the Events and
AskResults a local run produces (so the CLI renders stdout, stderr and --json the same way).

Each question is one streamed chat request (document as the system message, the question as the user's);
over an exact layout the server's document cache serves the later questions without a prefill. `--cite` asks
for citations (`apb.cite`, and `apb.paged` for a PDF's pages); they come back in the result like a local run's.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from apb_core.api import AskRequest, AskResult, Citation, Event, HostStats
from apb_core.errors import ApbError, InputError, WorkerError


def remote_ask(request: AskRequest, url: str, on_event: Callable[[Event], None] | None = None,
               api_key: str | None = None, timeout_s: float = 3600.0) -> list[AskResult]:
    """Answer every question of `request` on the server at `url` (http://host:port, with or without /v1)."""
    import httpx

    emit = on_event or (lambda e: None)
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []
    with httpx.Client(base_url=base, headers=headers, timeout=timeout_s) as client:
        for index, question in enumerate(request.questions):
            emit(Event("phase", phase="prefill", question=index))
            try:
                results.append(_ask_one(client, request, question, index, emit))
            except httpx.TransportError as exc:
                raise ApbError(f"cannot reach the apb server at {base}: {exc}") from None
    return results


def _body(request: AskRequest, question: str) -> dict:
    apb = {"method": request.method, "anchor_len": request.anchor_len, "passing_len": request.passing_len,
           "truncate": request.truncate, "system": request.system, "cite": request.cite or None,
           "paged": request.paged or None}
    return {"messages": [{"role": "system", "content": request.document}, {"role": "user", "content": question}],
            "stream": True, "max_tokens": request.max_new_tokens, "temperature": request.temperature,
            "top_p": request.top_p, "seed": request.seed, "stop": list(request.stop) or None,
            "apb": {k: v for k, v in apb.items() if v is not None}}


def _ask_one(client, request: AskRequest, question: str, index: int, emit: Callable[[Event], None]) -> AskResult:
    with client.stream("POST", "/v1/chat/completions", json=_body(request, question)) as response:
        if response.status_code != 200:
            raise _error(response.status_code, response.read())
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise WorkerError(chunk["error"].get("message", "the server failed"))
            text = chunk["choices"][0]["delta"].get("content")
            if text:
                emit(Event("token", text=text, question=index))
            if "apb" in chunk:
                return _result(chunk["apb"]["result"])
    raise WorkerError("the server's stream ended without a result")


def _error(status: int, body: bytes) -> ApbError:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace")[:200]
    if status in (400, 401, 404, 422):
        return InputError(f"the server refused the request ({status}): {message}")
    if status == 503:
        return WorkerError(f"the server is unavailable (503): {message}")
    return ApbError(f"the server failed ({status}): {message}")


def _result(data: dict) -> AskResult:
    data = dict(data)
    data["host_stats"] = [HostStats(**h) for h in data.get("host_stats") or []]
    if data.get("citations") is not None:
        data["citations"] = [Citation(**c) for c in data["citations"]]
    known = AskResult.__dataclass_fields__
    return AskResult(**{k: v for k, v in data.items() if k in known})
