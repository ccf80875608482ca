"""Load a resolved model: its tokenizer, its checked config, and its weights as an eval-mode transformers model.

Every transformers call uses `local_files_only=True`, so nothing here touches the network. GGUF sources are
read from their converted folder (`prepared_dir`). This is the one module of `apb_core.models` that imports
torch at import time (for `DTYPES`); the package loads it only when one of its names is first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from apb_core.errors import InputError

from .cache import prepared_dir
from .source import ModelSource, check_supported, one_line

# Every dtype name apb accepts (`--dtype`, a worker's spec), to the torch dtype it means.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}  # fmt: skip


def resolve_dtype(device: str | torch.device, dtype: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype for `dtype` (a torch dtype, a `DTYPES` name in any case, None or "auto") on `device`.

    None/"auto" is fp32 on CPU (bf16 matmuls are slow there and fp32 matches the GGUF exactly) and bf16 on
    accelerators. An unknown name raises `InputError`.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r}: use fp32, bf16 or fp16")


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer (with chat template) of `source`, read from its prepared folder, offline."""
    from transformers import AutoTokenizer

    folder = prepared_dir(source)
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot load a tokenizer from {folder}: {one_line(exc)}") from None


def load_config(source: ModelSource | Path) -> Any:
    """The transformers config of `source` (or of a prepared folder), checked with `check_supported`.

    Checked before any weights are read, so an unsupported model fails in a second, not after a long load.
    """
    from transformers import AutoConfig

    folder = source if isinstance(source, Path) else prepared_dir(source)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise InputError(f"cannot read {folder / 'config.json'}: {one_line(exc)}") from None
    check_supported(config)
    return config


def load_model(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Any:
    """Load `source` as an eval-mode, no-grad transformers causal LM on `device`.

    `dtype` defaults to fp32 on CPU and bf16 elsewhere. `attn_implementation` may be a name the engine
    registered with transformers' `AttentionInterface`: `from_pretrained` accepts any registered name.
    Safetensors only, unless the source was resolved with `allow_pickle`.
    """
    from transformers import AutoModelForCausalLM

    folder = prepared_dir(source)
    config = load_config(folder)
    torch_dtype = resolve_dtype(device, dtype)
    kwargs: dict[str, Any] = {"config": config, "dtype": torch_dtype, "local_files_only": True}
    kwargs["use_safetensors"] = None if source.allow_pickle else True
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}  # load shards straight onto the device
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except OSError as exc:
        raise InputError(f"cannot load model weights from {folder}: {one_line(exc)}") from None
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model.eval()
    model.requires_grad_(False)
    return model
