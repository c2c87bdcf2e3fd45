"""Benchmarks and their plain baselines (a pandas pipeline, a plain PyTorch loop, a plain FastAPI
server). Fenced: nothing outside this package imports it; ``jobs/bench_*.py`` run it."""
