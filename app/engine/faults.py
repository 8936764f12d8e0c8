"""Fault drills, for chaos drills and tests only: never a field of the production config. They are
switched on through the replicas' environment, BATCHSERVE_FAULTS = JSON {model name: FaultInjection},
set in a test application's `runtime_env`; injected before a device batch on the batch executor,
so they fail exactly where a real model failure would."""

from __future__ import annotations

import os
import time
from typing import Mapping, Optional

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import torch

from app.batching import BatchEntry, count_items
from app.engine.batcher import BeforeBatch


class FaultInjection(BaseModel):
    """Chaos drills and tests only (off by default): make the model misbehave on purpose."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # An item whose text equals this fails inside the model (its batch-mates must not).
    fail_on_text: Optional[str] = None
    # Extra seconds every batch takes, to build queues and overload on a small machine.
    batch_delay_s: float = Field(0.0, ge=0, le=60)
    # A batch of more than this many items raises torch's OutOfMemoryError, as a full device would.
    oom_above_items: Optional[int] = Field(None, ge=1)


FAULTS_ENV = "BATCHSERVE_FAULTS"


def faults_from_env(model: str, environ: Mapping[str, str] = os.environ) -> FaultInjection:
    """The drills set for `model` in BATCHSERVE_FAULTS (none when unset); a malformed value fails
    the replica's start with a message naming the variable."""
    raw = environ.get(FAULTS_ENV)
    if not raw:
        return FaultInjection()
    try:
        return FaultInjection.model_validate(orjson.loads(raw).get(model, {}))
    except (orjson.JSONDecodeError, AttributeError, ValidationError) as e:
        raise ValueError(f"{FAULTS_ENV}: expected JSON {{model name: {{fail_on_text, batch_delay_s, "
                         f"oom_above_items}}}}: {e}") from None


def fault_drill(faults: FaultInjection) -> Optional[BeforeBatch]:
    """The hook for these faults, or None when none is set (then nothing runs per batch)."""
    if not (faults.batch_delay_s or faults.fail_on_text is not None or faults.oom_above_items is not None):
        return None

    def before_batch(entries: list[BatchEntry]) -> None:
        if faults.batch_delay_s:
            time.sleep(faults.batch_delay_s)
        if faults.fail_on_text is not None and any(faults.fail_on_text in (e.inputs.texts or ()) for e in entries):
            raise RuntimeError("injected fault (faults.fail_on_text)")
        if faults.oom_above_items is not None and count_items(entries) > faults.oom_above_items:
            raise torch.OutOfMemoryError(f"injected fault (faults.oom_above_items={faults.oom_above_items})")

    return before_batch
