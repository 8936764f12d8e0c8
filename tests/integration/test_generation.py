"""Text generation through the real HTTP path on a real Ray cluster: the unmodified `openai`
client, greedy answers equal to transformers' `generate` of the same model while requests join a
running batch, seeded sampling, clear 4xx errors, and streams cancelled mid-way that leave the
engine empty."""

from __future__ import annotations

import asyncio

import httpx
import openai
import orjson
import pytest
import torch
import yaml
from ray._common.test_utils import wait_for_condition
from transformers import GenerationConfig

from app.config import ModelSpec
from app.models.chat import GenerationText
from app.models.loader import build_backbone
from tests.helpers import ROOT
from tests.integration.conftest import app_entry, extra_app
from tests.integration.test_metrics import GENERATION_ONLY, dashboard_metrics, scrape, total

pytestmark = pytest.mark.integration

MODEL = "tiny-llama"
# The shipped generation config's model (serve_config.generate.yaml), as users run it.
SPEC = yaml.safe_load((ROOT / "serve_config.generate.yaml").read_text())["applications"][0]["args"]["models"][0]


@pytest.fixture(scope="module")
def gen_url(base_url):
    with extra_app(base_url, app_entry("gen", [SPEC])) as url:
        yield url


@pytest.fixture(scope="module")
def client(gen_url):
    return openai.OpenAI(base_url=f"{gen_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference():
    """The unsplit model and its tokenizer, built here from the same spec (same seeded weights)."""
    spec = ModelSpec.model_validate(SPEC)
    text = GenerationText(spec)
    model = build_backbone(spec, len(text))
    return model, text


def test_models_list_in_openai_shape(client, gen_url):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids
    entry = next(m for m in httpx.get(f"{gen_url}/v1/models").json()["data"] if m["id"] == MODEL)
    assert entry["object"] == "model" and entry["task"] == "generate"
    assert entry["kv_cache_tokens"] == 16384 and entry["max_running_sequences"] == 16 and entry["max_held_sequences"] == 2 * 32


def test_openai_client_completions_and_chat_whole_and_streamed(client):
    whole = client.completions.create(model=MODEL, prompt="the weather today", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    streamed = client.completions.create(model=MODEL, prompt="the weather today", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=11, temperature=0.8)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, seed=11,
                                                 temperature=0.8, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content  # same seed, same text, streamed or not
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason


def test_a_stream_merges_the_tokens_of_one_interval_into_one_message(gen_url):
    """After its first token a stream sends at most every `stream_interval_ms` (50 by default): a
    tiny model's steps take a few ms, so a 48-token stream arrives in fewer messages than tokens,
    with the same text and counts as the whole answer."""
    body = {"model": MODEL, "prompt": "a long story", "max_tokens": 48, "temperature": 0}
    whole = httpx.post(f"{gen_url}/v1/completions", json=body, timeout=60).json()
    texts, usage = [], None
    with httpx.stream("POST", f"{gen_url}/v1/completions", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and line.strip() != "data: [DONE]":
                ev = orjson.loads(line[5:])
                usage = ev.get("usage") or usage
                texts += [c["text"] for c in ev["choices"] if c.get("text")]
    assert "".join(texts) == whole["choices"][0]["text"]
    assert usage["completion_tokens"] == whole["usage"]["completion_tokens"] >= 16
    assert len(texts) < usage["completion_tokens"], (len(texts), usage)


def test_greedy_equals_generate_for_concurrent_prompts_of_different_lengths(gen_url, reference):
    model, text = reference
    prompts = [" ".join(["word"] * (1 + 5 * i)) + f" number {i}" for i in range(16)]

    async def ask(c, i, p):
        await asyncio.sleep(0.05 * i)  # later prompts join while earlier ones decode
        r = await c.post("/v1/completions", json={"model": MODEL, "prompt": p, "max_tokens": 12 + i,
                                                  "temperature": 0})
        return r.json()

    async def run():
        async with httpx.AsyncClient(base_url=gen_url, timeout=120) as c:
            return await asyncio.gather(*(ask(c, i, p) for i, p in enumerate(prompts)))

    answers = asyncio.run(run())
    assert_answers_equal_generate(model, text, prompts, answers)


def assert_answers_equal_generate(model, text, prompts, answers) -> None:
    """Answer i (max_tokens 12 + i, greedy) is transformers' `generate` of the unsplit model, token for token."""
    eos = text.eos_token_ids(model.config)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids = text.encode_prompt(p)
        cfg = GenerationConfig(do_sample=False, max_new_tokens=12 + i, eos_token_id=eos, pad_token_id=0)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=cfg)[0, len(ids):].tolist()
        assert a["usage"]["completion_tokens"] == len(ref), i
        assert a["choices"][0]["text"] == text.tok.decode(ref, skip_special_tokens=True), i
        assert a["choices"][0]["finish_reason"] == ("stop" if ref[-1] in eos else "length")


def test_bulk_and_realtime_sequences_share_the_batch_with_the_same_text(gen_url):
    """Bulk streams (X-Priority header, body field, v2 parameters) and realtime ones at once: every
    one answered, and the class changes where a sequence waits, never its greedy text."""
    body = {"model": MODEL, "prompt": "the batch holds", "max_tokens": 16, "temperature": 0}

    async def run():
        async with httpx.AsyncClient(base_url=gen_url, timeout=120) as c:
            alone = (await c.post("/v1/completions", json=body)).json()["choices"][0]["text"]
            calls = [c.post("/v1/completions", json=body, headers={"X-Priority": "bulk"}) for _ in range(6)]
            calls += [c.post("/v1/completions", json={**body, "priority": "bulk"}) for _ in range(2)]
            calls += [c.post(f"/v2/models/{MODEL}/generate", json={"text_input": body["prompt"], "parameters": {
                "max_tokens": 16, "temperature": 0, "priority": "bulk"}})]
            calls += [c.post("/v1/completions", json=body, headers={"X-Priority": "realtime"}) for _ in range(3)]
            return alone, await asyncio.gather(*calls)

    alone, rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * len(rs), [r.text for r in rs if r.status_code != 200]
    texts = [r.json()["text_output"] if "text_output" in r.json() else r.json()["choices"][0]["text"] for r in rs]
    assert texts == [alone] * len(rs)


def test_a_seed_reproduces_across_requests_under_load(gen_url):
    body = {"model": MODEL, "prompt": "once upon a time", "max_tokens": 20, "temperature": 1.0, "seed": 7}

    async def run():
        async with httpx.AsyncClient(base_url=gen_url, timeout=120) as c:
            noise = [c.post("/v1/completions", json={**body, "seed": s}) for s in range(8)]
            rs = await asyncio.gather(c.post("/v1/completions", json=body), *noise, c.post("/v1/completions", json=body))
            return [r.json()["choices"][0]["text"] for r in rs]

    texts = asyncio.run(run())
    assert texts[0] == texts[-1]
    assert len(set(texts[1:-1])) > 1  # other seeds sample other text


@pytest.mark.parametrize("body, status, needle", [
    ({"model": "nope", "prompt": "x"}, 404, "not served"),
    ({"model": MODEL, "prompt": "x", "n": 2}, 400, "n = 1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "word " * 400}, 413, "tokens"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 65}, 400, "limit of 64"),
    ({"model": MODEL, "prompt": "x", "priority": "urgent"}, 400, "traffic class"),
])
def test_bad_completions_get_clear_errors(gen_url, body, status, needle):
    r = httpx.post(f"{gen_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_malformed_chat_is_refused(client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_triton_generate_and_generate_stream(gen_url):
    whole = httpx.post(f"{gen_url}/v2/models/{MODEL}/generate", timeout=60,
                       json={"text_input": "hello", "parameters": {"max_tokens": 6, "temperature": 0}}).json()
    assert whole["model_name"] == MODEL and whole["finish_reason"] in ("stop", "length")
    with httpx.stream("POST", f"{gen_url}/v2/models/{MODEL}/generate_stream", timeout=60,
                      json={"text_input": "hello", "parameters": {"max_tokens": 6, "temperature": 0}}) as r:
        import orjson

        events = [orjson.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    assert "".join(e["text_output"] for e in events) == whole["text_output"]


def test_cancelled_streams_leave_no_sequence_and_an_empty_cache(gen_url, metrics_urls):
    # At most one running batch's worth in flight: Serve's router counts a request as queued until
    # it is assigned, so a burst of 50 at once can pass `max_queued_requests` (32) and be shed with
    # 503 although the replica has room (CI saw exactly that). Shedding is tested in test_overload.
    in_flight = asyncio.Semaphore(SPEC["generation"]["max_running_sequences"])

    async def leave_mid_way(c, i):
        async with in_flight, c.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": f"story {i}",
                                                                         "max_tokens": 64, "stream": True}) as r:
            assert r.status_code == 200, (r.status_code, await r.aread())
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data:")
                if seen == 2:
                    return  # the client goes away with its stream unfinished

    async def run():
        async with httpx.AsyncClient(base_url=gen_url, timeout=120) as c:
            await asyncio.gather(*(leave_mid_way(c, i) for i in range(50)))

    asyncio.run(run())

    def engine_empty() -> bool:
        now = next(m for m in httpx.get(f"{gen_url}/v1/models").json()["data"] if m["id"] == MODEL)["now"]
        return now == {"running": 0, "waiting": 0, "held": 0, "kv_used_fraction": 0.0}

    wait_for_condition(engine_empty, timeout=30)

    def metrics_say_so() -> bool:
        s = scrape(metrics_urls)
        return (total(s, "ray_batchserve_generated_tokens_total", model=MODEL) > 0
                and bool(s.get("ray_batchserve_running_sequences"))
                and total(s, "ray_batchserve_running_sequences", model=MODEL) == 0
                and total(s, "ray_batchserve_kv_cache_used_fraction", model=MODEL) == 0)

    wait_for_condition(metrics_say_so, timeout=60, retry_interval_ms=2000)


def test_dashboard_generation_panels_name_exported_metrics(metrics_urls):
    """What test_metrics.py leaves to this module: the generation panels, scraped while a generator runs."""
    named = dashboard_metrics() & GENERATION_ONLY
    assert len(named) == len(GENERATION_ONLY)
    wait_for_condition(lambda: not (named - set(scrape(metrics_urls))), timeout=60, retry_interval_ms=2000)
