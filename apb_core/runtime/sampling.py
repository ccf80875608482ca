"""Choosing the next token and deciding when to stop (greedy, temperature, top-p, EOS, stop strings)."""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """logits [V] -> token id. temperature 0 is greedy; otherwise softmax(logits/T) cut to the top-p nucleus."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        cut = (cum - sorted_p) >= top_p  # drop tokens once the mass before them reaches top_p
        sorted_p[cut] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class StopText:
    """Incremental answer text that honours stop strings and never streams a partial stop string."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, full_text: str) -> str:
        """Give the whole decoded answer so far; returns the new text that is safe to show."""
        cut = len(full_text)
        for stop in self.stops:
            at = full_text.find(stop)
            if at != -1 and at < cut:
                cut, self.stopped = at, True
        self.text = full_text[:cut]
        safe = len(self.text)
        if not self.stopped:  # hold back a tail that could still become a stop string
            for stop in self.stops:
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(stop[:k]):
                        safe = min(safe, len(self.text) - k)
                        break
        delta = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return delta

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta
