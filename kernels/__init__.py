"""Attention kernels for apb: fast paths that also return the log-sum-exp, and a plain reference.

Named `kernels` as the project layout asks; it is NOT the Hugging Face `kernels` package (transformers looks
that one up by its distribution metadata, which this package does not have; tests/test_model.py proves it).
"""

from kernels.reference import reference_attention
from kernels.sdpa_lse import DecodeAttention, attention_with_lse, backend_name

__all__ = ["DecodeAttention", "attention_with_lse", "backend_name", "reference_attention"]
