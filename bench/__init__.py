"""The benchmark lab, outside the service's wheel: `python -m bench load ...` from the repo root."""
