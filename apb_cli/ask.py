"""`apb ask`: check the options, read the document, resolve the model, run `apb_core.ask.run_ask`, render.

Every option is checked first (`AskOptions`), then the document is read, then the model resolved, all before
any model work, so bad input costs nothing: one line on stderr, exit 2, nothing on stdout.

Output contract: stdout holds only the answer (streamed, one newline after each answer) or, with `--json`, one
JSON object; progress, warnings and tables go to stderr (see `apb_cli/render.py`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Annotated

import typer

from apb_cli import handler
from apb_cli.options import AskOptions
from apb_cli.render import Renderer, json_payload
from apb_core.api import AskRequest, Event
from apb_core.dist.env import read_env
from apb_core.errors import ApbError


def ask(
    path: Annotated[str, typer.Argument(help="Document: .txt/.md/any UTF-8 text, .pdf, or - for stdin.")],
    question: Annotated[str | None, typer.Argument(help="The question (optional when -q/--question is given).")] = None,
    extra_questions: Annotated[
        list[str] | None,
        typer.Option("-q", "--question", help="Another question (repeatable); all share one model load."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("-m", "--model", help="Local HF model directory or .gguf file. Default: the embedded model."),
    ] = None,
    system: Annotated[
        str | None,
        typer.Option("-s", "--system", help="A system prompt. Default: the model's own (its chat template's)."),
    ] = None,
    hosts: Annotated[
        int | None,
        typer.Option(
            "--hosts", help="Workers. Default: visible GPUs on cuda; on CPU 2, or 1 below 4 cores.", show_default=False
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option("--workers", help="Worker processes (dividing --hosts); fewer than hosts: the hosts of a worker "
                     "share its model and take turns (same answer). Default: one per host.", show_default=False),
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto|cpu|cuda (auto: cuda if any).")] = "auto",
    method: Annotated[str, typer.Option("--method", help="apb|star|full.")] = "apb",
    anchor_len: Annotated[
        int | None, typer.Option("--anchor-len", help="Anchor block length. Default: by context length.")
    ] = None,
    passing_len: Annotated[
        str | None, typer.Option("--passing-len", help="Passing block length, or 'all'. Default: by context.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Answer length limit.")] = 128,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.")] = 0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop the answer at this text (repeatable).")] = None,
    truncate: Annotated[
        str, typer.Option("--truncate", help="none|middle|end: how to cut a document longer than the window.")
    ] = "none",
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object (answer and measurements) instead.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Nothing on stderr but errors.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickle (.bin/.pt) checkpoints: they can run code.")
    ] = False,
    threads: Annotated[
        int | None, typer.Option("--threads", help="CPU threads per worker. Default: cores / hosts.")
    ] = None,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto|fp32|bf16|fp16 (auto: fp32 on CPU, bf16 on GPU).")
    ] = "auto",
    auto_exact: Annotated[
        bool,
        typer.Option("--auto-exact/--no-auto-exact",
                     help="apb: run exact (anchor 0, passing all) where that costs about as much as compressing."),
    ] = True,
    layout: Annotated[
        str, typer.Option("--layout", help="balanced (equal prefill work per host) | equal (the paper's equal blocks).")
    ] = "balanced",
    shared_prefill: Annotated[
        bool | None,
        typer.Option("--shared-prefill/--no-shared-prefill",
                     help="Several questions: one prefill for all (APB puts every question in the anchor) or one "
                          "each. Default: one for all (exact layouts and star give the same answers either way).",
                     show_default=False),
    ] = None,
    cite: Annotated[
        bool, typer.Option("--cite", help="After the answer, the passages it attended to most (page or lines).")
    ] = False,
    compressor: Annotated[
        str | None,
        typer.Option("--compressor", help="apb: query_aware (default) | retaining_heads (needs --retaining-heads) "
                                          "| random. A non-default one always runs compressed (no auto-exact).",
                     show_default=False),
    ] = None,
    retaining_heads: Annotated[
        str | None,
        typer.Option("--retaining-heads", help="Safetensors file of Locret-style retaining heads for the model "
                                               "(implies --compressor retaining_heads).", show_default=False),
    ] = None,
    question_in_anchor: Annotated[
        bool,
        typer.Option("--question-in-anchor/--no-question-in-anchor",
                     help="apb: the question in the anchor (off: an ablation, always run compressed)."),
    ] = True,
    server: Annotated[
        str | None, typer.Option("--server", help="Send the questions to a running `apb serve` at this URL.",
                                 show_default=False),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="--server: the server's key.", show_default=False)
    ] = None,
) -> None:
    """Answer QUESTION about the document at PATH."""
    follower = is_torchrun_follower()  # rank 0 reports; the others compute and stay silent (errors still print)

    def body() -> int:
        return run_ask_command(AskOptions(
            path=path, questions=(*([] if question is None else [question]), *(extra_questions or [])),
            model=model, hosts=hosts, workers=workers, device=device, method=method,
            anchor_len=anchor_len, passing_len=passing_len,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop or []),
            truncate=truncate, json_output=json_output and not follower, quiet=quiet or follower,
            allow_pickle=allow_pickle, threads=threads, dtype=dtype, auto_exact=auto_exact, layout=layout,
            system=system, shared_prefill=shared_prefill, cite=cite, compressor=compressor,
            retaining_heads=retaining_heads, question_in_anchor=question_in_anchor,
        ), server=server, api_key=api_key)

    with contextlib.ExitStack() as stack:
        if follower:
            stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
        code = handler.run_command(body)
    if code:
        raise typer.Exit(code)


def is_torchrun_follower() -> bool:
    """True in a torchrun launch on every rank but 0: that process computes but must print nothing."""
    torchrun = read_env().torchrun
    return torchrun is not None and torchrun.rank != 0


def run_ask_command(opts: AskOptions, server: str | None = None, api_key: str | None = None) -> int:
    """Read the document, resolve the model, run the engine and render; the bars are erased on any failure
    so that the caller's one error line stands alone."""
    renderer = Renderer(questions=list(opts.questions), stream_answers=not opts.json_output, quiet=opts.quiet)
    try:
        request = build_request(opts, renderer)
        if server:  # a running `apb serve` answers (apb_core.serve.client): the same events and results
            from apb_core.serve.client import remote_ask

            results = remote_ask(request, server, renderer.handle, api_key)
        else:
            from apb_core.ask import run_ask  # the engine: torch and transformers, only now that input is good

            results = run_ask(request, on_event=renderer.handle)
        if not results:
            raise ApbError("the engine returned no answer")
        renderer.print_unstreamed(results)
        renderer.close()
    except BaseException:
        close_quietly(renderer)
        raise
    for note in opts.notes:  # after the answer: a failed run's error line stays the only line
        renderer.notice(note)
    for index, result in enumerate(results):
        if result.finish_reason == "length":
            which = f"answer {index + 1}" if len(results) > 1 else "the answer"
            renderer.notice(f"{which} stopped at --max-new-tokens {opts.max_new_tokens} (finish_reason length): "
                            "it may be cut short; raise --max-new-tokens for more", choice=False)
    if opts.json_output:
        payload = json_payload(results, renderer.notes, renderer.warnings)
        sys.stdout.write(json.dumps(payload, ensure_ascii=False, allow_nan=False) + "\n")
        sys.stdout.flush()
    renderer.print_citations(results)
    renderer.print_tables(results)
    return 0


