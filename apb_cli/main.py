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
from typer.core import TyperGroup

from apb_cli.ask import ask
from apb_cli.bench import bench
from apb_cli.eval import eval_command
from apb_cli.options import error_line

try:  # typer >= 0.2x vendors click; older releases use the click package
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - depends on the installed typer
    from click.exceptions import ClickException, NoArgsIsHelpError  # type: ignore[no-redef]


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
            print(error_line(exc.format_message()) + hint, file=sys.stderr)
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
    except Exception as exc:  # ApbError when it is not installed; ImportError on a broken install
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


# Registered in the order `apb --help` lists them.
app.command()(ask)
app.command()(info)
app.command()(bench)
app.command("eval")(eval_command)

if __name__ == "__main__":  # `python -m apb_cli.main` (torchrun launches it this way)
    app()
