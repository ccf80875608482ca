"""Fused RMSNorm for transformers' decoder models: one torch `rms_norm` op instead of the module's chain of
elementwise kernels.

Why: transformers' RMSNorm (Llama, Qwen2/3, Mistral) runs as 7-8 small kernels (upcast, square, mean, add,
rsqrt, multiply, downcast, weight); a decode step of a 32-layer model has 65 of them, a large part of the
~1000 small kernels that take ~2.4 ms of an 11.8 ms CUDA-graph step at 128K on an H200 (docs/benchmarks.md).
The fused forward keeps the module's arithmetic: normalise in fp32, round to the input dtype, then multiply by
the weight in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# classes whose forward is weight * (x_fp32 * rsqrt(mean(x_fp32²) + eps)).to(x.dtype) (Gemma's 1 + weight is not)
FUSABLE = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"})


def _fused_forward(module: torch.nn.Module):
    weight, eps = module.weight, module.variance_epsilon
    shape = (weight.shape[-1],)

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        return weight * F.rms_norm(hidden, shape, None, eps)  # computes in fp32, returns hidden's dtype

    return forward


def fuse_norms(model: torch.nn.Module) -> int:
    """Give every fusable RMSNorm of `model` the fused forward (an instance attribute: `unfuse_norms` undoes
    it). Returns how many modules changed."""
    count = 0
    for module in model.modules():
        if type(module).__name__ in FUSABLE and "forward" not in vars(module):
            module.forward = _fused_forward(module)
            count += 1
    return count


def unfuse_norms(model: torch.nn.Module) -> int:
    """Back to the modules' own forward. Returns how many modules changed."""
    count = 0
    for module in model.modules():
        if "forward" in vars(module):
            del module.forward
            count += 1
    return count
