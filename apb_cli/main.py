"""The `apb` command line: parse options, call `apb_core`, render the result. No algorithm lives here.

`apb ask` checks every option, then reads the document, then resolves the model, all before any model work,
so bad input costs nothing: each failure is ONE line on stderr ("apb: error: ..."), exit code 2, and nothing
on stdout. Errors raised later by the engine keep their own exit code (`ApbError.exit_code`); Ctrl-C exits
130; anything unexpected exits 1 with one line (set APB_DEBUG=1 to also get the traceback).

Output contract: stdout holds only the answer (streamed, one newline after each answer) or, with `--json`, one
JSON object; progress, warnings and tables go to stderr (see `apb_cli/render.py`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import platform
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from apb_core.errors import ApbError, InputError

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]

DEVICES = ("auto", "cpu", "cuda")
METHODS = ("apb", "star", "full")
TRUNCATE_MODES = ("none", "middle", "end")
DTYPES = ("auto", "fp32", "bf16", "fp16")
MAX_HOSTS = 1024  # sanity bounds: a typo like --hosts 1000000 must be one error line, not a fork bomb
MAX_THREADS = 4096
MAX_TEMPERATURE = 100.0
# CPU workers are processes that split the cores. On a 2-core machine one host was faster end to end than two
# (docs/benchmarks.md, CPU: same answer, 19.6 s vs 23.0 s; two hosts pay gloo collectives per layer and token),
# so machines with fewer than MIN_CORES_FOR_TWO_HOSTS cores run one host; others keep the two of the ask contract.
MIN_CORES_FOR_TWO_HOSTS = 4


def default_cpu_hosts(cores: int | None = None) -> int:
    """`--hosts` on CPU when not given: 1 below MIN_CORES_FOR_TWO_HOSTS cores, else 2."""
    cores = (os.cpu_count() or 1) if cores is None else cores
    return 1 if cores < MIN_CORES_FOR_TWO_HOSTS else 2


def _error_line(message: object) -> str:
    """`apb: error: <message>` on one line, whatever newlines the message holds."""
    text = " ".join(str(message).split()) or "unknown error"
    return f"apb: error: {text}"


class _OneLineErrors(TyperGroup):
    """Makes click's own usage errors (bad option type, unknown option) one line too, like ours.

    Both `app()` (the console script) and typer's CliRunner go through `main`, so this is the one place.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
            code = rv if isinstance(rv, int) else 0
        except NoArgsIsHelpError as exc:  # bare `apb`: the help text, not an error line
            exc.show()
            code = 0
        except ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            print(_error_line(exc.format_message()) + hint, file=sys.stderr)
            code = exc.exit_code
        except typer.Abort:
            print("apb: aborted", file=sys.stderr)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    cls=_OneLineErrors,
    name="apb",
    help="Answer questions about long documents with APB distributed prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclasses.dataclass
class AskOptions:
    """`apb ask`'s options after validation: the values the request is built from."""

    questions: list[str]
    device: str
    hosts: int
    passing_len: int | str | None


def validate_ask(
    *,
    question: str | None,
    extra_questions: list[str],
    hosts: int | None,
    device: str,
    method: str,
    anchor_len: int | None,
    passing_len: str | None,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    truncate: str,
    threads: int | None,
    cuda_count: Callable[[], int],
    dtype: str = "auto",
    seed: int = 0,
) -> AskOptions:
    """Check `apb ask`'s options in the documented order; raise `InputError` naming the first bad one.

    `cuda_count` is called only when the device needs it (it imports torch, which takes a second).
    """
    questions = ([question] if question is not None else []) + list(extra_questions)
    if not questions:
        raise InputError("no question given (pass QUESTION or -q/--question)")
    for index, q in enumerate(questions, start=1):
        if not q.strip():
            which = "the question" if len(questions) == 1 else f"question {index}"
            raise InputError(f"{which} is empty")
    if hosts is not None and hosts < 1:
        raise InputError(f"--hosts must be at least 1 (got {hosts})")
    if device not in DEVICES:
        raise InputError(f"--device must be one of {', '.join(DEVICES)} (got {device!r})")
    if method not in METHODS:
        raise InputError(f"--method must be one of {', '.join(METHODS)} (got {method!r})")
    if truncate not in TRUNCATE_MODES:
        raise InputError(f"--truncate must be one of {', '.join(TRUNCATE_MODES)} (got {truncate!r})")

    gpus = cuda_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus == 0:
        raise InputError("--device cuda: no CUDA GPU is visible")
    resolved = "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"
    if resolved == "cuda":
        if hosts is None:
            hosts = gpus
        elif hosts > gpus:
            raise InputError(f"--hosts {hosts} needs {hosts} GPUs but only {gpus} are visible")
    elif hosts is None:
        hosts = default_cpu_hosts()

    parsed_passing: int | str | None = None
    if passing_len is not None:
        value = passing_len.strip().lower()
        if value == "all":
            parsed_passing = "all"
        else:
            try:
                parsed_passing = int(value)
            except ValueError:
                message = f"--passing-len must be a whole number or 'all' (got {passing_len!r})"
                raise InputError(message) from None
            if parsed_passing < 0:
                raise InputError(f"--passing-len must not be negative (got {parsed_passing})")
    if anchor_len is not None and anchor_len < 0:
        raise InputError(f"--anchor-len must not be negative (got {anchor_len})")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if not temperature >= 0:  # written so that NaN fails too
        raise InputError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    if not 0 < top_p <= 1:
        raise InputError(f"--top-p must be in (0, 1] (got {top_p})")
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be at least 1 (got {threads})")
    if threads is not None and threads > MAX_THREADS:
        raise InputError(f"--threads must be at most {MAX_THREADS} (got {threads})")
    if hosts > MAX_HOSTS:
        raise InputError(f"--hosts must be at most {MAX_HOSTS} (got {hosts})")
    if not temperature <= MAX_TEMPERATURE:
        raise InputError(f"--temperature must be at most {MAX_TEMPERATURE} (got {temperature})")
    if not 0 <= seed < 2**63:
        raise InputError(f"--seed must be in [0, 2^63) (got {seed})")
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    return AskOptions(questions=questions, device=resolved, hosts=hosts, passing_len=parsed_passing)


