"""Where apb's model comes from: resolve a spec, convert GGUF once, load a transformers model, build presets.

| module    | job                                                                              |
|-----------|----------------------------------------------------------------------------------|
| `source`  | the user's `--model` spec -> `ModelSource`; the config checks (`check_supported`) |
| `gguf`    | the GGUF header reader and the GGUF -> HF folder converter                        |
| `cache`   | the converted-folder cache (`prepared_dir`), keyed by the GGUF's sha256           |
| `load`    | tokenizer, config and weights of a source; the one dtype table (`DTYPES`)         |
| `presets` | named shapes with random weights (`PRESETS`, `build_random_model`)                |

Use it as `from apb_core import models` and call `models.resolve_model(...)` and so on. The names of `load`
are imported on first use (PEP 562 `__getattr__`): `load` imports torch (~1.5 s on 2 CPU cores), and the CLI
checks a `--model` spec with `resolve_model` before anything heavy, so a bad spec fails without that wait.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .cache import Converter, cache_dir, cache_size, conversion_target, gguf_sha256, prepare, prepared_dir
from .gguf import convert_gguf, convert_in_child, gguf_architecture, gguf_context_length, load_gguf_model
from .presets import PRESETS, build_config, build_random_model
from .source import (
    EMBEDDED_INSTALL,
    SUPPORTED_MODEL_TYPES,
    ModelSource,
    check_supported,
    embedded_gguf_path,
    model_window,
    resolve_model,
)

if TYPE_CHECKING:
    from .load import DTYPES, load_config, load_model, load_tokenizer, resolve_dtype

_LAZY = ("DTYPES", "resolve_dtype", "load_tokenizer", "load_config", "load_model")

__all__ = [
    "DTYPES",
    "EMBEDDED_INSTALL",
    "PRESETS",
    "SUPPORTED_MODEL_TYPES",
    "Converter",
    "ModelSource",
    "build_config",
    "build_random_model",
    "cache_dir",
    "cache_size",
    "check_supported",
    "convert_gguf",
    "conversion_target",
    "convert_in_child",
    "embedded_gguf_path",
    "gguf_architecture",
    "gguf_context_length",
    "gguf_sha256",
    "load_config",
    "load_gguf_model",
    "load_model",
    "load_tokenizer",
    "model_window",
    "prepare",
    "prepared_dir",
    "resolve_dtype",
    "resolve_model",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.load"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
