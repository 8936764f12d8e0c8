"""Tensor- and pipeline-parallel runners: equivalence with the local runner, and serving over HTTP."""

from __future__ import annotations

import asyncio
import glob

import httpx
import numpy as np
import pytest
import torch

from app.config import ModelSpec
from app.planner import plan_model
from app.runners.local import LocalRunner
from ray._common.test_utils import wait_for_condition

from tests.helpers import parallel_config
from tests.integration.conftest import extra_app

pytestmark = pytest.mark.integration

VOCAB = 30522


def _spec(arch: str, task: str, strategy: str, kv_heads: int = 4, **size) -> ModelSpec:
    cfg = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 128}
    if arch == "llama":
        cfg["num_key_value_heads"] = kv_heads
    parallel = {"strategy": strategy, "rank_num_cpus": 0.5, "devices": {"kind": "cpu", "per_node": 2}, **size}
    return ModelSpec.model_validate({
        "name": f"{arch}-{task}", "source": {"kind": "random_init", "architecture": arch, "config": cfg, "seed": 3},
        "task": task, "num_labels": 3, "max_seq_len": 32, "parallel": parallel,
    })


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1000, 20000, (6, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _reference(spec: ModelSpec) -> torch.Tensor:
    local = LocalRunner(spec, VOCAB)
    local.start()
    return local.infer(*_inputs())


@pytest.mark.parametrize("arch, task, kv_heads", [("llama", "embed", 4), ("llama", "embed", 2), ("llama", "classify", 2),
                                                  ("bert", "classify", 4)])
def test_tensor_parallel_matches_local(ray_cluster, arch, task, kv_heads):
    """kv_heads 2 of 4 (GQA): AutoTP must learn the head counts from the served head's config."""
    from app.runners.deepspeed_tp import TensorParallelRunner

    spec = _spec(arch, task, "deepspeed_tp", kv_heads=kv_heads, tp=2)
    plan = plan_model(spec, VOCAB)
    assert (plan.strategy, plan.tp) == ("deepspeed_tp", 2)
    runner = TensorParallelRunner(spec, VOCAB, plan)
    runner.start()
    try:
        out = runner.infer(*_inputs())
        runner.check_health()
    finally:
        runner.shutdown()
    assert _rel_err(out, _reference(spec)) <= 1e-4


@pytest.mark.parametrize("arch, task", [("llama", "embed"), ("llama", "classify"), ("bert", "classify"), ("bert", "embed")])
def test_pipeline_parallel_matches_local(arch, task):
    from app.runners.fairscale_pp import PipelineRunner

    spec = _spec(arch, task, "fairscale_pp", pp=2, chunks=3)
    plan = plan_model(spec, VOCAB)
    assert (plan.strategy, plan.pp, plan.chunks) == ("fairscale_pp", 2, 3)
    runner = PipelineRunner(spec, VOCAB, plan)
    runner.start()
    try:
        out = runner.infer(*_inputs())
    finally:
        runner.shutdown()
    assert _rel_err(out, _reference(spec)) <= 1e-4


def test_tensor_parallel_dead_rank_fails_health_check(ray_cluster):
    import ray

    from app.runners.deepspeed_tp import TensorParallelRunner

    spec = _spec("llama", "embed", "deepspeed_tp", tp=2)
    runner = TensorParallelRunner(spec, VOCAB, plan_model(spec, VOCAB))
    runner.start()
    try:
        runner.check_health()
        assert len(glob.glob(f"/dev/shm/{runner.shm_buffer_prefix}_*")) == 2  # one per rank (CPU all-reduce)
        ray.kill(runner.ranks[1])  # asynchronous: the rank dies a moment later

        def unhealthy() -> bool:
            try:
                runner.check_health()
            except Exception:  # noqa: BLE001 - any failure is what Serve acts on
                return True
            return False

        wait_for_condition(unhealthy, timeout=30)
    finally:
        runner.shutdown()
    # Killed ranks never unlink DeepSpeed's shared-memory all-reduce files; the runner does.
    assert runner.shm_buffer_prefix and not glob.glob(f"/dev/shm/{runner.shm_buffer_prefix}_*")


# ------------------------------------------------------------------------------ served over HTTP


@pytest.fixture(scope="module")
def parallel_url(base_url):
    app = parallel_config()["applications"][0]
    app["name"], app["route_prefix"] = "parallel", "/parallel"
    with extra_app(base_url, app, ready_timeout_s=300) as url:
        yield url


def test_parallel_models_are_planned_and_listed(parallel_url):
    models = {m["name"]: m for m in httpx.get(f"{parallel_url}/v1/models", timeout=30).json()["data"]}
    assert models["llama-tp"]["strategy"] == "deepspeed_tp" and models["llama-tp"]["tp"] == 2
    assert models["llama-pp"]["strategy"] == "fairscale_pp" and models["llama-pp"]["pp"] == 2
    assert "does not fit one device" in " ".join(models["llama-tp"]["plan"]["reasons"])


async def _fire(url: str, model: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(
            c.post(f"/v1/models/{model}:predict", json={"instances": [f"request {i} about pipelines"]}) for i in range(n)
        ))


@pytest.mark.parametrize("model", ["llama-tp", "llama-pp"])
def test_parallel_models_answer_http_batched_and_match_local(parallel_url, model):
    responses = asyncio.run(_fire(parallel_url, model, 24))
    assert [r.status_code for r in responses] == [200] * 24
    assert np.mean([int(r.headers["x-batch-size"]) for r in responses]) > 1
    # The served answer equals the local runner's on the same (seeded) weights.
    from app.config import parse_app_args
    from app.models.loader import load_tokenizer
    from app.models.tokenize import TextEncoder
    from app.batching import collate
    from app.requests import ModelInput

    spec = parse_app_args(parallel_config()["applications"][0]["args"]).model(model)
    tok = load_tokenizer(spec)
    local = LocalRunner(spec, len(tok))
    local.start()
    enc = TextEncoder(tok, spec.max_seq_len)
    ids, mask = collate(enc.encode([ModelInput(texts=["request 5 about pipelines"])]), enc.pad_id)
    expected = local.infer(ids, mask).numpy()[0]
    served = responses[5].json()["predictions"][0]
    got = np.array(served if model == "llama-tp" else served["probabilities"])
    if model == "llama-pp":
        expected = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_tensor_parallel_rank_killed_under_load(parallel_url):
    """A rank process of the served TP gang is SIGKILLed under load: nothing hangs, every request is
    answered (200, or a clear 503 + Retry-After while the gang is replaced), and the model serves again."""
    import os
    import signal
    import threading
    import time

    def tp_info() -> dict:
        models = httpx.get(f"{parallel_url}/v1/models", timeout=30).json()["data"]
        return next(m for m in models if m["name"] == "llama-tp")

    from tests.helpers import processes_titled

    before = tp_info()
    victim_pid = sorted(processes_titled("TPRankWorker"))[-1]  # any rank: the gang needs every one
    outcomes: list = []
    killed_at: list[float] = []

    async def load(duration_s: float) -> None:
        deadline = time.monotonic() + duration_s
        async with httpx.AsyncClient(base_url=parallel_url, timeout=120) as c:
            async def worker(k: int) -> None:
                i = 0
                while time.monotonic() < deadline:
                    i += 1
                    try:
                        r = await c.post("/v1/models/llama-tp:predict", json={"instances": [f"w{k} r{i}"]})
                        outcomes.append((r.status_code, r.json().get("error") if r.status_code != 200 else None,
                                         r.headers.get("retry-after")))
                    except httpx.TimeoutException:
                        outcomes.append(("hang", None, None))
                    await asyncio.sleep(0.05)

            await asyncio.gather(*(worker(k) for k in range(4)))

    def kill_later() -> None:
        time.sleep(3)
        os.kill(victim_pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    threading.Thread(target=kill_later, daemon=True).start()
    asyncio.run(load(20))
    wait_for_condition(lambda: tp_info()["replica"] != before["replica"], timeout=180)  # a new gang
    recovered_s = time.monotonic() - killed_at[0]
    ok = httpx.post(f"{parallel_url}/v1/models/llama-tp:predict", json={"instances": ["after"]}, timeout=120)
    statuses = [o[0] for o in outcomes]
    print(f"\nTP rank kill: {len(outcomes)} requests, statuses "
          f"{ {s: statuses.count(s) for s in set(statuses)} }, new gang serving within {recovered_s:.1f} s")
    assert ok.status_code == 200
    assert "hang" not in statuses
    assert statuses.count(200) > 0
    for status, error, retry_after in outcomes:
        if status != 200:
            assert status >= 500 and error, (status, error)
            if status == 503:
                assert retry_after, "a 503 must say when to retry"
