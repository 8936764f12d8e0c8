"""Generation on gangs over the real HTTP path: a DeepSpeed tensor-parallel gang (tp=2), a
pipeline of two layer stages (pp=2), and two stages of tp=2 groups on logical GPUs, one stage per
worker node of the test cluster (tp_pp), gloo on CPU. Greedy tokens equal transformers' `generate` of
the unsplit model while requests join the running batch, a seed samples the same text on a gang as
on one device, and a killed rank ends every stream at once (503 / an error event), the gang is
replaced and serves again."""

from __future__ import annotations

import asyncio
from collections import Counter
import glob
import os
import signal
import time

import httpx
import pytest
from ray._common.test_utils import wait_for_condition

from app.config import ModelSpec
from app.models.chat import GenerationText
from app.models.loader import build_backbone
from tests.helpers import pid_alive
from tests.integration.conftest import app_entry, extra_app
from tests.integration.test_generation import assert_answers_equal_generate

pytestmark = pytest.mark.integration

TP, PP, TPP, ONE = "llama-gen-tp", "llama-gen-pp", "llama-gen-tpp", "llama-gen"


def _model(name: str, parallel: dict) -> dict:
    return {
        "name": name,
        "source": {"kind": "random_init", "architecture": "llama", "seed": 5,
                   "config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2}},
        "task": "generate", "max_seq_len": 256, "dtype": "float32", "device": "cpu",
        "generation": {"max_new_tokens": 64, "default_max_tokens": 16, "max_running_sequences": 16,
                       "kv_cache_max_tokens": 8192},
        "deployment": {"num_cpus": 0.5, "torch_threads": 1},
        "parallel": parallel,
    }


TP_MODEL = _model(TP, {"strategy": "deepspeed_tp", "tp": 2, "rank_num_cpus": 0.5,
                       "devices": {"kind": "cpu", "per_node": 2}})
PP_MODEL = _model(PP, {"strategy": "fairscale_pp", "pp": 2, "rank_num_cpus": 0.5,
                       "devices": {"kind": "cpu", "per_node": 2}})
# Each stage's bundle asks 2 logical GPUs: no node of the test cluster has 4, so the stages land
# on the two workers (device auto: CPU compute where there is no CUDA). The workers' 2 CPUs each
# already hold other replicas: ranks reserve a tenth of one.
TPP_MODEL = {**_model(TPP, {"strategy": "tp_pp", "tp": 2, "pp": 2, "rank_num_cpus": 0.1,
                            "devices": {"kind": "gpu", "per_node": 2, "nodes": 2}}), "device": "auto"}
ONE_MODEL = _model(ONE, {"strategy": "replicated"})
GANGS = pytest.mark.parametrize("gang", [TP, PP, TPP])


@pytest.fixture(scope="module")
def url(base_url):
    with extra_app(base_url, app_entry("gentp", [TP_MODEL, PP_MODEL, TPP_MODEL, ONE_MODEL])) as u:
        yield u


@pytest.fixture(scope="module")
def reference():
    spec = ModelSpec.model_validate(ONE_MODEL)
    text = GenerationText(spec)
    return build_backbone(spec, len(text)), text


def _last_rank_pid(url: str, gang: str) -> int:
    """The process of the last rank of `gang`'s live replica (listed in /v1/models): a rank of the
    last stage of a pipeline."""
    return max(_entry(url, gang)["ranks"], key=lambda r: r["rank"])["pid"]


def _entry(url: str, name: str) -> dict:
    return next(m for m in httpx.get(f"{url}/v1/models", timeout=30).json()["data"] if m["id"] == name)


def test_the_gangs_are_listed_with_their_ranks_and_kv_budget(url):
    tp, pp = _entry(url, TP), _entry(url, PP)
    assert tp["strategy"] == "deepspeed_tp" and tp["tp"] == 2 and tp["devices"] == ["cpu:rank0", "cpu:rank1"]
    assert pp["strategy"] == "fairscale_pp" and pp["pp"] == 2 and pp["devices"] == ["cpu:stage0", "cpu:stage1"]
    assert pp["balance"] == [2, 2] and "lockstep" in pp["runner"]
    assert [r["rank"] for r in pp["ranks"]] == [0, 1] and len({r["pid"] for r in pp["ranks"] + tp["ranks"]}) == 4
    for e in (tp, pp):
        assert e["kv_cache_tokens"] == 8192 and e["max_running_sequences"] == 16


def test_tp_pp_gang_is_listed_by_stage_and_node(url):
    """tp=2 x pp=2: ranks 0-1 are stage 0, ranks 2-3 stage 1; a stage shares a node (its
    all-reduces) and stage 1 sits on another node than stage 0 (from the ranks' node ids)."""
    e = _entry(url, TPP)
    assert e["strategy"] == "tp_pp" and (e["tp"], e["pp"]) == (2, 2)
    assert e["devices"] == ["cpu:stage0.rank0", "cpu:stage0.rank1", "cpu:stage1.rank0", "cpu:stage1.rank1"]
    nodes = {r["rank"]: r["node_id"] for r in e["ranks"]}
    assert sorted(nodes) == [0, 1, 2, 3] and len({r["pid"] for r in e["ranks"]}) == 4
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2], nodes


