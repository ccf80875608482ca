"""The paper's concepts in pure torch, no processes: layout, method configuration, compressor, passing,
APB-mask attention and the FLOP model."""
