"""The document cache: which documents' distributed KV the hosts keep, least recently used first out.

A question about a kept document costs only its query phase and decode, where the layout is exact (the prefill
does not read the question). Where it reads the question (APB compressing), a document is kept and served only
for requests that opt in to reuse (`"apb": {"reuse": true}`): the kept prefill was made for the question of the
request that ran it (`Entry.question`), and a hit answers another question over it (`CachePlan.made_for`).
The key is the hash of the tokenized context (chat template, system prompt and document) plus the layout.
Every kept document's KV is parked on the hosts under its key (HostEngine.park); `limit_bytes` bounds their
sum over all hosts: a new document evicts the least recently used ones until it fits, and one larger than the
limit is not kept (nothing is evicted for it).

This object alone decides: each job carries its plan (resume this key, park under it, drop those), so the
launcher and the workers never disagree; a worker restart loses every parked KV, and `forget` says so here.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

from apb_core.algorithm.flops import ModelDims
from apb_core.algorithm.methods import MethodConfig
from apb_core.runtime.prompt import encode_document

DOCUMENT_TOKENS_KEPT = 16  # documents whose token ids DocumentTokens keeps


class DocumentTokens:
    """The token ids of the most recent documents, by their text's hash: a question about a document the server
    has seen does not tokenize it again (at 16K tokens that was ~60 ms of a cached document's ~120 ms to the
    first token on one H200, docs/benchmarks.md). Least recently used out beyond `size` documents; the lists
    are shared, never modified (build_prompt copies what it cuts)."""

    def __init__(self, size: int = DOCUMENT_TOKENS_KEPT) -> None:
        self.size = size
        self.ids: OrderedDict[bytes, list[int]] = OrderedDict()

    def get(self, tokenizer, document: str) -> list[int]:
        key = hashlib.sha256(document.encode("utf-8", "surrogatepass")).digest()
        ids = self.ids.get(key)
        if ids is None:
            ids = self.ids[key] = encode_document(tokenizer, document)
            while len(self.ids) > self.size:
                self.ids.popitem(last=False)
        else:
            self.ids.move_to_end(key)
        return ids


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
class Entry:
    """A kept document: its KV's bytes over all hosts, and the query + answer tokens the last host has room
    for past the document (a question needing more is prefilled again). `question`: the question its prefill
    read (None where the layout reads none)."""

    nbytes: int
    room: int
    question: str | None = None


@dataclass
class CachePlan:
    """What one request does with the cache: `hit`: resume `key`'s parked KV (query phase and decode only);
    `keep`: park the new prefill's KV under `key` (an `entry`); `drop`: parked KV to free first (evicted).
    `made_for`: on a hit, the question the kept prefill read (Entry.question)."""

    key: str
    hit: bool = False
    keep: bool = False
    drop: tuple[str, ...] = ()
    entry: Entry | None = None
    made_for: str | None = None


@dataclass
class DocumentCache:
    limit_bytes: int
    entries: OrderedDict[str, Entry] = field(default_factory=OrderedDict)  # least recently used first
    hits: int = 0
    misses: int = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def plan(self, key: str, need: int, entry: Entry | None) -> CachePlan:
        """The plan for a question needing `need` tokens of room (query, answer, end) about the document `key`.
        `entry`: what keeping a new prefill would cost (None: this request may not be kept: its layout reads
        the question, or it asked for no cache). A kept document is a hit while its room suffices; else its
        old KV is dropped and the new prefill takes its place. Evictions are final here as soon as planned
        (the job drops them before anything else)."""
        old = self.entries.get(key)
        if old is not None and entry is not None and old.room >= need:
            self.entries.move_to_end(key)
            return CachePlan(key, hit=True, made_for=old.question)
        drop = [key] if old is not None and entry is not None else []
        if entry is None or entry.nbytes > self.limit_bytes:
            return self._evict(CachePlan(key, drop=tuple(drop)))
        self.entries.pop(key, None)
        while self.entries and self.nbytes + entry.nbytes > self.limit_bytes:
            drop.append(self.entries.popitem(last=False)[0])
        return CachePlan(key, keep=True, drop=tuple(drop), entry=entry)

    def _evict(self, plan: CachePlan) -> CachePlan:
        for key in plan.drop:
            self.entries.pop(key, None)
        return plan

    def done(self, plan: CachePlan) -> None:
        """The job of `plan` finished: count the hit or miss, and record the kept document (most recent)."""
        if plan.hit:
            self.hits += 1
            return
        self.misses += 1
        if plan.keep and plan.entry is not None:
            self.entries[plan.key] = plan.entry

    def cancelled(self, plan: CachePlan) -> None:
        """The job of `plan` was cancelled in its decode: counted neither as a hit nor as a miss, but the hosts
        parked the document's KV all the same (a hit parks it back; a kept prefill had finished: the cancel flag
        is read only after it), so a kept document is recorded, as the hosts hold it. (A prefill cancelled in
        this process raises before anything is parked, and never reaches here: nothing is recorded.)"""
        if plan.keep and plan.entry is not None:
            self.entries[plan.key] = plan.entry

    def forget(self) -> None:
        """The hosts hold no parked KV any more (the workers restarted)."""
        self.entries.clear()

    def stats(self) -> dict[str, int]:
        """/health's `cache` object."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.entries), "bytes": self.nbytes,
                "limit_bytes": self.limit_bytes}
