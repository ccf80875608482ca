"""Named model shapes built with random weights in code: tiny ones for tests, real ones for speed runs.

`PRESETS` is the one table (name -> config kwargs, like gpt-fast's `transformer_configs`); `build_config`
turns an entry into a transformers config and `build_random_model` into a model, with no download.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apb_core.errors import InputError

from .source import check_supported

if TYPE_CHECKING:
    import torch

# The shared shape of the tiny presets (a few ms per forward on CPU); each tiny entry adds its family's fields.
_TINY: dict[str, Any] = {
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
    # SmolLM2-135M's shape (the embedded model's config): bench's default on CPU, where an 8B shape needs 32 GB
    # of fp32 weights per host. Positions go to 128K as in the other presets (RoPE's cost does not depend on it).
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
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


def build_config(preset: str) -> Any:
    """A transformers config for a named preset, built from `PRESETS[preset]` in code (no download).

    Nested dicts are copied, so the config never shares (or mutates) the table's entries.
    """
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    kwargs = {key: (dict(value) if isinstance(value, dict) else value) for key, value in PRESETS[preset].items()}
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
    preset: str,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
) -> Any:
    """A model of a preset's shape with random weights created directly on `device` (eval mode, no grad).

    Used for speed runs of real shapes (no 8B weights can be downloaded here) and for fast tests. Weights are
    allocated on the device under `torch.device(device)`, so an 8B model never passes through host memory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from .load import resolve_dtype  # imported here: `load` imports torch, which `PRESETS` readers do not need

    config = build_config(preset)
    check_supported(config)
    torch_dtype = resolve_dtype(device, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model
