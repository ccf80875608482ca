"""The `apb` command line: the typer app, its one-line usage errors, `apb info`, and the three commands.

`ask`, `bench` and `eval` live in their own modules (apb_cli/ask.py, bench.py, eval.py) and share their option
checks and their one error handler through apb_cli/options.py: a bad option is ONE line on stderr ("apb: error:
..."), exit code 2, and nothing on stdout; engine errors keep their own exit code (`ApbError.exit_code`); Ctrl-C
exits 130, SIGTERM 143; anything unexpected exits 1 with one line (set APB_DEBUG=1 to also get the traceback).
No algorithm lives here.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from apb_cli.ask import ask
from apb_cli.bench import bench
from apb_cli.eval import eval_command
from apb_cli.handler import error_line
from apb_cli.serve import serve

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]


def _without_flag_types(params: list[Any]) -> list[Any]:
    """Help shows a type only for options that take a value: flags take none (typer would print `--json
    <bool>`) and an argument's help says what it is."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.display_type_rich = lambda ctx: None
    return params


class _Command(TyperCommand):
    """A command whose help lists flags without a type column entry."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))


class _OneLineErrors(TyperGroup):
    """Makes click's own usage errors (bad option type, unknown option) one line too, like ours.

    Both `app()` (the console script) and typer's CliRunner go through `main`, so this is the one place.
    """

    def get_params(self, ctx: Any) -> list[Any]:
        return _without_flag_types(super().get_params(ctx))

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
            print(error_line(exc.format_message()) + hint, file=sys.stderr)
            code = exc.exit_code
        except typer.Abort:
            print("apb: aborted", file=sys.stderr)
            code = 1
        if standalone_mode:
            sys.exit(code)
        return code


EXAMPLES = """\
[bold]Examples[/]

  apb ask examples/sample.md "What is the secret passcode for the north archive?"

  apb ask report.pdf "Which supplier was late?" --json | jq -r .answer

  apb ask doc.md -q "Who wrote it?" -q "When?" --hosts 2 --max-new-tokens 200

  apb bench --len 2k,8k --methods single,apb

  apb eval --tasks niah_single_1 --len 4k --samples 2

  apb info

The first run converts the embedded model once (about 20 s; `apb info` shows the cache)."""

app = typer.Typer(
    cls=_OneLineErrors,
    name="apb",
    help="Answer questions about long documents with APB distributed prefill.",
    epilog=EXAMPLES,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_version(value: bool) -> None:
    if value:
        print(f"apb {_version('apb_core')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", help="Print apb's version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    pass


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
        from apb_core import models

        source = models.resolve_model(None)
        facts["default_model"] = getattr(source, "name", str(source))
        facts["default_model_found"] = True
        facts["default_model_window"] = _window(models, source)
    except Exception as exc:  # ApbError when it is not installed; ImportError on a broken install
        facts["default_model"] = None
        facts["default_model_found"] = False
        facts["default_model_error"] = " ".join(str(exc).split()) or type(exc).__name__
    from apb_cli.options import default_cpu_hosts
    from apb_core import models

    cache = models.cache_dir()
    facts["cache_dir"] = str(cache)
    facts["cache_bytes"] = models.cache_size(cache)
    gpus = facts["cuda_gpus"]
    facts["default_device"] = "cuda" if gpus else "cpu"
    facts["default_hosts"] = gpus or default_cpu_hosts(facts["cpu_cores"])
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
        f"model window  {facts.get('default_model_window') or '-'} tokens",
        f"default run   {facts['default_hosts']} host(s) on {facts['default_device']} (--hosts, --device)",
        f"cache         {cache} ({facts['cache_bytes'] / 1e6:,.0f} MB; APB_CACHE_DIR or XDG_CACHE_HOME move it, "
        "see the README's Environment table)",
    ]
    if "cuda_error" in facts:
        lines.append(f"cuda error    {facts['cuda_error']}")
    print("\n".join(lines))


def _window(models: Any, source: Any) -> int | None:
    """The model's context window, from its converted folder when there is one, else from the GGUF header (so
    `info` never starts the ~20 s conversion)."""
    try:
        if models.conversion_target(source) is None:
            return int(models.model_window(models.load_config(source)))
        return models.gguf_context_length(source.path)
    except Exception:
        return None


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return "not installed"
    return str(getattr(module, "__version__", "unknown"))


ASK_EXAMPLES = """\
[bold]Examples[/]

  apb ask examples/sample.md "What is the secret passcode for the north archive?"

  cat notes.txt | apb ask - "Summarise the decisions" --max-new-tokens 200

  apb ask doc.md "..." --json | jq -r .answer

  apb ask doc.md "..." -m ./qwen2.5-0.5b-instruct-q4_k_m.gguf -s "Answer in one sentence."

  apb ask long.pdf "..." --truncate middle"""

BENCH_EXAMPLES = """\
[bold]Examples[/]

  apb bench --len 2k --methods single,apb          # CPU: the SmolLM2-135M shape

  apb bench --len 32k,128k --preset llama-3.1-8b   # GPUs: one worker per GPU"""

EVAL_EXAMPLES = """\
[bold]Examples[/]

  apb eval --tasks niah_single_1,passkey --len 4k --samples 2

  apb eval --tasks ruler --len 8k --methods full,apb --hosts 2 --out ruler.jsonl"""

# Registered in the order `apb --help` lists them.
app.command(cls=_Command, epilog=ASK_EXAMPLES)(ask)
app.command(cls=_Command)(info)
app.command(cls=_Command, epilog=BENCH_EXAMPLES)(bench)
app.command("eval", cls=_Command, epilog=EVAL_EXAMPLES)(eval_command)
app.command(cls=_Command)(serve)

if __name__ == "__main__":  # `python -m apb_cli.main` (torchrun launches it this way)
    app()
