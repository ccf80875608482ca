"""`apb bench`: APB against one-host exact attention, ring, Ulysses, Star and plain transformers, timed through
the same runtime `apb ask` uses (host.py: one host's timing; runner.py: the run; report.py: the rows)."""

from apb_core.bench.report import EXACT_METHODS, REFERENCE
from apb_core.bench.runner import DEFAULT_METHODS, METHODS, BenchConfig, BenchReport, model_dims, run_bench

__all__ = ["DEFAULT_METHODS", "EXACT_METHODS", "METHODS", "REFERENCE", "BenchConfig", "BenchReport", "model_dims",
           "run_bench"]