def build_request(opts: AskOptions, renderer: Renderer) -> AskRequest:
    """Read the document (warnings to stderr) and resolve the model, so a bad path or a pickle checkpoint
    fails before the engine starts workers."""
    from apb_core import models
    from apb_core.documents import read_document

    label = "<stdin>" if opts.path == "-" else os.path.basename(opts.path)
    renderer.handle(Event("phase", phase="read", text=label))
    document = read_document(opts.path)
    renderer.handle(Event("progress", phase="read", done=1, total=1, text=label))
    models.resolve_model(opts.model, allow_pickle=opts.allow_pickle)
    for warning in (*document.warnings, *opts.warnings):
        renderer.warn(warning)
    return AskRequest(
        document=document.text, questions=list(opts.questions), model=opts.model, method=opts.method,
        hosts=opts.hosts, workers=opts.workers, device=opts.device, anchor_len=opts.anchor_len,
        passing_len=opts.passing_len,
        max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p, seed=opts.seed,
        stop=list(opts.stop), truncate=opts.truncate, threads=opts.threads, allow_pickle=opts.allow_pickle,
        dtype=None if opts.dtype == "auto" else opts.dtype, auto_exact=opts.auto_exact, layout=opts.layout,
        system=opts.system, shared_prefill=opts.shared_prefill, cite=opts.cite, paged=document.pages is not None,
        compressor=opts.compressor or "query_aware", retaining_heads=opts.retaining_heads,
        question_in_anchor=opts.question_in_anchor,
    )


def close_quietly(renderer: Renderer) -> None:
    """Stop the bars after a failure; the error line that follows matters more than a clean display."""
    try:
        renderer.close(failed=True)
    except Exception:
        pass