def _cuda_count() -> int:
    """How many CUDA GPUs torch sees (0 without a CUDA build)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@app.command()
def ask(
    path: Annotated[str, typer.Argument(help="Document: .txt/.md/any UTF-8 text, .pdf, or - for stdin.")],
    question: Annotated[str | None, typer.Argument(help="The question (optional when -q/--question is given).")] = None,
    extra_questions: Annotated[
        list[str] | None,
        typer.Option("-q", "--question", help="Another question (repeatable); all share one model load."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Local HF model directory or .gguf file. Default: the embedded model."),
    ] = None,
    hosts: Annotated[
        int | None,
        typer.Option(
            "--hosts", help="Workers. Default: visible GPUs on cuda; on CPU 2, or 1 below 4 cores.", show_default=False
        ),
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
) -> None:
    """Answer QUESTION about the document at PATH."""
    code = _ask(
        path=path,
        question=question,
        extra_questions=extra_questions or [],
        model=model,
        hosts=hosts,
        device=device,
        method=method,
        anchor_len=anchor_len,
        passing_len=passing_len,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        stop=stop or [],
        truncate=truncate,
        json_output=json_output,
        quiet=quiet,
        allow_pickle=allow_pickle,
        threads=threads,
        dtype=dtype,
        auto_exact=auto_exact,
    )
    if code:
        raise typer.Exit(code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean-up (workers stopped) runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _ask(**opts: Any) -> int:
    """Run `apb ask` with SIGTERM handled like Ctrl-C (exit 143 instead of 130)."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return _ask_body(**opts)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _ask_body(**opts)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _ask_body(**opts: Any) -> int:
    """Run `apb ask`; returns the exit code after printing at most one error line."""
    renderer = None
    if os.environ.get("WORLD_SIZE") and os.environ.get("RANK", "0") != "0":
        # a torchrun follower: rank 0 reports; the others compute and stay silent (errors still print)
        opts["quiet"], opts["json_output"] = True, False
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    try:
        options = validate_ask(
            question=opts["question"],
            extra_questions=opts["extra_questions"],
            hosts=opts["hosts"],
            device=opts["device"],
            method=opts["method"],
            anchor_len=opts["anchor_len"],
            passing_len=opts["passing_len"],
            max_new_tokens=opts["max_new_tokens"],
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            truncate=opts["truncate"],
            threads=opts["threads"],
            cuda_count=_cuda_count,
            dtype=opts.get("dtype", "auto"),
            seed=opts["seed"],
        )

        from apb_cli.render import Renderer, json_payload
        from apb_core.api import AskRequest, Event
        from apb_core.documents import read_document

        renderer = Renderer(questions=options.questions, stream_answers=not opts["json_output"], quiet=opts["quiet"])
        source_label = "<stdin>" if opts["path"] == "-" else os.path.basename(opts["path"])
        renderer.handle(Event("phase", phase="read", text=source_label))
        document = read_document(opts["path"])
        renderer.handle(Event("progress", phase="read", done=1, total=1, text=source_label))
        # Resolved here, before the engine starts workers, so a bad path or a pickle checkpoint fails fast.
        resolve_model = importlib.import_module("apb_core.model").resolve_model
        resolve_model(opts["model"], allow_pickle=opts["allow_pickle"])
        for warning in document.warnings:
            renderer.warn(warning)
        request = AskRequest(
            document=document.text,
            questions=options.questions,
            model=opts["model"],
            method=opts["method"],
            hosts=options.hosts,
            device=options.device,
            anchor_len=opts["anchor_len"],
            passing_len=options.passing_len,
            max_new_tokens=opts["max_new_tokens"],
            temperature=opts["temperature"],
            top_p=opts["top_p"],
            seed=opts["seed"],
            stop=opts["stop"],
            truncate=opts["truncate"],
            threads=opts["threads"],
            allow_pickle=opts["allow_pickle"],
            dtype=None if opts.get("dtype", "auto") == "auto" else opts["dtype"],
            auto_exact=opts.get("auto_exact", True),
        )
        results = importlib.import_module("apb_core.ask").run_ask(request, on_event=renderer.handle)
        if not results:
            raise ApbError("the engine returned no answer")
        renderer.print_unstreamed(results)
        renderer.close()
        if opts["json_output"]:
            sys.stdout.write(json.dumps(json_payload(results), ensure_ascii=False, allow_nan=False) + "\n")
            sys.stdout.flush()
        renderer.print_tables(results)
        return 0
    except ApbError as exc:
        return _fail(renderer, _error_line(exc), exc.exit_code)
    except _Terminated:
        return _fail(renderer, "apb: terminated", 143)
    except KeyboardInterrupt:
        return _fail(renderer, "apb: interrupted", 130)
    except BrokenPipeError:
        # The reader of stdout went away (`| head`): nothing left to say to it.
        _silence_stdout()
        return 1
    except Exception as exc:
        if os.environ.get("APB_DEBUG") == "1":
            traceback.print_exc(file=sys.stderr)
        message = f"unexpected {type(exc).__name__}: {exc} (set APB_DEBUG=1 for the traceback)"
        return _fail(renderer, _error_line(message), 1)


