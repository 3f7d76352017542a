"""Measurements, each runnable as `python -m benchmarks.<name>`: `throughput` (ES generation against
pure inference) and `noise_merge` (noise generation and merge cost); results in benchmarks/results/."""
