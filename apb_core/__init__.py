"""apb core: APB distributed long-context prefill and decode (Huang et al., 2025) over H workers."""

__version__ = "0.1.0"