def _fail(renderer: Any, line: str, code: int) -> int:
    """Stop the bars (so they do not draw after the message), then print the one error line."""
    if renderer is not None:
        try:
            renderer.close(failed=True)
        except Exception:  # the error line matters more than a clean progress display
            pass
    print(line, file=sys.stderr)
    sys.stderr.flush()
    return code


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush does not raise again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


@app.command()
def info(
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object instead.")] = False,
) -> None:
    """Show the devices apb can use, whether the default model is installed, and versions."""
    facts: dict[str, Any] = {
        "apb": _version("apb_core"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "cpu_cores": os.cpu_count(),
    }
    try:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        facts["cuda_gpus"] = count
        facts["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(count)]
    except Exception as exc:  # a broken CUDA install should still let `info` report it
        facts["cuda_gpus"] = 0
        facts["cuda_devices"] = []
        facts["cuda_error"] = " ".join(str(exc).split())
    try:
        source = importlib.import_module("apb_core.model").resolve_model(None)
        facts["default_model"] = getattr(source, "name", str(source))
        facts["default_model_found"] = True
    except Exception as exc:  # ApbError when it is not installed; ImportError while model.py is missing
        facts["default_model"] = None
        facts["default_model_found"] = False
        facts["default_model_error"] = " ".join(str(exc).split()) or type(exc).__name__
    if json_output:
        print(json.dumps(facts, ensure_ascii=False))
        return
    gpus = ", ".join(facts["cuda_devices"]) or "none"
    if facts["default_model_found"]:
        model_line = facts["default_model"]
    else:
        model_line = f"not found ({facts['default_model_error']})"
    lines = [
        f"apb           {facts['apb']}",
        f"python        {facts['python']}",
        f"torch         {facts['torch']}",
        f"transformers  {facts['transformers']}",
        f"cpu cores     {facts['cpu_cores']}",
        f"cuda gpus     {facts['cuda_gpus']} ({gpus})",
        f"default model {model_line}",
    ]
    if "cuda_error" in facts:
        lines.append(f"cuda error    {facts['cuda_error']}")
    print("\n".join(lines))


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return "not installed"
    return str(getattr(module, "__version__", "unknown"))


# `apb bench` and `apb eval` are written by their owners in apb_cli/bench.py and apb_cli/eval.py. Each module
# defines `register(app: typer.Typer) -> None`, which adds its command(s) with `@app.command()`; main calls it
# when the module exists, so neither command needs an edit here.
def _register_optional_commands() -> None:
    for name in ("bench", "eval"):
        module_name = f"apb_cli.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        module.register(app)


_register_optional_commands()

if __name__ == "__main__":  # `python -m apb_cli.main` (torchrun launches it this way)
    app()
