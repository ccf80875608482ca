"""The server's side of the workers: one Session, driven by one thread, one request at a time.

Requests wait in a bounded queue (`Busy` when full). Streamed tokens and the final result reach the request's
`Ticket` on the event loop. A request whose client went away is cancelled: its ticket sets the runner's cancel
flag (a multiprocessing.Event every worker holds; cleared before each job), and the last host, which samples
and broadcasts every token, broadcasts "cancelled" instead at its next token, so every host stops at the same
step (runtime.generate.decode). A prefill is not interrupted over worker processes (seconds at most: the flag
is read at the first token after it); a host in this process (one host) also stops at its next prefill layer.
A WorkerError fails that request (503) and restarts the workers before the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from apb_core.algorithm.methods import MethodConfig, resolve_method
from apb_core.api import AskRequest, AskResult, Event
from apb_core.ask import Session
from apb_core.dist.launcher import InlineHost
from apb_core.errors import ApbError, InputError, WorkerError
from apb_core.runtime.generate import AskJob
from apb_core.runtime.prompt import Prompt, build_prompts
from apb_core.runtime.reuse import ServeJob, needed_tokens, room_tokens
from apb_core.serve.cache import CachePlan, DocumentCache, DocumentTokens, Entry, cache_key, kv_bytes

# the warm-up's prompt: a line of ~17 tokens, 8 times on CPU (~150 tokens); on a GPU 16 lines per host, so
# that every host's block has more rows than CUDA_FEW_ROWS and the prefill's attention loads the library that
# serves long blocks (cuDNN), as a real document's does
WARM_UP_LINE = "The server warms up before its first request: one short prefill and two decode steps.\n"
WARM_UP_QUESTION = "What does the server do before its first request?"


class Busy(ApbError):
    """The request queue is full (503)."""


class Stopping(ApbError):
    """The server is stopping (SIGTERM, Ctrl-C): the request is not answered (503)."""


class Cancelled(Exception):
    """The request's client went away (or the server is stopping): its generation ends here."""


