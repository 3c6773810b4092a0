"""Benchmark scripts: they print figures (ratios against baselines run in the same process
tree), never assert timings. Run them with `python -m flows.benchmarks.<name>`."""
