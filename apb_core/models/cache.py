"""The GGUF -> safetensors cache: convert a GGUF model once, then load the plain folder in about a second.

transformers loads a GGUF file by de-quantising every tensor, which takes 15-70 s per run. We do it once
and keep the result as an ordinary safetensors folder under the apb cache, keyed by the file's sha256, so
later runs load in about a second. The folder is written to a temporary directory and renamed into place, so
a killed run never leaves a half cache and two concurrent converters cannot corrupt each other.

The converter is a parameter of `prepared_dir`: `convert_in_child` (the default, a spawned process) in the
product, `convert_gguf` in-process or a fake one in tests that count or fake conversions.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from apb_core.dist.env import read_env
from apb_core.errors import ApbError

from .gguf import convert_in_child
from .source import ModelSource

HASH_CACHE_FILE = "gguf-hashes.json"
SECONDS_PER_MIB = 0.22  # conversion time per MiB of GGUF on 2 CPU cores (SmolLM2-135M: 93 MiB, 21.6 s)

Converter = Callable[[Path, Path], None]
"""Writes the HF folder of a GGUF file: `convert(gguf_path, out_dir)`; `out_dir` exists and is empty."""


def cache_dir() -> Path:
    """apb's cache root: `$APB_CACHE_DIR`, else `$XDG_CACHE_HOME/apb`, else `~/.cache/apb`.

    Read through `read_env` on every call (not at import), so a variable set after import still counts.
    """
    return read_env().cache_dir


def gguf_sha256(path: Path, models_dir: Path) -> str:
    """Full sha256 hex of a GGUF file, remembered in `models_dir/gguf-hashes.json` by (path, size, mtime_ns).

    Hashing costs ~0.15 s for the 98 MB default model and ~1.5 s for a 1 GB GGUF on every run; the
    stat-keyed memo makes a repeat run free, and any edit to the file changes its size or mtime and so forces
    a re-hash.
    """
    stat = path.stat()
    key = str(path.resolve())
    memo_path = models_dir / HASH_CACHE_FILE
    memo = _read_json(memo_path)
    entry = memo.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
        and isinstance(entry.get("sha256"), str)
    ):
        return entry["sha256"]

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    memo = _read_json(memo_path)  # re-read: another process may have added entries meanwhile
    memo[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha}
    with contextlib.suppress(OSError):  # a memo we cannot write only costs a re-hash next time
        _write_json_atomic(memo_path, memo)
    return sha


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an advisory lock so a second converter waits for the first instead of repeating its work.

    Correctness does not depend on it (the atomic rename does that); where `fcntl` is missing we just proceed.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    try:
        fh = lock_path.open("a")
    except OSError as exc:
        raise ApbError(f"cannot write to the apb cache {lock_path.parent}: {exc.strerror or exc}") from None
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def conversion_target(source: ModelSource) -> Path | None:
    """The cache folder a GGUF `source` will be converted into, or None when nothing needs converting (an HF
    folder, or a GGUF already in the cache). Hashes the file (memoised), converts nothing."""
    if source.kind == "hf_dir":
        return None
    models_dir = cache_dir() / "models"
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        return models_dir  # not writable: `prepared_dir` says so
    target = models_dir / gguf_sha256(source.path, models_dir)[:16]
    return None if _is_complete(target) else target


def cache_size(root: Path | None = None) -> int:
    """Bytes on disk under the apb cache (`root`, default `cache_dir()`); 0 when it does not exist."""
    total = 0
    for folder, _, files in os.walk(root or cache_dir()):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def prepare(source: ModelSource, on_convert: Callable[[str], None] | None = None,
            convert: Converter = convert_in_child) -> float:
    """Make sure `source` has its prepared folder; returns the seconds spent converting (0.0 on a cache hit).

    On a miss `on_convert` first gets one line for the user, "converting the model once into <folder> (about
    N s)", N estimated from the file size (the 98 MB default model takes about 20 s on 2 CPU cores).
    """
    target = conversion_target(source)
    if target is None:
        return 0.0
    if on_convert is not None:
        estimate = max(5, round(source.path.stat().st_size / 2**20 * SECONDS_PER_MIB, -1))
        on_convert(f"converting the model once into {target} (about {estimate:g} s; later runs load it in about "
                   "a second)")
    t0 = time.perf_counter()
    prepared_dir(source, convert)
    return time.perf_counter() - t0


def prepared_dir(source: ModelSource, convert: Converter = convert_in_child) -> Path:
    """A plain HF safetensors folder for `source`: the folder itself for hf_dir, else the GGUF converted once.

    Converted folders live in `<cache_dir()>/models/<first 16 hex of the GGUF's sha256>/` and hold
    config.json, model.safetensors (fp32, so CPU fp32 runs equal the de-quantised GGUF exactly),
    generation_config.json and the tokenizer with its chat template. Nothing is written next to the user's
    files. `convert` runs only on a cache miss; the default converts in a spawned child (see
    `convert_in_child`), tests pass `convert_gguf` or a fake to run or count conversions in-process.
    """
    if source.kind == "hf_dir":
        return source.path
    models_dir = cache_dir() / "models"
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApbError(f"cannot create the apb cache {models_dir}: {exc.strerror or exc} (set APB_CACHE_DIR)") from None

    sha16 = gguf_sha256(source.path, models_dir)[:16]
    target = models_dir / sha16
    if _is_complete(target):
        return target
    with _exclusive(models_dir / f".{sha16}.lock"):
        if _is_complete(target):  # another process converted it while we waited for the lock
            return target
        for stale in models_dir.glob(f".tmp-{sha16}-*"):  # left by a killed converter; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():  # not complete: someone tampered with it; replace it
            shutil.rmtree(target, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".tmp-{sha16}-"))
        try:
            convert(source.path, tmp)
            (tmp / "apb-source.json").write_text(
                json.dumps({"gguf": str(source.path), "name": source.name, "converted_unix": time.time()}) + "\n"
            )
            os.rename(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and _is_complete(target):
                return target  # a converter without the lock (another filesystem) won the race
            raise ApbError(f"cannot write the converted model to {models_dir}: {exc.strerror or exc}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
