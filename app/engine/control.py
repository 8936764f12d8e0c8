"""The one owner of a model's batch cap and wait.

Every source of a change goes through here: the configured batching (bounded by what device
memory allows), a live retune (`user_config`), the adaptive controller's steps, and the cap an
out-of-memory batch leaves behind. Listeners (the Serve batch queue, the metrics) hear every change,
so no one reads the cap back from Serve's private state.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from pydantic import ValidationError

from app.adaptive import BatchingState, ControllerConfig, Observation, step
from app.config import BatchingConfig

logger = logging.getLogger("ray.serve")

Listener = Callable[[float, int], None]  # (wait_s, max_batch_size)


class BatchControl:
    def __init__(self, name: str, config: BatchingConfig, memory_limit: int):
        self.name = name
        self.memory_limit = memory_limit
        self.config = self._bounded(config)  # what the operator asked for, within memory
        self.wait_s = self.config.batch_wait_timeout_s  # in force now (adaptive may move them)
        self.max_batch_size = self.config.max_batch_size
        self._listeners: list[Listener] = []

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)
        listener(self.wait_s, self.max_batch_size)

    def _bounded(self, cfg: BatchingConfig) -> BatchingConfig:
        """Never batch more than device memory allows (the seed formula)."""
        if cfg.max_batch_size <= self.memory_limit:
            return cfg
        logger.warning("model %s: max_batch_size %d exceeds what memory allows (%d); using %d",
                       self.name, cfg.max_batch_size, self.memory_limit, self.memory_limit)
        return cfg.model_copy(update={"max_batch_size": self.memory_limit})

    def _set(self, wait_s: float, max_batch_size: int) -> None:
        self.wait_s, self.max_batch_size = wait_s, max_batch_size
        for listener in self._listeners:
            listener(wait_s, max_batch_size)

    def retune(self, user_config: Optional[dict[str, Any]]) -> BatchingConfig:
        """A live retune; returns the previous config. A bad one is refused naming the fields."""
        try:
            cfg = BatchingConfig.model_validate(user_config or {})
        except ValidationError as e:
            raise ValueError(f"user_config for model {self.name!r}: {e}") from None
        old, self.config = self.config, self._bounded(cfg)
        self._set(self.config.batch_wait_timeout_s, self.config.max_batch_size)
        logger.info("model %s batching retuned: %s", self.name, self.config.model_dump())
        return old

    def lower_for_oom(self, cap: int) -> None:
        """A batch ran out of device memory: cap batches at what fit (until an operator retunes)."""
        if cap >= self.max_batch_size:
            return
        self.memory_limit = min(self.memory_limit, cap)
        self.config = self.config.model_copy(update={"max_batch_size": cap})
        self._set(self.wait_s, cap)
        logger.warning("model %s: out of device memory; batch cap lowered to %d", self.name, cap)

    def adapt(self, observation: Observation) -> bool:
        """One adaptive step on the last window; True when the wait or the cap changed."""
        cfg = self.config
        ctl = ControllerConfig(target_p99_ms=cfg.target_p99_ms, max_wait_s=cfg.max_wait_s,
                               cap_batch_size=cfg.max_batch_size)
        state = BatchingState(self.wait_s, self.max_batch_size)
        decision = step(ctl, state, observation)
        if decision.state == state:
            return False
        self._set(decision.state.wait_s, decision.state.max_batch_size)
        logger.info("model %s adaptive batching: %s", self.name, decision.reason)
        return True
