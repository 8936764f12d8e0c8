"""Benchmark tools: `python -m app.bench load ...`."""
