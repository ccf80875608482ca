"""The one error handler of every command: whatever a command raises ends as one line on stderr and an exit code.

`ApbError` -> its own line and code (2 for bad input); Ctrl-C -> 130 "apb: interrupted"; SIGTERM -> 143
"apb: terminated" (handled like Ctrl-C so the same clean-up stops the workers); a closed stdout pipe -> silence;
anything else -> one "unexpected ..." line, with the traceback only under APB_DEBUG.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

from apb_core.dist.env import read_env
from apb_core.errors import ApbError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so the same clean-up (workers stopped) runs."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def run_command(body: Callable[[], int]) -> int:
    """Run a command's body and return its exit code; a failure becomes ONE stderr line and its exit code.

    ApbError: `apb: error: ...` with `exc.exit_code` (2 for bad input). Ctrl-C: 130; SIGTERM, handled like
    Ctrl-C while the body runs so workers are stopped: 143. A closed stdout (`| head`): quiet, 1. Anything else:
    `apb: error: unexpected ...`, 1, with the traceback when APB_DEBUG is set.
    """
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        return _report_failures(body)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _report_failures(body)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _report_failures(body: Callable[[], int]) -> int:
    try:
        return body()
    except ApbError as exc:
        return _fail(error_line(exc), exc.exit_code)
    except Terminated:
        return _fail("apb: terminated", 143)
    except KeyboardInterrupt:
        return _fail("apb: interrupted", 130)
    except BrokenPipeError:  # the reader of stdout went away: nothing left to say to it
        _silence_stdout()
        return 1
    except Exception as exc:
        if read_env().debug:
            traceback.print_exc(file=sys.stderr)
        return _fail(error_line(f"unexpected {type(exc).__name__}: {exc} (set APB_DEBUG=1 for the traceback)"), 1)


def error_line(message: object) -> str:
    """`apb: error: <message>` on one line, whatever newlines the message holds."""
    text = " ".join(str(message).split()) or "unknown error"
    return f"apb: error: {text}"


def _fail(line: str, code: int) -> int:
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
