"""Benchmark suite: `python -m benchmarks.run` measures, `report.py` writes RESULTS.md, `compare.py` checks."""
