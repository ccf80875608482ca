"""The document cache: which document's distributed KV the hosts hold now, and whether it may be kept.

One entry (the last document): a question about it costs only its query phase and decode, where the layout is
exact (the prefill does not read the question). The key is the hash of the tokenized context (chat template,
system prompt and document) plus the layout; `limit_bytes` bounds what is kept (a larger KV is not kept).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from apb_core.algorithm.flops import ModelDims
from apb_core.algorithm.methods import MethodConfig


def cache_key(context_ids: list[int], method: MethodConfig, hosts: int) -> str:
    """What makes two prefills' KV the same: the context tokens and the layout over `hosts`."""
    h = hashlib.sha256()
    h.update(",".join(map(str, context_ids)).encode())
    h.update(repr((hosts, method.name, method.anchor_len, method.passing_len, method.block_lens,
                   method.compressor)).encode())
    return h.hexdigest()


def kv_bytes(dims: ModelDims, tokens: int, itemsize: int) -> int:
    """Bytes of K and V for `tokens` tokens over every layer (summed over the hosts that hold them)."""
    return 2 * dims.layers * dims.kv_heads * dims.head_dim * itemsize * tokens


@dataclass
class DocumentCache:
    limit_bytes: int
    key: str | None = None
    nbytes: int = 0
    hits: int = 0
    misses: int = 0

    def holds(self, key: str) -> bool:
        return self.key is not None and self.key == key

    def keep(self, key: str, nbytes: int) -> bool:
        """Record that the hosts hold `key`'s KV now; False (and nothing kept) when it exceeds the limit."""
        if nbytes > self.limit_bytes:
            self.forget()
            return False
        self.key, self.nbytes = key, nbytes
        return True

    def forget(self) -> None:
        """The hosts' KV is no longer a whole document's (a new prefill started, or the workers restarted)."""
        self.key, self.nbytes = None, 0
