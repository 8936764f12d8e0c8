"""Pick the runner for a model spec."""

from __future__ import annotations

from app.config import ModelSpec
from app.runners.base import ModelRunner


def make_runner(spec: ModelSpec, vocab_size: int) -> ModelRunner:
    from app.runners.local import LocalRunner

    return LocalRunner(spec, vocab_size)
