"""The routes: `POST /v1/chat/completions` (plain and SSE-streamed), `GET /v1/models`, `GET /health`.

Errors are OpenAI-style objects ({"error": {"message", "type", "param", "code"}}): bad JSON or fields and bad
input (a prompt over the window, ...) 400, a wrong or missing bearer token 401, a full queue or a failed worker
503 (the workers restart behind it). A streamed request waits for its first token before it answers 200, so
those errors keep their status; a client that disconnects cancels its generation (on every host: ServeEngine).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from apb_core.errors import InputError, WorkerError
from apb_core.serve.engine import Busy, Cancelled, ServeEngine, ServeResult, Stopping, Ticket
from apb_core.serve.schemas import ChatCompletionRequest

DISCONNECT_POLL_S = 0.25


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def api_error(exc: BaseException) -> ApiError:
    """An engine failure as the HTTP error the client sees."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, InputError):
        return ApiError(400, str(exc))
    if isinstance(exc, Busy):
        return ApiError(503, str(exc), "server_busy", "queue_full")
    if isinstance(exc, Stopping):
        return ApiError(503, str(exc), "server_error", "stopping")
    if isinstance(exc, WorkerError):
        return ApiError(503, f"{exc} (the workers are restarting; retry)", "server_error", "worker_failed")
    return ApiError(500, f"unexpected {type(exc).__name__}: {exc}", "server_error")


def create_app(engine: ServeEngine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="apb", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return error_response(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(Cancelled)
    async def _gone(request: Request, exc: Cancelled):  # nobody reads this: the client closed the connection
        return error_response(499, "the client closed the request")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)", code="invalid_api_key")

    @app.get("/health")
    async def health():
        body = {"status": engine.state, "model": engine.model_name, "waiting": engine.pending,
                "restarts": engine.restarts, "warm_up_s": engine.warm_up_s, "cache": engine.cache.stats()}
        return JSONResponse(body, status_code=200 if engine.state == "ready" else 503)

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models():
        return {"object": "list", "data": [{"id": engine.model_name, "object": "model", "created": 0,
                                            "owned_by": "apb"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatCompletionRequest, request: Request):
        try:
            document, question = body.document_and_question()
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        opts = body.apb
        settings = engine.settings(
            max_new_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
            top_p=body.top_p, seed=body.seed, stop=body.stop_list or None, cite=bool(opts and opts.cite),
            paged=bool(opts and opts.paged), method=opts and opts.method, anchor_len=opts and opts.anchor_len,
            passing_len=opts and opts.passing_len, truncate=opts and opts.truncate, system=opts and opts.system,
        )
        if body.temperature is None:
            settings = dataclasses.replace(settings, temperature=0.0)
        ticket = Ticket(asyncio.get_running_loop())
        try:
            engine.submit(ticket, settings, document, question, use_cache=opts.cache if opts else True,
                          reuse=bool(opts and opts.reuse))
        except Busy as exc:
            raise api_error(exc) from None
        completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        first = await _next(ticket, request)
        if first[0] == "error":
            raise api_error(first[1])
        if body.stream:
            return StreamingResponse(_sse(first, ticket, completion_id, engine.model_name),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        item = first
        while item[0] == "token":
            item = await _next(ticket, request)
        if item[0] == "error":
            raise api_error(item[1])
        return _completion(item[1], completion_id)

    return app


async def _next(ticket: Ticket, request: Request) -> tuple:
    """The ticket's next item; cancels the generation (and raises Cancelled) when the client went away."""
    while True:
        try:
            return await asyncio.wait_for(ticket.items.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ticket.cancel()
                raise Cancelled() from None


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _extension(done: ServeResult) -> dict:
    """The response's `apb` object: cache_hit, reused_prefill (true: answered over a kept APB prefill made for
    another question, `prefill_question`, which a new prefill would not give), result (the --json fields of
    `apb ask`) and, when the request asked for them, citations (as `apb ask --cite --json` prints them)."""
    extension = {"cache_hit": done.cache_hit, "reused_prefill": done.reused_for is not None,
                 "result": dataclasses.asdict(done.result)}
    if done.reused_for is not None:
        extension["prefill_question"] = done.reused_for
    if done.result.citations is not None:
        extension["citations"] = [c.as_json() for c in done.result.citations]
    return extension


def _usage(done: ServeResult) -> dict:
    r = done.result
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.generated_tokens,
            "total_tokens": r.prompt_tokens + r.generated_tokens}


def _completion(done: ServeResult, completion_id: str) -> dict:
    r = done.result
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": r.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": r.answer},
                     "finish_reason": _finish(r.finish_reason)}],
        "usage": _usage(done), "apb": _extension(done),
    }


async def _sse(first: tuple, ticket: Ticket, completion_id: str, model: str):
    """`data: {chunk}` events: the role, each piece of text, the finish reason (with usage and apb), [DONE]."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    item = first
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            if item[0] == "token":
                yield chunk({"content": item[1]})
            elif item[0] == "done":
                yield chunk({}, _finish(item[1].result.finish_reason), usage=_usage(item[1]),
                            apb=_extension(item[1]))
                break
            else:
                err = api_error(item[1])
                yield f"data: {json.dumps({'error': {'message': err.message, 'type': err.kind, 'code': err.code}})}\n\n"
                break
            item = await ticket.items.get()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (starlette cancels this generator) or the stream ended
        ticket.cancel()
