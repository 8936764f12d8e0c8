"""Encoder forwards on an ONNX export: ONNX Runtime and OpenVINO, each as a callable
(ids [B, L] int64, mask [B, L] int64) -> outputs [B, D] float32, numpy in and out.

`slots` is how many batches may run at once (the replica's max_concurrent_batches): each slot has
its own session (ONNX Runtime) or infer request on its own stream (OpenVINO) with an equal part
of the replica's threads, so two batches in flight do not contend for one thread pool.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import queue
from pathlib import Path
from typing import Callable

import numpy as np

INSTALL_HINT = "pip install -e '.[cpu]'"
BACKENDS = ("onnxruntime", "openvino")
# ONNX Runtime's transformer fusions (attention, LayerNorm, GELU) take a family name; these share BERT's.
_ORT_BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "electra", "camembert", "mpnet", "distilbert"}


def installed(backend: str) -> str | None:
    """The installed version of a backend's package, or None."""
    if importlib.util.find_spec(backend) is None:
        return None
    try:
        return importlib.metadata.version(backend)
    except importlib.metadata.PackageNotFoundError:
        return "?"


class _Pool:
    """Hands each running batch one of `slots` sessions or requests, so none is used by two at once."""

    def __init__(self, items: list):
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for it in items:
            self._free.put(it)

    def run(self, fn: Callable):
        item = self._free.get()
        try:
            return fn(item)
        finally:
            self._free.put(item)


def ort_optimize(onnx_path: Path, model_type: str, out: Path) -> None:
    """ONNX Runtime's transformer optimizer (fused attention, skip-LayerNorm, GELU): 1.1-1.2x the
    plain session's throughput on MiniLM (docs/performance.md "CPU backends")."""
    import logging

    from onnxruntime.transformers import optimizer

    for name in ("fusion_base", "fusion_utils", "onnx_model", "onnx_model_bert", "fusion_skiplayernorm"):
        logging.getLogger(name).setLevel(logging.WARNING)  # one INFO line per fusion otherwise
    family = "bert" if model_type in _ORT_BERT_FAMILY else model_type
    opt = optimizer.optimize_model(str(onnx_path), model_type=family, num_heads=0, hidden_size=0, opt_level=1)
    opt.save_model_to_file(str(out))


class OnnxRuntimeEncoder:
    def __init__(self, onnx_path: Path, threads: int, slots: int):
        import onnxruntime as ort

        per_slot = max(1, threads // slots)
        sessions = []
        for _ in range(slots):
            so = ort.SessionOptions()
            so.intra_op_num_threads = per_slot
            so.inter_op_num_threads = 1
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Idle pool threads sleep instead of spinning: the HTTP layer shares these cores.
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions.append(ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"]))
        self._pool = _Pool(sessions)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._pool.run(lambda s: s.run(None, {"input_ids": ids, "attention_mask": mask})[0])


class OpenVinoEncoder:
    def __init__(self, onnx_path: Path, threads: int, slots: int):
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": max(threads, slots),
            "NUM_STREAMS": slots,
            "PERFORMANCE_HINT": "LATENCY" if slots == 1 else "THROUGHPUT",
            # fp32, as the model was trained and as torch runs it: on CPUs with bf16 units OpenVINO
            # otherwise picks bf16, whose outputs differ by ~1e-2.
            "INFERENCE_PRECISION_HINT": "f32",
            # Replicas and the HTTP layer share the host's cores: no thread is pinned to one.
            "ENABLE_CPU_PINNING": False,
        }
        self._compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        self._pool = _Pool([self._compiled.create_infer_request() for _ in range(slots)])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        def run(req) -> np.ndarray:
            req.infer({"input_ids": ids, "attention_mask": mask})
            return req.get_output_tensor(0).data.copy()  # the request's buffer is reused by the next batch

        return self._pool.run(run)
