"""CPU backends (app/backends/, app/runners/exported.py): ONNX Runtime and OpenVINO give torch's
outputs, the export cache is reused, rebuilt when corrupt, and `auto` says what it picked."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from app.backends.choice import describe_choice, pick_fastest, time_candidates_ms
from app.backends.export_cache import ExportCache
from app.config import ConfigError, ModelSpec, parse_app_args
from app.models.loader import load_tokenizer
from app.runners.exported import BackendRunner
from app.runners.local import LocalRunner
from tests.helpers import tiny_bert_spec

BACKENDS = ("onnxruntime", "openvino")
SHAPES = [(1, 1), (1, 7), (3, 40), (8, 17), (32, 9), (5, 128)]


@pytest.fixture
def serve_log(caplog):
    """caplog on the "ray.serve" logger itself: once Serve has run in this process (the integration
    tests) that logger stops propagating to the root, where caplog listens."""
    log = logging.getLogger("ray.serve")
    log.addHandler(caplog.handler)
    old = log.level
    log.setLevel(logging.INFO)
    yield caplog
    log.removeHandler(caplog.handler)
    log.setLevel(old)


def minilm_doc(backend: dict, **kw) -> dict:
    return {"name": "minilm", "source": {"kind": "packaged"}, "task": "embed", "max_seq_len": 128,
            "batching": {"max_batch_size": 32}, "deployment": {"torch_threads": 2}, "backend": backend, **kw}


def classifier_doc(backend: dict) -> dict:
    return tiny_bert_spec(name="clf", max_seq_len=128, backend=backend, batching={"max_batch_size": 32}, source={
        "kind": "random_init", "architecture": "bert", "seed": 3,
        "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024}})


def _started(doc: dict) -> tuple[BackendRunner, LocalRunner]:
    spec = ModelSpec.model_validate(doc)
    vocab = len(load_tokenizer(spec))
    runner = BackendRunner(spec, vocab)
    runner.start()
    reference = LocalRunner(ModelSpec.model_validate({**doc, "backend": "torch"}), vocab)
    reference.start()
    return runner, reference


def _batch(b: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (b, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, b):  # uneven texts: each later row shorter
        mask[row, max(1, length - row * length // b):] = 0
    return ids * mask, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("model", ["minilm", "classifier"])
def test_backend_outputs_equal_torch_at_every_shape(tmp_path, backend, model):
    doc = (minilm_doc if model == "minilm" else classifier_doc)({"kind": backend, "cache_dir": str(tmp_path)})
    runner, reference = _started(doc)
    assert runner.backend == backend, runner.reason
    assert runner.reference.model is None  # outputs below come from the backend, not torch
    for i, (b, length) in enumerate(SHAPES):
        ids, mask = _batch(b, length, i)
        got, want = runner.infer(ids, mask), reference.infer(ids, mask)
        assert got.shape == want.shape and got.dtype == torch.float32
        assert float((got - want).abs().max()) <= 1e-4, (b, length)


def test_second_start_reuses_the_export_and_a_corrupt_one_is_rebuilt(tmp_path, serve_log):
    doc = minilm_doc({"kind": "openvino", "cache_dir": str(tmp_path)})
    first, reference = _started(doc)
    [onnx] = list(tmp_path.glob("minilm-*/model.onnx"))
    stamp = onnx.stat().st_mtime_ns
    second, _ = _started(doc)
    assert "cached export" in second.reason or onnx.stat().st_mtime_ns == stamp
    assert onnx.stat().st_mtime_ns == stamp  # not exported again

    data = bytearray(onnx.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4096] = b"\x00" * 4096  # a corrupted stretch of weights
    onnx.write_bytes(bytes(data))
    third, _ = _started(doc)
    assert "corrupt" in serve_log.text
    assert third.backend == "openvino"
    ids, mask = _batch(4, 20, 7)
    assert float((third.infer(ids, mask) - reference.infer(ids, mask)).abs().max()) <= 1e-4


def test_a_backend_that_disagrees_with_torch_is_refused_and_torch_serves(tmp_path, serve_log):
    # A tolerance no float computation meets: the backend is refused and torch serves, said in the log.
    doc = minilm_doc({"kind": "onnxruntime", "cache_dir": str(tmp_path), "tolerance": 1e-30})
    runner, reference = _started(doc)
    assert runner.backend == "torch"
    assert "onnxruntime: outputs differ from torch" in runner.reason
    assert "backend torch (asked onnxruntime" in serve_log.text
    ids, mask = _batch(2, 9, 1)
    assert torch.equal(runner.infer(ids, mask), reference.infer(ids, mask))


def test_auto_times_every_installed_backend_and_says_why(tmp_path, monkeypatch):
    import app.runners.exported as exported

    runner, _ = _started(minilm_doc({"kind": "auto", "cache_dir": str(tmp_path)}))
    assert set(runner.timings_ms) == {"torch", *BACKENDS}
    assert runner.backend == min(runner.timings_ms, key=runner.timings_ms.get)
    assert runner.reason.startswith(f"picked {runner.backend} (torch ")
    # Nothing installed: torch, and the reason names the missing packages and the extra.
    monkeypatch.setattr(exported, "installed", lambda name: None)
    bare, _ = _started(minilm_doc({"kind": "auto", "cache_dir": str(tmp_path / "bare")}))
    assert bare.backend == "torch"
    assert "onnxruntime: not installed (pip install -e '.[cpu]')" in bare.reason
    assert not (tmp_path / "bare").exists()  # nothing exported for backends that are not there


def test_threads_follow_the_replica_cpu_share():
    def threads(**deployment):
        return ModelSpec.model_validate(minilm_doc("torch", deployment=deployment)).intra_op_threads(16)

    assert threads(num_cpus=0.5) == 1
    assert threads(num_cpus=3) == 3
    assert threads(num_cpus=2.5) == 3
    assert threads(num_cpus=64) == 16
    assert threads(num_cpus=4, torch_threads=2) == 2


def test_config_shorthand_and_refusals():
    assert ModelSpec.model_validate(minilm_doc("openvino")).backend.kind == "openvino"
    with pytest.raises(ConfigError, match="backend.kind"):
        parse_app_args({"models": [minilm_doc("tensorrt")]})
    gen = {"name": "g", "task": "generate", "max_seq_len": 64, "generation": {"max_new_tokens": 8, "default_max_tokens": 8},
           "source": {"kind": "random_init", "architecture": "llama", "config": {"hidden_size": 32}}, "backend": "auto"}
    with pytest.raises(ConfigError, match="a generator runs on torch"):
        parse_app_args({"models": [gen]})
    with pytest.raises(ConfigError, match="needs backend torch"):
        parse_app_args({"models": [minilm_doc("onnxruntime", parallel={"strategy": "deepspeed_tp"})]})


def test_pick_fastest_and_its_words():
    assert pick_fastest({"torch": 5.0, "onnxruntime": 3.0, "openvino": 4.0}) == "onnxruntime"
    assert pick_fastest({"torch": 3.0, "openvino": 3.0}) == "torch"
    with pytest.raises(ValueError):
        pick_fastest({})
    words = describe_choice("openvino", {"torch": 5.0, "openvino": 2.5}, {"onnxruntime": "not installed"}, (8, 33))
    assert words == "picked openvino (torch 5.0 ms, openvino 2.5 ms per 8x33 batch); not used: onnxruntime: not installed"
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    timed = time_candidates_ms({"a": lambda: count("a"), "b": lambda: count("b")}, rounds=2, reps=3)
    assert set(timed) == {"a", "b"} and calls == {"a": 2 + 6, "b": 2 + 6}


def test_export_cache_rebuilds_what_it_cannot_trust(tmp_path):
    built = []

    def build(path):
        built.append(path)
        path.write_bytes(b"export %d" % len(built))

    cache = ExportCache(tmp_path, "m", "k" * 64)
    path, reused = cache.get("model.onnx", build)
    assert not reused and path.read_bytes() == b"export 1"
    assert cache.get("model.onnx", build) == (path, True) and len(built) == 1
    path.write_bytes(b"export 1 but truncated")  # bytes that no longer match their digest
    assert cache.get("model.onnx", build)[1] is False and len(built) == 2
    sidecar = path.with_name("model.onnx.sha256")
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "key": "other"}))  # built for other weights
    assert cache.get("model.onnx", build)[1] is False and len(built) == 3
    sidecar.write_text("{not json")
    assert cache.get("model.onnx", build)[1] is False and len(built) == 4

    def broken(path):
        path.write_bytes(b"half")
        raise RuntimeError("exporter crashed")

    with pytest.raises(RuntimeError):
        ExportCache(tmp_path, "n", "j" * 64).get("model.onnx", broken)
    assert not list((tmp_path).glob("n-*/model.onnx")) and not list(tmp_path.glob("n-*/.*.tmp"))


def test_probe_outputs_are_what_the_runner_checks(tmp_path):
    from app.runners.exported import probe_batches

    spec = ModelSpec.model_validate(minilm_doc("torch"))
    shapes = [ids.shape for ids, _ in probe_batches(spec, 30522)]
    assert shapes == [(1, 5), (8, 33), (2, 128)]
    ids, mask = probe_batches(spec, 30522)[2]
    assert mask[-1, 64:].sum() == 0 and np.all(ids[-1, 64:] == 0)


def test_length_groups_cut_where_padding_costs_more_than_a_call():
    from app.runners.length_groups import plan_groups, run_length_grouped

    assert plan_groups(np.array([17] * 16 + [12] * 16)) == [(0, 16), (16, 32)]
    assert plan_groups(np.array([9, 9, 8, 8])) == [(0, 4)]  # same 8-token grain: one call
    assert plan_groups(np.array([20, 19])) == [(0, 2)]  # 2 padded tokens are cheaper than a call
    assert plan_groups(np.array([128] + [10] * 31)) == [(0, 1), (1, 32)]
    assert plan_groups(np.array([], dtype=np.int64)) == [(0, 0)]

    calls = []

    def forward(ids, mask):
        calls.append(ids.shape)
        assert mask[:, -1].all()  # each group trimmed to its own longest row
        return (ids * mask).sum(axis=1, keepdims=True).astype(np.float32)

    rng = np.random.default_rng(0)
    lengths = rng.choice([5, 60], size=24)
    mask = (np.arange(60) < lengths[:, None]).astype(np.int64)
    ids = rng.integers(1, 100, size=(24, 60)) * mask
    out = run_length_grouped(forward, ids, mask)
    assert sorted(calls) == sorted([(int((lengths == 60).sum()), 60), (int((lengths == 5).sum()), 5)])
    assert np.array_equal(out[:, 0], (ids * mask).sum(axis=1))  # each row's output back in its place


def test_torch_on_the_cpu_runs_length_groups_with_the_same_outputs():
    spec = ModelSpec.model_validate(minilm_doc("torch"))
    runner = LocalRunner(spec, 30522)
    runner.start()
    ids, mask = _batch(16, 64, 5)
    grouped = runner.infer(ids, mask)
    runner.length_groups = False
    assert float((grouped - runner.infer(ids, mask)).abs().max()) <= 1e-5
