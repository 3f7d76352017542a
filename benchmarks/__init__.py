"""Measurements, each runnable as `python -m benchmarks.<name>`: `throughput` (`es-serve bench`: ES
generation and training steps against pure inference, beside the PEFT-file and naive full-rank ways;
one process per configuration in `case`, the peers in `peers`) and `noise_merge` (noise generation and
merge cost); results in benchmarks/results/."""
