"""Benchmark harness: speculative vs autoregressive on the same runtime, side by side."""
