"""Benchmarks, run from the repository root as `python -m bench.NAME`; each writes bench/results/NAME.json and .md."""