@GANGS
def test_greedy_equals_generate_for_concurrent_prompts_of_different_lengths(url, reference, gang):
    model, text = reference
    prompts = [" ".join(["word"] * (1 + 5 * i)) + f" number {i}" for i in range(16)]

    async def ask(c, i, p):
        await asyncio.sleep(0.05 * i)  # later prompts join while earlier ones decode
        r = await c.post("/v1/completions", json={"model": gang, "prompt": p, "max_tokens": 12 + i, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            return await asyncio.gather(*(ask(c, i, p) for i, p in enumerate(prompts)))

    answers = asyncio.run(run())
    assert_answers_equal_generate(model, text, prompts, answers)


@GANGS
def test_a_seed_samples_the_same_text_on_the_gang_and_on_one_device(url, gang):
    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            calls = [c.post("/v1/completions", json={"model": m, "prompt": f"once upon a time {s}", "max_tokens": 24,
                                                     "temperature": 0.9, "top_p": 0.95, "seed": s})
                     for s in range(6) for m in (gang, ONE)]
            return [r.json()["choices"][0]["text"] for r in await asyncio.gather(*calls)]

    texts = asyncio.run(run())
    assert texts[0::2] == texts[1::2]  # the gang's text == one device's, seed by seed
    assert len(set(texts[0::2])) > 1


@GANGS
def test_a_killed_rank_ends_every_stream_at_once_and_the_gang_is_replaced(url, gang):
    """Streams run back to back from 6 clients; one rank is SIGKILLed. Every stream open at the
    kill ends (done, an error event, or 503) within 10 s, as does every one started while no gang
    is up (limits.replica_wait_s); none hangs, and a new gang serves."""
    before = _entry(url, gang)["replica"]
    shm_before = len(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    gang_pids = [r["pid"] for r in _entry(url, gang)["ranks"]]
    victim = _last_rank_pid(url, gang)
    streams: list[tuple[float, float, str]] = []  # (start, end, how it ended)
    killed_at: list[float] = []

    chunks: dict[int, int] = {}  # client -> chunks its open stream has received

    async def one(c, k, i) -> str:
        chunks[k] = 0
        try:
            async with c.stream("POST", "/v1/completions", json={"model": gang, "prompt": f"long story {k}.{i}",
                                                                 "max_tokens": 60, "stream": True}) as r:
                if r.status_code != 200:
                    return f"status {r.status_code}"
                async for line in r.aiter_lines():
                    if line.startswith("data:") and '"error"' in line:
                        return "error event"
                    if line == "data: [DONE]":
                        return "done"
                    chunks[k] += line.startswith("data:")
                return "closed"
        except httpx.HTTPError as e:
            return type(e).__name__
        finally:
            del chunks[k]

    async def client(c, k, until):
        i = 0
        while time.monotonic() < until():
            t0 = time.monotonic()
            how = await one(c, k, i)
            streams.append((t0, time.monotonic(), how))
            i += 1
            if how != "done":
                await asyncio.sleep(0.2)

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            stop = [time.monotonic() + 3600]
            tasks = [asyncio.create_task(client(c, k, lambda: stop[0])) for k in range(6)]
            await asyncio.sleep(2.0)
            # Kill mid-stream: once a stream is well past its first tokens and far from its 60th (a
            # kill at a fixed time could land as every stream was sending its last token).
            deadline = time.monotonic() + 30
            while not any(5 <= n <= 30 for n in chunks.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())
            stop[0] = killed_at[0] + 15  # into the replacement gap: the old gang gone, the new one loading
            await asyncio.gather(*tasks)

    asyncio.run(run())
    kill = killed_at[0]
    open_at_kill = [(round(end - kill, 2), how) for start, end, how in streams if start < kill < end]
    print(f"\n{gang} rank kill: {len(streams)} streams; open at the kill ended (s after, how): {open_at_kill}; "
          f"started after: {Counter(how for start, _, how in streams if start >= kill)}")
    assert open_at_kill and all(after <= 10 for after, _ in open_at_kill), open_at_kill
    slow_after = [(round(start - kill, 2), round(end - start, 2), how) for start, end, how in streams
                  if start >= kill and end - start > 10]
    assert not slow_after, f"streams started after the kill took over 10 s (start, took, how): {slow_after}"
    assert any(how != "done" for _, how in open_at_kill)  # the kill did cut streams short
    assert {how for _, _, how in streams} <= {"done", "error event", "status 503"}, streams
    wait_for_condition(lambda: _entry(url, gang)["replica"] != before, timeout=180)
    r = httpx.post(f"{url}/v1/completions", json={"model": gang, "prompt": "after", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200, r.text
    wait_for_condition(lambda: len(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) <= shm_before, timeout=30)
    wait_for_condition(lambda: not any(pid_alive(pid) for pid in gang_pids), timeout=60)  # no stray rank process
