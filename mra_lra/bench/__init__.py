"""Benchmarks: `python -m mra_lra.bench.attention` times every attention against length."""
