"""Fused mode (the model server is the HTTP ingress) answers exactly as the routed path does."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from ray._common.test_utils import wait_for_condition

from tests.helpers import serve_config
from tests.integration.conftest import app_entry, deploy_config, extra_app

pytestmark = pytest.mark.integration

TEXTS = ["a short one", "Dynamic batching trades a little latency for a lot of throughput.", "ünïcode ✓", "x " * 200]


def _repo_model(name: str) -> dict:
    return next(m for m in serve_config()["applications"][0]["args"]["models"] if m["name"] == name)


@pytest.mark.parametrize("model", ["bert-classifier", "minilm"])
def test_fused_outputs_equal_routed(base_url, model):
    spec = _repo_model(model)
    with extra_app(base_url, app_entry("fused", [spec], ingress={"mode": "fused"})) as url:
        with httpx.Client(timeout=60) as c:
            routed = c.post(f"{base_url}/v1/models/{model}:predict", json={"instances": TEXTS})
            fused = c.post(f"{url}/v1/models/{model}:predict", json={"instances": TEXTS})
            assert routed.status_code == fused.status_code == 200, fused.text
            a, b = routed.json()["predictions"], fused.json()["predictions"]
            if model == "bert-classifier":
                assert [p["label"] for p in a] == [p["label"] for p in b]
                a, b = [p["probabilities"] for p in a], [p["probabilities"] for p in b]
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
            # The v2 route, the model list and the error mapping are the same code in both modes.
            v2 = c.post(f"{url}/v2/models/{model}/infer",
                        json={"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]})
            assert v2.status_code == 200 and v2.headers["x-replica"]
            assert c.post(f"{url}/v1/models/{model}:predict", json={"instances": []}).status_code == 400
            assert c.post(f"{url}/v1/models/other:predict", json={"instances": ["x"]}).status_code == 404
            assert [m["name"] for m in c.get(f"{url}/v1/models").json()["data"]] == [model]


def test_fused_retunes_live_through_user_config(base_url):
    spec = _repo_model("bert-classifier")
    app = app_entry("fusedtune", [spec], ingress={"mode": "fused"})
    with extra_app(base_url, app) as url:
        def info() -> dict:
            return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]

        before = info()
        config = serve_config()
        new = {"max_batch_size": 4, "batch_wait_timeout_s": 0.02, "max_concurrent_batches": 1}
        config["applications"].append({**app, "deployments": [{"name": "bert-classifier", "user_config": new}]})
        deploy_config(config)
        wait_for_condition(lambda: new.items() <= info()["batching"].items(), timeout=60)
        assert info()["replica"] == before["replica"], "the replica was restarted instead of retuned"
        r = httpx.post(f"{url}/v1/models/bert-classifier:predict", json={"instances": [f"t{i}" for i in range(10)]},
                       timeout=30)
        assert r.status_code == 200 and int(r.headers["x-batch-size"]) <= 4


def test_fast_routes_answer_exactly_as_fastapi_does(base_url):
    """`ingress.fast_routes` (on in the repo config) answers the inference routes ahead of FastAPI:
    the same bodies, statuses and headers as with it off, good requests and bad ones alike."""
    # One backend for both apps: `auto` times the installed ones at start, and two apps may pick two
    # whose outputs differ by ~1e-7, which says nothing about the routes this test compares.
    spec = {**_repo_model("bert-classifier"), "backend": "torch"}
    texts = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a b", "c"]}]}
    binary = {**texts, "parameters": {"binary_data_output": True}}
    cases = [
        ("/v2/models/bert-classifier/infer", {"json": texts}),
        ("/v2/models/bert-classifier/infer", {"json": binary}),
        ("/v1/models/bert-classifier:predict", {"json": {"instances": ["x y", "z"]}}),
        ("/v1/models/bert-classifier:predict", {"json": {"instances": []}}),  # 400
        ("/v2/models/bert-classifier/infer", {"content": b"{not json"}),  # 400
        ("/v2/models/bert-classifier/infer", {"json": {"inputs": [{"name": "text", "datatype": "BYTES",
                                                                    "shape": [1], "data": ["x" * 2_000_000]}]}}),  # 413
        ("/v2/models/nope/infer", {"json": texts}),  # 404
        ("/v1/models/nope:predict", {"json": {"instances": ["x"]}}),  # 404
    ]
    fast_app = app_entry("fastroutes", [spec], ingress={"mode": "fused", "fast_routes": True})
    slow_app = app_entry("fastapiroutes", [spec], ingress={"mode": "fused", "fast_routes": False})
    with extra_app(base_url, fast_app) as fast_url, extra_app(base_url, slow_app) as slow_url:
        with httpx.Client(timeout=60) as c:
            for path, kwargs in cases:
                a, b = c.post(fast_url + path, **kwargs), c.post(slow_url + path, **kwargs)
                assert a.status_code == b.status_code, (path, a.text, b.text)
                assert a.headers["content-type"] == b.headers["content-type"], path
                if a.status_code != 200:
                    assert a.json() == b.json(), path
                    continue
                assert a.headers.get("inference-header-content-length") == b.headers.get(
                    "inference-header-content-length"), path
                if path.startswith("/v1"):
                    assert a.json() == b.json(), path
                elif "inference-header-content-length" in a.headers:
                    assert a.content == b.content, path  # same weights (seed), same bytes
                else:
                    assert a.json()["outputs"] == b.json()["outputs"], path
            # Both count the requests under the route's template (the metrics middleware sees both).
            assert c.get(f"{fast_url}/v2/health/ready").status_code == 200


@pytest.mark.parametrize("transport", ["handle", "direct"])
def test_gathered_calls_answer_as_one_call_per_request_does(base_url, transport):
    """`ingress.gather` (the front-end/engine split): concurrent requests leave the ingress as few
    merged calls of token ids, yet each gets the answer the one-call-per-request path gives, and a
    bad request among them fails alone with its own status; through Serve handles or over the
    direct link to the model server."""
    import concurrent.futures

    # A slow batch keeps the first call out long enough for the others to gather behind it.
    spec = {**_repo_model("bert-classifier"), "faults": {"batch_delay_s": 0.5}}
    gather = {"max_items": 64, "max_calls_in_flight": 1, "transport": transport}
    app = app_entry(f"gathered{transport}", [spec], ingress={"mode": "routed", "gather": gather})
    texts = [f"{TEXTS[i % len(TEXTS)]} {i}" for i in range(24)]
    bad_ids = {"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], "data": [101, 10**7]}]}
    with extra_app(base_url, app) as url, httpx.Client(timeout=60) as c:
        plain = c.post(f"{base_url}/v1/models/bert-classifier:predict", json={"instances": texts})
        assert plain.status_code == 200, plain.text

        def one(i: int) -> httpx.Response:
            if i == len(texts):
                return c.post(f"{url}/v2/models/bert-classifier/infer", json=bad_ids)
            return c.post(f"{url}/v1/models/bert-classifier:predict", json={"instances": [texts[i]]})

        def concurrently(n: int) -> list[httpx.Response]:
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                return list(pool.map(one, range(n)))

        # Good requests only: they share calls, and each gets its own answer.
        answers = concurrently(len(texts))
        assert [a.status_code for a in answers] == [200] * len(texts), [a.text for a in answers if a.status_code != 200]
        got = [a.json()["predictions"][0] for a in answers]
        want = plain.json()["predictions"]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        np.testing.assert_allclose([p["probabilities"] for p in got], [p["probabilities"] for p in want],
                                   rtol=1e-4, atol=1e-5)
        assert max(int(a.headers["x-gathered"]) for a in answers) > 1
        assert max(int(a.headers["x-batch-size"]) for a in answers) > 1
        if transport == "direct":
            # The first call goes through the handle while the link is dialled; the rest go direct.
            links = [a.headers["x-link"] for a in answers]
            assert set(links) <= {"direct", "handle"} and "direct" in links, links
        else:
            assert all("x-link" not in a.headers for a in answers)
        # With a bad request among them: it fails alone (a merged call holding it is retried one
        # request per call), the others are answered as before.
        answers = concurrently(len(texts) + 1)
        bad = answers.pop()
        assert bad.status_code == 400 and "token id 10000000" in bad.text
        assert [a.status_code for a in answers] == [200] * len(texts), [a.text for a in answers if a.status_code != 200]
        np.testing.assert_allclose([a.json()["predictions"][0]["probabilities"] for a in answers],
                                   [p["probabilities"] for p in want], rtol=1e-4, atol=1e-5)
        assert "x-gathered" not in plain.headers
