"""Every environment variable apb reads, read here and nowhere else (the README's "Environment" table).

The launcher reads them once (`read_env`) and hands what workers need to them inside `WorkerSpec`, so a value
set by a caller after import (bench's long collective timeout) is never missed by a module that read it early.

| variable                | meaning                                                                     |
|-------------------------|-----------------------------------------------------------------------------|
| APB_COLLECTIVE_TIMEOUT  | seconds a worker waits in one collective before the run fails (default 60)  |
| APB_DEBUG=1             | workers keep their stderr; unexpected errors print a traceback               |
| APB_START_METHOD        | multiprocessing start method of the workers (launcher.default_start_method)  |
| APB_FAULT               | fault injection for the reliability tests (apb_core.dist.faults)             |
| APB_FAULT_MARKER        | directory where every fault point writes a marker (reliability tests)        |
| APB_CACHE_DIR           | where converted GGUF models are kept (default $XDG_CACHE_HOME/apb, ~/.cache) |
| RANK, WORLD_SIZE, LOCAL_RANK, TORCHELASTIC_RUN_ID | set by torchrun: this process is one host         |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_COLLECTIVE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Torchrun:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


@dataclass(frozen=True)
class Env:
    collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S
    collective_timeout_given: bool = False  # APB_COLLECTIVE_TIMEOUT was set (bench's longer default yields to it)
    debug: bool = False
    start_method: str | None = None
    fault: str = ""
    fault_marker: str | None = None
    cache_dir: Path = Path("~/.cache/apb").expanduser()
    torchrun: Torchrun | None = None


def read_env(environ: Mapping[str, str] | None = None) -> Env:
    """The settings of `environ` (default: this process's environment). Bad numbers fall back to defaults."""
    environ = os.environ if environ is None else environ
    given = bool(environ.get("APB_COLLECTIVE_TIMEOUT"))
    try:
        timeout = float(environ.get("APB_COLLECTIVE_TIMEOUT") or DEFAULT_COLLECTIVE_TIMEOUT_S)
    except ValueError:
        timeout, given = DEFAULT_COLLECTIVE_TIMEOUT_S, False
    if environ.get("APB_CACHE_DIR"):
        cache = Path(environ["APB_CACHE_DIR"]).expanduser()
    elif environ.get("XDG_CACHE_HOME"):
        cache = Path(environ["XDG_CACHE_HOME"]).expanduser() / "apb"
    else:
        cache = Path("~/.cache/apb").expanduser()
    torchrun = None
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ):
        torchrun = Torchrun(int(environ.get("RANK", "0")), int(environ.get("WORLD_SIZE", "1")),
                            int(environ.get("LOCAL_RANK", "0")))
    return Env(
        collective_timeout_s=timeout,
        collective_timeout_given=given,
        debug=environ.get("APB_DEBUG", "") not in ("", "0"),
        start_method=environ.get("APB_START_METHOD") or None,
        fault=environ.get("APB_FAULT", ""),
        fault_marker=environ.get("APB_FAULT_MARKER") or None,
        cache_dir=cache,
        torchrun=torchrun,
    )
