"""`apb serve`: load the model once on the workers and answer OpenAI-style chat requests (apb_core.serve).

The model loads before the port is served; SIGTERM or Ctrl-C stops accepting, ends the workers and exits 0.
"""

from __future__ import annotations

import signal
import socket
import sys
from typing import Annotated

import typer

from apb_cli import handler
from apb_cli.options import DEVICES, check_at_least, check_choice, cuda_count, resolve_device_hosts
from apb_core.api import AskRequest
from apb_core.errors import InputError

GRACEFUL_S = 3  # how long in-flight requests may finish after SIGTERM (the whole stop stays under 10 s)


def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help="Local HF model directory or .gguf file. Default: the embedded model."),
    ] = None,
    hosts: Annotated[
        int | None,
        typer.Option("--hosts", help="Workers. Default: visible GPUs on cuda; on CPU 2, or 1 below 4 cores.",
                     show_default=False),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Worker processes (dividing --hosts); fewer than hosts: the hosts of a worker "
                     "share its model and take turns (same answers). Default: one per host.", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto: cuda if any).")] = "auto",
    method: Annotated[str, typer.Option("--method", help="apb|star|full (a request's apb.method overrides).")] = "apb",
    cache_gib: Annotated[
        float, typer.Option("--cache-gib", help="Keep documents' KV on the workers up to this many GiB in all, "
                                                "least recently used out (0: never).")
    ] = 4.0,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1 routes.")
    ] = None,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests that may wait; more get 503.")] = 16,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads per worker. Default: cores / workers.")
    ] = None,
) -> None:
    """Serve POST /v1/chat/completions, GET /v1/models and GET /health with the model loaded once."""
    code = handler.run_command(lambda: run_serve(host, port, model, hosts, device, method, cache_gib, api_key,
                                                 max_queue, threads, workers))
    if code:
        raise typer.Exit(code)


def run_serve(host: str, port: int, model: str | None, hosts: int | None, device: str, method: str,
              cache_gib: float, api_key: str | None, max_queue: int, threads: int | None,
              workers: int | None = None) -> int:
    check_choice("--device", device, DEVICES)
    check_choice("--method", method, ("apb", "star", "full"))
    check_at_least("--hosts", hosts, 1)
    check_at_least("--threads", threads, 1)
    check_at_least("--max-queue", max_queue, 1)
    check_at_least("--port", port, 1)
    if not cache_gib >= 0:
        raise InputError(f"--cache-gib must not be negative (got {cache_gib})")
    if api_key is not None and not api_key.strip():
        raise InputError("--api-key is empty")
    _check_port(host, port)
    placed = resolve_device_hosts(device, hosts, cuda_count, workers)
    device, hosts = placed.device, placed.hosts
    for note in placed.notes:
        print(f"apb: note: {note}", file=sys.stderr, flush=True)
    import uvicorn

    from apb_core import models
    from apb_core.serve.app import create_app
    from apb_core.serve.engine import ServeEngine

    models.resolve_model(model)
    base = AskRequest(document="", questions=[], model=model, method=method, hosts=hosts, device=device,
                      threads=threads, workers=placed.workers)
    print(f"apb: loading the model on {hosts} host(s) ({device}) ...", file=sys.stderr, flush=True)
    engine = ServeEngine(base, int(cache_gib * 2**30), max_queue).open()
    if engine.warm_up_s is not None:
        print(f"apb: warmed up in {engine.warm_up_s:.1f} s (one short question through prefill and decode)",
              file=sys.stderr, flush=True)
    try:
        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:  # the first SIGTERM/SIGINT: in-flight work ends now
                engine.stop_accepting()
                super().handle_exit(sig, frame)

        server = Server(uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_level="warning",
                                       timeout_graceful_shutdown=GRACEFUL_S, lifespan="off"))
        # uvicorn handles SIGINT/SIGTERM while it serves and re-raises them afterwards: let that be a no-op, so a
        # stop by signal is a clean exit (0) once the workers are ended below
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: None)
        print(f"apb: serving {engine.model_name} at http://{host}:{port}/v1 (Ctrl-C stops)", file=sys.stderr,
              flush=True)
        server.run()
    finally:
        engine.close()
    print("apb: stopped", file=sys.stderr, flush=True)
    return 0


def _check_port(host: str, port: int) -> None:
    """Fail before the model loads when the address cannot be bound."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
