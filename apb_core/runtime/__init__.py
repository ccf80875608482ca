"""One host's runtime: the engine (a transformers model with APB attention), its KV cache, the prompt, sampling,
and `generate`, the only prefill / query phase / decode loop (ask, bench and eval all drive it)."""
