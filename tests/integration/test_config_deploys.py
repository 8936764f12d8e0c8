"""serve_config.yaml changes as an operator makes them: live batching retune, and a bad config."""

from __future__ import annotations

import copy

import pytest
from ray._common.test_utils import wait_for_condition

from tests.helpers import serve_config
from tests.integration.conftest import app_status, deploy_config

pytestmark = pytest.mark.integration


def _minilm(client) -> dict:
    return next(m for m in client.get("/v1/models").json()["data"] if m["name"] == "minilm")


def test_user_config_retunes_without_restart(client):
    before = _minilm(client)
    new = {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "max_concurrent_batches": 1}
    config = serve_config()
    config["applications"][0]["deployments"] = [{"name": "minilm", "user_config": new}]
    try:
        deploy_config(config)
        wait_for_condition(lambda: new.items() <= _minilm(client)["batching"].items(), timeout=60)
        after = _minilm(client)
        assert after["replica"] == before["replica"], "the replica was restarted instead of retuned"
        texts = [f"t{i}" for i in range(20)]
        r = client.post("/v1/models/minilm:predict", json={"instances": texts})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 20
        assert int(r.headers["x-batch-size"]) <= 8
    finally:
        deploy_config(serve_config())
        wait_for_condition(lambda: _minilm(client)["batching"] == before["batching"], timeout=60)
    assert _minilm(client)["replica"] == before["replica"]


def test_bad_config_fails_deploy_naming_the_field(client):
    config = serve_config()
    broken = copy.deepcopy(config["applications"][0])
    broken["name"], broken["route_prefix"] = "broken", "/broken"
    broken["args"]["models"][0]["batching"]["max_batch_szie"] = 64
    config["applications"].append(broken)
    try:
        deploy_config(config)

        def failed() -> bool:
            status = app_status("broken")
            return status is not None and status.status == "DEPLOY_FAILED"

        # Serve builds a failing app four times (its task retries) before DEPLOY_FAILED.
        wait_for_condition(failed, timeout=120)
        message = app_status("broken").message
        assert "models[0].batching.max_batch_szie: unknown field" in message, message
        # The good application kept serving.
        assert client.post("/v1/models/minilm:predict", json={"instances": ["still up"]}).status_code == 200
    finally:
        deploy_config(serve_config())
        wait_for_condition(lambda: app_status("broken") is None, timeout=60)
