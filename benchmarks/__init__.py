"""Measurements: `python -m benchmarks.run` (or `make bench`) writes benchmarks/results/*.json and BENCHMARKS.md."""
