"""Benchmarks: each ``bench_*.py`` declares what it measures, ``bench_common`` (the harness)
owns the command line, timing and output. Run one as ``python -m benchmarks.bench_x``."""
