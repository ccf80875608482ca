"""The methods APB is measured against: ring and Ulysses attention (prefill strategies of the same engine)
and plain transformers."""
