"""An encoder on pipeline stages of tensor-parallel groups (tp=2 x pp=2, app/runners/stage_pipeline.py)
over the real HTTP path: each stage's bundle asks 2 logical GPUs, so on the test cluster (2 per
worker) the stages land on different worker nodes; CPU compute and gloo where there is no CUDA.
Outputs equal the unsplit model's; a killed rank fails what is in flight with 503 at once, requests
that arrive while no gang is up get 503 within the replica wait, the gang is replaced, and no process
or /dev/shm file of the old one is left."""

from __future__ import annotations

import asyncio
import glob
import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from ray._common.test_utils import wait_for_condition

from app.config import ModelSpec
from tests.helpers import pid_alive
from tests.integration.conftest import app_entry, extra_app

pytestmark = pytest.mark.integration

NAME = "llama-enc-tpp"
MODEL = {
    "name": NAME,
    "source": {"kind": "random_init", "architecture": "llama", "seed": 11,
               "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                          "num_attention_heads": 4, "num_key_value_heads": 2}},
    "task": "embed", "max_seq_len": 32, "dtype": "float32", "device": "auto",
    "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.01},
    "deployment": {"num_cpus": 0.1, "torch_threads": 1},
    # The workers' 2 CPUs already hold other replicas: ranks reserve a tenth of one.
    "parallel": {"strategy": "tp_pp", "tp": 2, "pp": 2, "chunks": 2, "rank_num_cpus": 0.1,
                 "devices": {"kind": "gpu", "per_node": 2, "nodes": 2}},
}
TEXTS = [f"sentence {i} about pipelines of tensor-parallel stages" for i in range(12)]


@pytest.fixture(scope="module")
def url(base_url):
    with extra_app(base_url, app_entry("enctpp", [MODEL]), ready_timeout_s=300) as u:
        yield u


def _entry(url: str) -> dict:
    return next(m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"] if m["id"] == NAME)


def _reference() -> np.ndarray:
    """The unsplit model on one process, same seed, same tokenizer: the embeddings of TEXTS."""
    from app.batching import collate
    from app.models.loader import load_tokenizer
    from app.models.tokenize import TextEncoder
    from app.requests import ModelInput
    from app.runners.local import LocalRunner

    spec = ModelSpec.model_validate({**MODEL, "device": "cpu", "parallel": {"strategy": "replicated"}})
    tok = load_tokenizer(spec)
    local = LocalRunner(spec, len(tok))
    local.start()
    enc = TextEncoder(tok, spec.max_seq_len)
    rows = []
    for text in TEXTS:  # one at a time: no padding in the reference
        ids, mask = collate(enc.encode([ModelInput(texts=[text])]), enc.pad_id)
        rows.append(local.infer(ids, mask).numpy()[0])
    return np.stack(rows)


def test_stages_are_listed_on_different_nodes_with_their_ranks(url):
    m = _entry(url)
    assert (m["strategy"], m["tp"], m["pp"], m["micro_batches"]) == ("tp_pp", 2, 2, 2)
    ranks = sorted(m["ranks"], key=lambda r: r["rank"])
    assert [r["stage"] for r in ranks] == [0, 0, 1, 1]
    nodes = [{r["node_id"] for r in ranks if r["stage"] == s} for s in (0, 1)]
    assert len(nodes[0]) == 1 and len(nodes[1]) == 1, nodes  # a stage's ranks share a node
    assert nodes[0] != nodes[1], "stage 0 and stage 1 landed on the same node"


def test_batched_outputs_equal_the_unsplit_model(url):
    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(c.post(f"/v1/models/{NAME}:predict", json={"instances": [t]}) for t in TEXTS))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * len(TEXTS)
    assert max(int(r.headers["x-batch-size"]) for r in responses) > 1  # micro-batches of real batches
    got = np.array([r.json()["predictions"][0] for r in responses])
    want = _reference()
    rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() <= 1e-5, rel


def test_a_killed_rank_fails_in_flight_requests_with_503_and_the_gang_is_replaced(url):
    before = _entry(url)
    old_pids = [r["pid"] for r in before["ranks"]]
    shm_before = len(glob.glob("/dev/shm/*"))
    victim = max(before["ranks"], key=lambda r: r["rank"])["pid"]  # a rank of the last stage
    outcomes: list[tuple] = []
    killed_at: list[float] = []

    async def load(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            async def client(k: int) -> None:
                i = 0
                while time.monotonic() < deadline:
                    t0 = time.monotonic()
                    try:
                        r = await c.post(f"/v1/models/{NAME}:predict", json={"instances": [f"client {k} asks {i}"]})
                        outcomes.append((r.status_code, r.headers.get("retry-after"), time.monotonic() - t0, t0))
                    except httpx.TimeoutException:
                        outcomes.append(("hang", None, time.monotonic() - t0, t0))
                    i += 1
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(client(k) for k in range(4)))

    def kill_later() -> None:
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_later, daemon=True).start()
    asyncio.run(load(15))
    wait_for_condition(lambda: _entry(url)["replica"] != before["replica"], timeout=180)
    ok = httpx.post(f"{url}/v1/models/{NAME}:predict", json={"instances": ["after"]}, timeout=60)
    statuses = [o[0] for o in outcomes]
    print(f"\nstage rank kill: {len(outcomes)} requests {dict((s, statuses.count(s)) for s in set(statuses))}; "
          f"slowest answer after the kill {max((o[2] for o in outcomes if o[3] + o[2] >= killed_at[0]), default=0):.2f} s")
    slow = [(o[0], round(o[2], 2), round(o[3] - killed_at[0], 2)) for o in outcomes if o[2] >= 1.0]
    print(f"answers over 1 s (status, took, started after the kill): {slow}")
    assert ok.status_code == 200 and "hang" not in statuses and statuses.count(200) > 0
    for status, retry_after, took, started in outcomes:
        assert status in (200, 503), status
        if status == 503:
            assert retry_after, "a 503 must say when to retry"
        # In flight at the kill, or arriving while no gang is up (the old one stopped, the new one
        # loading: limits.replica_wait_s bounds their wait for a replica): answered within 10 s.
        assert took < 10.0, (status, took, started - killed_at[0])
    assert any(o[0] == 503 and o[3] > killed_at[0] + 1 for o in outcomes), "no request met the replacement gap"
    # The old gang is gone: none of its processes live, /dev/shm back to its count.
    wait_for_condition(lambda: not any(pid_alive(p) for p in old_pids), timeout=60)
    wait_for_condition(lambda: len(glob.glob("/dev/shm/*")) <= shm_before, timeout=60)
    assert len(_entry(url)["ranks"]) == 4
