"""GGUF files: read the architecture from the header, and convert a GGUF model into a plain HF folder.

transformers loads a GGUF file by de-quantising every tensor, which takes 15-70 s per run; `convert_gguf` does
it once and `apb_core.models.cache` keeps the result. `convert_in_child` runs the conversion in a spawned
process, which is what the cache uses outside the tests.
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import struct
from pathlib import Path
from typing import IO, Any

from apb_core.errors import ApbError, InputError

from .source import GGUF_MAGIC, SUPPORTED_MODEL_TYPES, check_supported, one_line

# GGUF metadata value types (gguf spec): fixed sizes of the scalar ones; 8 = string, 9 = array.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path, max_keys: int = 64) -> str | None:
    """The `general.architecture` of a GGUF (v2+) file, read from the first metadata keys only.

    `gguf.GGUFReader` parses every tensor record first (2.4 s for the 98 MB default model); the architecture
    key comes first in files written by llama.cpp, so reading a few keys answers in microseconds. Returns None
    when the header cannot be read this way; the full load then reports the problem.
    """
    value = _gguf_value(path, lambda key: key == b"general.architecture", max_keys)
    return value if isinstance(value, str) else None


def gguf_context_length(path: Path, max_keys: int = 64) -> int | None:
    """The `<architecture>.context_length` of a GGUF file (the window its config will have), from the header's
    first keys; None when it is not there."""
    value = _gguf_value(path, lambda key: key.endswith(b".context_length"), max_keys)
    return value if isinstance(value, int) else None


_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}


def _gguf_value(path: Path, wanted, max_keys: int) -> str | int | None:
    """The first metadata value (a string or an integer) whose key `wanted(key)` accepts, else None."""

    def read(fh: IO[bytes], n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def skip_value(fh: IO[bytes], vtype: int) -> None:
        if vtype in _GGUF_SCALAR_SIZES:
            read(fh, _GGUF_SCALAR_SIZES[vtype])
        elif vtype == 8:
            (length,) = struct.unpack("<Q", read(fh, 8))
            fh.seek(length, os.SEEK_CUR)
        elif vtype == 9:
            elem_type, count = struct.unpack("<IQ", read(fh, 12))
            if elem_type in _GGUF_SCALAR_SIZES:
                fh.seek(count * _GGUF_SCALAR_SIZES[elem_type], os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip_value(fh, elem_type)
        else:
            raise ValueError(f"unknown GGUF value type {vtype}")

    try:
        with path.open("rb") as fh:
            magic, version = struct.unpack("<4sI", read(fh, 8))
            if magic != GGUF_MAGIC or version < 2:
                return None
            _tensor_count, kv_count = struct.unpack("<QQ", read(fh, 16))
            for _ in range(min(kv_count, max_keys)):
                (key_len,) = struct.unpack("<Q", read(fh, 8))
                key = read(fh, key_len)
                (vtype,) = struct.unpack("<I", read(fh, 4))
                if wanted(key) and vtype == 8:
                    (length,) = struct.unpack("<Q", read(fh, 8))
                    return read(fh, length).decode("utf-8", "replace")
                if wanted(key) and vtype in _GGUF_INTS:
                    return struct.unpack(_GGUF_INTS[vtype], read(fh, _GGUF_SCALAR_SIZES[vtype]))[0]
                skip_value(fh, vtype)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def load_gguf_model(gguf_path: Path) -> Any:
    """De-quantise a GGUF file into a dense fp32 transformers model (slow: what the cache exists to skip)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.2x can keep GGUF weights packed; ask for plain dense tensors explicitly
        from transformers.utils.quantization_config import GgufConfig

        if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:
        pass
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent),
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            local_files_only=True,
            **kwargs,
        )
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot read GGUF model {gguf_path.name}: {one_line(exc)}") from None
    packed = [name for name, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise ApbError(f"transformers kept {len(packed)} GGUF tensors packed (e.g. {packed[0]}); cannot convert")
    return model


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a GGUF model as an HF folder: fp32 safetensors, config without the GGUF quantisation, tokenizer.

    transformers refuses `save_pretrained` on a GGUF-loaded model ("quantized with gguf, not serializable"),
    so the de-quantised state dict is copied into a fresh model built from the same config. This runs torch
    compute in the calling process; `convert_in_child` is the same conversion in a spawned process.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(gguf_path)
    if arch is not None and arch not in SUPPORTED_MODEL_TYPES:
        raise InputError(f"unsupported GGUF architecture {arch!r}: apb runs {', '.join(SUPPORTED_MODEL_TYPES)} models")

    loaded = load_gguf_model(gguf_path)
    config = loaded.config
    check_supported(config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    del loaded
    fresh.save_pretrained(str(out_dir))

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True
        )
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot read the tokenizer in GGUF model {gguf_path.name}: {one_line(exc)}") from None
    tokenizer.save_pretrained(str(out_dir))


def _convert_child(gguf_path: Path, out_dir: Path, errors: Any) -> None:
    """The spawned child's body: convert, and report success ("") or the error as one line to the parent.

    Its stderr is the user's terminal: transformers' loading bars and warnings are switched off (the parent
    prints one line of its own about the conversion), and fd 2 goes to /dev/null unless APB_DEBUG is set.
    """
    quiet_child()
    try:
        convert_gguf(gguf_path, out_dir)
    except BaseException as exc:  # report as one line to the parent
        errors.put(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}" if not isinstance(exc, ApbError)
                   else str(exc))
        raise SystemExit(1) from None
    errors.put("")


def quiet_child() -> None:
    """Silence this (spawned) process's third-party progress output: tqdm and hub bars, transformers logging."""
    from apb_core.dist.env import read_env

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # settings for huggingface_hub and tqdm, not apb's
    os.environ["TQDM_DISABLE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if not read_env().debug:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)


def convert_in_child(gguf_path: Path, out_dir: Path) -> None:
    """Convert in a spawned process so the caller never runs torch compute: it can then fork CPU workers
    safely (OpenMP thread pools do not survive fork), and the GGUF's de-quantised copy is freed at once."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    proc = ctx.Process(target=_convert_child, args=(gguf_path, out_dir, errors), name="apb-convert")
    proc.start()
    try:
        proc.join()
    except BaseException:
        proc.kill()
        raise
    message = errors.get() if not errors.empty() else f"exit code {proc.exitcode}"
    if proc.exitcode != 0 or message:
        raise ApbError(f"converting {gguf_path.name} failed: {message or f'exit code {proc.exitcode}'}")