@dataclass
class Ticket:
    """One request's channel: ("token", text) items, then ("done", ServeResult) or ("error", exception)."""

    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    flag: Any = None  # the runner's cancel flag while this ticket's job runs (arm .. disarm), else None
    # reentrant: SIGTERM's handler (stop_accepting) may cancel on the event loop's thread while it holds the lock
    lock: threading.RLock = field(default_factory=threading.RLock)

    def cancel(self) -> None:
        """The client went away (or the server stops): mark the ticket, and end its job on the hosts if it runs.
        Under the lock, so that a cancel racing the job's start is seen (arm) and one arriving after its end
        cannot set the flag of the next job (disarm)."""
        with self.lock:
            self.cancelled.set()
            if self.flag is not None:
                self.flag.set()

    def arm(self, flag: Any) -> bool:
        """The job starts with the runner's (cleared) cancel flag; False when the client left already."""
        with self.lock:
            self.flag = flag
            return not self.cancelled.is_set()

    def disarm(self) -> None:
        """The job ended: later cancels touch the ticket only."""
        with self.lock:
            self.flag = None

    def put(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: the server is stopping
            pass


@dataclass
class ServeResult:
    """One answer; `reused_for`: the question of the kept APB prefill it was answered over, when that was not
    this question (`"apb": {"reuse": true}`: not the answer a new prefill gives)."""

    result: AskResult
    cache_hit: bool
    reused_for: str | None = None


class ServeEngine:
    """`base` gives the model, hosts, device and default settings; `open()` loads (blocking) and starts the thread."""

    def __init__(self, base: AskRequest, cache_bytes: int, max_queue: int = 16) -> None:
        self.base, self.max_queue = base, max_queue
        self.warm_up_s: float | None = None  # seconds the warm-up took (None: none ran)
        self.cache = DocumentCache(cache_bytes)
        self.tokens = DocumentTokens()  # the same tokenizer across worker restarts: kept
        self.session: Session | None = None
        self.state = "loading"  # loading | ready | restarting | failed | stopping | stopped
        self.current: Ticket | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.pending = 0
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.restarts = 0
        self.name = str(base.model)  # the model's name once loaded (kept while the workers restart)

    @property
    def model_name(self) -> str:
        return self.name

    def open(self) -> ServeEngine:
        self._load()
        try:
            self.warm_up_s = self._warm_up()
        except BaseException:  # the workers end with the error (nothing else would end them)
            self.close()
            raise
        self.thread = threading.Thread(target=self._loop, name="apb-serve", daemon=True)
        self.thread.start()
        return self

    def _warm_up(self) -> float | None:
        """One short question through the whole path (tokenize, prefill, query phase, two decode steps, no cache)
        before the server says it is ready. Why: the first request otherwise pays the device's one-time costs
        (kernel and library loading, the first collectives): on one H200 with the embedded model it took 1.65 s
        to its first token against ~0.5 s for the next ones, and still 1.85 s after a warm-up too short to reach
        cuDNN (docs/benchmarks.md). Returns its seconds, or None when this model or placement cannot take the
        short prompt (the first request then pays)."""
        t0 = time.perf_counter()
        req = dataclasses.replace(self.base, max_new_tokens=2, cite=False)
        lines = 8 if self.base.device == "cpu" else 16 * self.session.hosts
        try:
            self._answer(req, WARM_UP_LINE * lines, WARM_UP_QUESTION, use_cache=False, warm_up=True)
        except InputError:
            return None
        return time.perf_counter() - t0

    def _load(self, start_method: str | None = None) -> None:
        session = Session(self.base, self._on_event, start_method)
        session.__enter__()
        self.session, self.state, self.name = session, "ready", session.source.name

    def submit(self, ticket: Ticket, settings: AskRequest, document: str, question: str, use_cache: bool,
               reuse: bool = False) -> None:
        """Queue one question; Busy when `max_queue` requests wait already. `reuse`: see `_plan`."""
        with self.lock:
            if self.pending >= self.max_queue:
                raise Busy(f"the server is busy: {self.pending} requests are waiting (--max-queue)")
            self.pending += 1
        self.jobs.put((ticket, settings, document, question, use_cache, reuse))

    def stop_accepting(self) -> None:
        """The server got SIGTERM or Ctrl-C: what waits gets 503 and what runs ends now, so that in-flight
        requests answer within uvicorn's grace period (one host: cancelled at the next layer or token; worker
        processes: ended, and not restarted)."""
        self.state = "stopping"
        if self.current is not None:
            self.current.cancel()
        runner = self.session.runner if self.session is not None else None
        for p in getattr(runner, "procs", []):
            if p.exitcode is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def close(self, wait_s: float = 4.0) -> None:
        """Cancel what runs, stop the thread and end the workers."""
        self.state = "stopped"
        if self.current is not None:
            self.current.cancel()
        self.jobs.put(None)
        if self.thread is not None:
            self.thread.join(timeout=wait_s)
        busy = self.thread is not None and self.thread.is_alive()
        if self.session is not None:
            # idle workers are told to stop; busy ones are ended at once (SIGTERM, then SIGKILL)
            self.session.__exit__(*((SystemExit, SystemExit(), None) if busy else (None, None, None)))
            self.session = None

    def _on_event(self, event: Event) -> None:
        ticket = self.current
        if ticket is None:
            return
        if ticket.cancelled.is_set() and event.phase == "prefill" and isinstance(self.session.runner, InlineHost):
            raise Cancelled()  # in this process: unwinds the prefill (no collectives); a decode ends by the flag
        if event.kind == "token" and event.text:
            ticket.put(("token", event.text))

    def _loop(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            ticket, settings, document, question, use_cache, reuse = item
            with self.lock:
                self.pending -= 1
            if self.state in ("stopping", "stopped"):
                ticket.put(("error", Stopping("the server is stopping")))
                continue
            if ticket.cancelled.is_set():
                continue
            if self.state != "ready":
                try:
                    self._restart()
                except BaseException as exc:  # noqa: BLE001 - reported to the request, retried on the next one
                    self.state = "failed"
                    ticket.put(("error", WorkerError(f"the workers could not be restarted: {exc}")))
                    continue
            self.current = ticket
            try:
                self._arm(ticket)
                ticket.put(("done", self._answer(settings, document, question, use_cache, reuse)))
            except (WorkerError, Cancelled) as exc:
                if self.state in ("stopping", "stopped"):
                    ticket.put(("error", Stopping("the server is stopping")))
                elif isinstance(exc, WorkerError):
                    self.state = "restarting"
                    ticket.put(("error", exc))
                else:
                    ticket.put(("error", exc))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to its request
                ticket.put(("error", exc))
            finally:
                ticket.disarm()
                self.current = None
            if self.state == "restarting":
                try:
                    self._restart()
                except BaseException:  # noqa: BLE001 - retried before the next request
                    self.state = "failed"

    def _arm(self, ticket: Ticket) -> None:
        """Before the ticket's job: clear the runner's cancel flag (an earlier ticket's cancel may have set it as
        its job ended) and hand it to the ticket; Cancelled when the client left already."""
        flag = self.session.runner.cancel
        flag.clear()
        if not ticket.arm(flag):
            raise Cancelled()

    def _restart(self) -> None:
        """End the old workers and start new ones (the document cache is gone with them)."""
        self.state = "restarting"
        self.cache.forget()
        self.restarts += 1
        if self.session is not None:
            old, self.session = self.session, None
            try:
                old.__exit__(WorkerError, WorkerError("restart"), None)
            except Exception:  # noqa: BLE001 - the old workers are being replaced anyway
                pass
        # forkserver: since the first start this process has tokenized and run torch compute (--cite), after
        # which a forked worker can hang (apb_core.dist.launcher.default_start_method); the first start forks
        self._load("forkserver")

    def _answer(self, req: AskRequest, document: str, question: str, use_cache: bool,
                reuse: bool = False, warm_up: bool = False) -> ServeResult:
        """Tokenize, pick the layout, run the question over a kept document's KV or a new prefill; the cache
        keeps this document when its layout does not read the question (or the request opts in to reuse) and
        its KV fits the limit."""
        s = self.session
        t0 = time.perf_counter()
        if not question.strip():
            raise InputError("the question (the last user message) is empty")
        prompt = build_prompts(s.tokenizer, document, [question], s.window, req.max_new_tokens, req.truncate,
                               None, req.system,
                               None if warm_up else self.tokens.get(s.tokenizer, document))[0]
        method = resolve_method(req.method, prompt.context_len, s.hosts, req.anchor_len, req.passing_len,
                                req.compressor, req.question_in_anchor, req.seed, s.dims, req.auto_exact,
                                req.layout, device=self.base.device)
        tokenize_s = time.perf_counter() - t0
        plan = self._plan(prompt, method, req.max_new_tokens, use_cache, reuse, question)
        job = ServeJob(AskJob(prompt, method, req.max_new_tokens, req.temperature, req.top_p, req.seed,
                              list(req.stop), s.eos, cite=req.cite), plan.key, plan.hit, plan.keep, plan.drop)
        per_host = s.runner.run(job)
        lead = per_host[0][0]
        if lead.finish_reason == "cancelled":  # every host stopped at the same token (runtime.generate.decode)
            self.cache.cancelled(plan)
            raise Cancelled()
        if not warm_up:
            self.cache.done(plan)
        timings = {"convert_s": 0.0, "load_s": 0.0, "tokenize_s": tokenize_s, "prefill_s": lead.prefill_s,
                   "query_s": lead.query_s, "decode_s": lead.decode_s,
                   "total_s": time.perf_counter() - t0}
        result = s._result(req, question, prompt, method, timings, [h[0] for h in per_host], False, document)
        s.prefills += 0 if plan.hit or warm_up else 1
        reused_for = plan.made_for if plan.hit and plan.made_for not in (None, question) else None
        return ServeResult(result, plan.hit, reused_for)

    def _plan(self, prompt: Prompt, method: MethodConfig, max_new_tokens: int, use_cache: bool,
              reuse: bool = False, question: str = "") -> CachePlan:
        """The cache's plan for this prompt: keepable when the request allows the cache and the layout does
        not read the question (its KV then serves any question exactly) or the request opts in to `reuse`
        (APB compressing: the KV, kept with the `question` it read, serves later reuse requests, approximately;
        requests without reuse neither use nor replace it); its cost is the KV of the document plus the last
        host's room (room_tokens), in the workers' dtype."""
        s = self.session
        key = cache_key(prompt.context_ids, method, s.hosts)
        query_len = len(prompt.query_ids)
        entry = None
        if use_cache and (reuse or not method.reads_question):
            room = room_tokens(query_len, max_new_tokens)
            entry = Entry(kv_bytes(s.dims, prompt.context_len + room, self._itemsize()), room,
                          question if method.reads_question else None)
        return self.cache.plan(key, needed_tokens(query_len, max_new_tokens), entry)

    def _itemsize(self) -> int:
        from apb_core.models import resolve_dtype

        return resolve_dtype(self.base.device, self.base.dtype).itemsize

    def settings(self, **changes) -> AskRequest:
        """The server's request with one request's changes (None values keep the server's)."""
        return dataclasses.replace(self.base, **{k: v for k, v in changes.items() if v is not None})
