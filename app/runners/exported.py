"""An encoder on the CPU through an ONNX export (ONNX Runtime or OpenVINO), or on torch where the
spec says `auto` and torch is fastest, or where no backend agrees with torch.

Start: build the torch head (the reference), export it once (app/backends/export_cache.py), open
each wanted backend, and check its outputs against torch on probe batches (small, mid-size,
full-length, with padding). A backend that differs by more than `backend.tolerance` is refused with
a log line; a cached export that fails the check is rebuilt once before the backend is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import torch

from app.backends.choice import describe_choice, pick_fastest, time_candidates_ms
from app.backends.engines import BACKENDS, INSTALL_HINT, OnnxRuntimeEncoder, OpenVinoEncoder, installed, ort_optimize
from app.backends.export_cache import ExportCache, cache_root, content_key
from app.backends.onnx_export import EXPORTER, export_onnx
from app.config import ModelSpec
from app.models.loader import ModelLoadError
from app.runners.base import ModelRunner
from app.runners.length_groups import run_length_grouped
from app.runners.local import LocalRunner

logger = logging.getLogger("ray.serve")

Forward = Callable[[np.ndarray, np.ndarray], np.ndarray]


def probe_batches(spec: ModelSpec, vocab_size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seeded id batches at the shapes the batcher forms at its extremes and in between, the last
    rows padded (mask 0) as a batch of uneven texts is."""
    rng = np.random.default_rng(seed)
    cap, longest = spec.batching.max_batch_size, spec.max_seq_len
    shapes = [(1, 5), (min(cap, 8), min(longest, 33)), (min(cap, 2), longest)]
    out = []
    for b, length in shapes:
        ids = rng.integers(1000 if vocab_size > 2000 else 1, vocab_size, size=(b, length), dtype=np.int64)
        mask = np.ones_like(ids)
        if b > 1:
            mask[-1, length // 2:] = 0
            ids[-1, length // 2:] = 0
        out.append((ids, mask))
    return out


def max_abs_error(forward: Forward, expected: list[np.ndarray], batches: list[tuple[np.ndarray, np.ndarray]]) -> float:
    return max(float(np.abs(forward(ids, mask) - want).max()) for (ids, mask), want in zip(batches, expected))


class BackendRunner(ModelRunner):
    concurrent_calls = True  # a session (infer request) per lane: _engine
    strategy = "replicated"

    def __init__(self, spec: ModelSpec, vocab_size: int):
        self.spec = spec
        self.vocab_size = vocab_size
        self.reference = LocalRunner(spec, vocab_size)
        self.backend = "torch"
        self.reason = ""
        self.timings_ms: dict[str, float] = {}
        self.threads = spec.intra_op_threads(os.cpu_count() or 1)
        self._forward: Forward | None = None
        self.length_groups = True  # as the torch runner does on the CPU (app/runners/length_groups.py)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        self.reference.start()
        kind = self.spec.backend.kind
        if self.reference.device.type != "cpu":
            if kind != "auto":
                raise ModelLoadError(f"backend: {kind!r} runs on the CPU, and this replica's device is "
                                     f"{self.reference.device}; set device: cpu, or backend: auto or torch")
            self.reason = f"picked torch (device {self.reference.device})"
            self._log()
            return
        wanted = BACKENDS if kind == "auto" else () if kind == "torch" else (kind,)
        engines, refused = self._open(wanted)
        probe = probe_batches(self.spec, self.vocab_size)[1]
        if kind == "auto":
            forwards = {"torch": lambda: self._torch_forward(*probe)}
            forwards.update({name: (lambda engine=engine: engine(*probe)) for name, engine in engines.items()})
            self.timings_ms = time_candidates_ms(forwards)
            self.backend = pick_fastest(self.timings_ms)
        elif engines:
            self.backend = kind
        self.reason = describe_choice(self.backend, self.timings_ms, refused, probe[0].shape)
        if self.backend != "torch":
            self._forward = engines[self.backend]
            self.reference.model = None  # outputs come from the backend now; free the torch copy
        self._log()

    def _log(self) -> None:
        log = logger.warning if self.spec.backend.kind not in ("auto", self.backend) else logger.info
        log("model %s: backend %s (asked %s, %d threads): %s", self.spec.name, self.backend,
            self.spec.backend.kind, self.threads, self.reason)

    @torch.inference_mode()
    def _torch_forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Torch on the whole batch as given (no length groups), as the backends are timed and checked."""
        return self.reference._cpu_forward(ids, mask)

    def _open(self, wanted: tuple[str, ...]) -> tuple[dict[str, Forward], dict[str, str]]:
        engines: dict[str, Forward] = {}
        refused: dict[str, str] = {}
        missing = [n for n in wanted if installed(n) is None]
        for name in missing:
            refused[name] = f"not installed ({INSTALL_HINT})"
        if len(missing) == len(wanted):  # nothing to export for (torch only, or no backend installed)
            return engines, refused
        model = self.reference.model
        assert model is not None
        config_json = json.dumps(self._hf_config().to_dict(), sort_keys=True, default=str)
        cache = ExportCache(cache_root(self.spec.backend.cache_dir), self.spec.name,
                            content_key(model, config_json, EXPORTER))
        batches = probe_batches(self.spec, self.vocab_size)
        expected = [self._torch_forward(ids, mask) for ids, mask in batches]
        for name in wanted:
            if name in missing:
                continue
            try:
                engines[name], note = self._open_checked(name, cache, batches, expected)
                logger.info("model %s: %s ready (%s)", self.spec.name, name, note)
            except Exception as e:  # a backend that cannot serve this model is refused, never fatal
                refused[name] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        return engines, refused

    def _open_checked(self, name: str, cache: ExportCache, batches, expected) -> tuple[Forward, str]:
        """The backend on the cached export, checked against torch; a cached export that fails the
        check (or does not open) is rebuilt once and checked again."""
        tolerance = self.spec.backend.tolerance
        for force in (False, True):
            t0 = time.perf_counter()
            try:
                path, reused = self._artifact(name, cache, force)
                engine = self._engine(name, path)
            except Exception:
                if force:
                    raise
                logger.warning("model %s: %s failed to open the cached export; rebuilding it", self.spec.name, name)
                continue
            err = max_abs_error(engine, expected, batches)
            note = (f"{'cached export' if reused else 'exported'} {path.name}, max |diff| vs torch {err:.1e}, "
                    f"{time.perf_counter() - t0:.1f}s")
            if err <= tolerance:
                return engine, note
            if not reused or force:
                raise ValueError(f"outputs differ from torch by {err:.1e} (> tolerance {tolerance:g})")
            logger.warning("model %s: %s on the cached export differs from torch by %.1e; rebuilding it",
                           self.spec.name, name, err)
        raise AssertionError("unreachable")

    def _artifact(self, name: str, cache: ExportCache, force: bool):
        onnx_path, reused = cache.get("model.onnx", lambda tmp: export_onnx(self.reference.model, tmp), force)
        if name != "onnxruntime":
            return onnx_path, reused
        version = installed("onnxruntime")
        model_type = str(getattr(self._hf_config(), "model_type", ""))
        try:
            return cache.get(f"model.ort-{version}.onnx", lambda tmp: ort_optimize(onnx_path, model_type, tmp), force)
        except Exception as e:  # a family the optimizer does not know: the plain export still runs
            logger.info("model %s: onnxruntime's transformer optimizer skipped (%s)", self.spec.name, e)
            return onnx_path, reused

    def _hf_config(self):
        model = self.reference.model
        return model.encoder.config if hasattr(model, "encoder") else model.classifier.config

    def _engine(self, name: str, path) -> Forward:
        # A session (or infer request on its own stream) per device batch that may run at once, both
        # lanes' (coalesce.py): with fewer OpenVINO streams than batches, a realtime batch waits for
        # the bulk one on its stream (realtime p99 under bulk 3.18x alone against 1.61x, same run,
        # docs/performance.md "Traffic classes").
        slots = 2 * self.spec.batching.max_concurrent_batches
        return (OnnxRuntimeEncoder if name == "onnxruntime" else OpenVinoEncoder)(path, self.threads, slots)

    # ------------------------------------------------------------------ serve

    def infer(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self._forward is None:
            return self.reference.infer(input_ids, attention_mask)
        ids = input_ids.numpy().astype(np.int64, copy=False)
        mask = attention_mask.numpy().astype(np.int64, copy=False)
        if not self.length_groups:
            return torch.from_numpy(self._forward(ids, mask))
        return torch.from_numpy(run_length_grouped(self._forward, ids, mask))

    def check_health(self) -> None:
        if self._forward is None:
            self.reference.check_health()

    def shutdown(self) -> None:
        self._forward = None
        self.reference.shutdown()

    def measure_per_sample_bytes(self, seq_len: int):
        return self.reference.measure_per_sample_bytes(seq_len) if self._forward is None else None

    def free_device_bytes(self):
        return self.reference.free_device_bytes() if self._forward is None else None

    def release_cached_memory(self) -> None:
        self.reference.release_cached_memory()

    def describe(self) -> dict[str, Any]:
        return {**self.reference.describe(), "backend": self.backend, "backend_asked": self.spec.backend.kind,
                "backend_reason": self.reason, "backend_ms_per_batch": self.timings_ms, "threads": self.threads}
