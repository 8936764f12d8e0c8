"""The continuous-batching engine (app/engine/generation.py) on a tiny random Llama, without Ray:
sequences that join while others decode get exactly what `generate` gives each alone; a seed gives
the same tokens whatever shares the batch; a consumer that goes away frees its sequence."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from app.engine.generation import GenerationEngine, SamplingParams
from app.errors import Overloaded, PayloadTooLarge
from app.kv_cache import kv_budget, kv_bytes_per_token

EOS = 999


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def engine(model):
    budget = kv_budget(10**9, kv_bytes_per_token(model.config, torch.float32.itemsize), 0.8, 4096)
    eng = GenerationEngine(model, [EOS], budget, max_running=8, max_sequences=24, max_step_tokens=256, max_context_tokens=512)
    yield eng
    eng.shutdown()


def prompts(n: int) -> list[list[int]]:
    return [[1 + (7 * i + j) % 900 for j in range(3 + 11 * i % 90)] for i in range(n)]


async def collect(engine, prompt, params, delay_s=0.0):
    await asyncio.sleep(delay_s)
    tokens, reason = [], None
    async for ev in engine.stream(prompt, params):
        tokens += ev.tokens
        reason = ev.finish_reason
    return tokens, reason


def test_kv_budget_is_the_seed_formula_under_its_cap():
    assert kv_budget(1000 * 1024, 1024, 0.8, None).tokens == 800
    capped = kv_budget(10**12, 1024, 0.8, 4096)
    assert capped.tokens == 4096 and capped.capped_by == "kv_cache_max_tokens"


def test_kv_bytes_per_token_counts_every_layer_keys_and_values(model):
    # 2 (K and V) x 2 layers x 2 kv heads x head_dim 16 x 4 bytes
    assert kv_bytes_per_token(model.config, torch.float32.itemsize) == 2 * 2 * 2 * 16 * 4


def test_greedy_equals_generate_while_sequences_join_and_leave(model, engine):
    ps = prompts(16)

    async def run():
        # Staggered: later prompts arrive while earlier ones are decoding.
        return await asyncio.gather(*(collect(engine, p, SamplingParams(max_new_tokens=8 + 2 * i), 0.01 * i)
                                      for i, p in enumerate(ps)))

    results = asyncio.run(run())
    for i, (p, (tokens, reason)) in enumerate(zip(ps, results)):
        cfg = GenerationConfig(do_sample=False, max_new_tokens=8 + 2 * i, eos_token_id=EOS, pad_token_id=0)
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             generation_config=cfg)[0, len(p):].tolist()
        assert tokens == ref, i
        assert reason == ("stop" if ref[-1] == EOS else "length")


def test_a_seed_samples_the_same_tokens_alone_and_in_a_crowd(engine):
    ps = prompts(9)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=42)

    async def run():
        alone = await collect(engine, ps[0], seeded)
        crowd = await asyncio.gather(collect(engine, ps[0], seeded, 0.02),
                                     *(collect(engine, p, SamplingParams(16, 1.0, 1.0, i)) for i, p in enumerate(ps[1:])),
                                     *(collect(engine, p, SamplingParams(16)) for p in ps[1:4]))
        other = await collect(engine, ps[0], SamplingParams(16, 0.9, 0.95, 43))
        return alone, crowd[0], other

    alone, in_crowd, other = asyncio.run(run())
    assert alone == in_crowd
    assert alone[0] != other[0]


def test_consumers_that_stop_reading_free_their_sequences(engine):
    async def run():
        async def leave_after_two(p):
            seen = 0
            async for _ in engine.stream(p, SamplingParams(max_new_tokens=200)):
                seen += 1
                if seen == 2:
                    return

        await asyncio.gather(*(leave_after_two(p) for p in prompts(20)))
        for _ in range(100):
            st = engine.stats()
            if st.running == 0 and st.kv_used_fraction == 0.0:
                return st
            await asyncio.sleep(0.05)
        return engine.stats()

    st = asyncio.run(run())
    assert (st.running, st.waiting, st.held, st.kv_used_fraction) == (0, 0, 0, 0.0)


def test_refusals_come_before_queueing(engine):
    async def first(p, params):
        async for ev in engine.stream(p, params):
            return ev

    with pytest.raises(PayloadTooLarge):
        asyncio.run(first([1] * 500, SamplingParams(max_new_tokens=100)))  # over the 512-token context

    async def flood():
        streams = [engine.stream([1, 2, 3], SamplingParams(max_new_tokens=100)) for _ in range(25)]
        started = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        for s in streams:
            await s.aclose()
        return started

    outcomes = asyncio.run(flood())
    assert sum(isinstance(o, Overloaded) for o in outcomes) == 1  # 24 held at most


def test_bulk_takes_its_share_of_the_batch_and_realtime_still_gets_in(model):
    """Bulk sequences: at most bulk_max_running in the running batch (the rest wait in the engine),
    at most bulk_max_sequences held (then 503 to bulk alone); realtime joins beside them at once,
    and every waiting bulk sequence runs when a place frees."""
    budget = kv_budget(10**9, kv_bytes_per_token(model.config, torch.float32.itemsize), 0.8, 4096)
    eng = GenerationEngine(model, [EOS], budget, max_running=4, max_sequences=24, max_step_tokens=256,
                           max_context_tokens=512, bulk_max_running=2, bulk_max_sequences=6)
    try:
        async def run():
            producing, peak = 0, 0  # bulk sequences between their first token and their end

            async def bulk(p):
                nonlocal producing, peak
                n = 0
                async for ev in eng.stream(p, SamplingParams(max_new_tokens=300), bulk=True):
                    if n == 0:
                        producing += 1
                        peak = max(peak, producing)
                    n += len(ev.tokens)
                producing -= 1
                return n

            bulks = [asyncio.create_task(bulk(p)) for p in prompts(6)]
            while producing < 2:
                await asyncio.sleep(0.005)
            held_while_bulk = eng.stats().held
            with pytest.raises(Overloaded, match="bulk limit"):
                await anext(eng.stream([1, 2, 3], SamplingParams(max_new_tokens=2), bulk=True))
            realtime = await asyncio.wait_for(collect(eng, [5, 6, 7], SamplingParams(max_new_tokens=4)), 30)
            done = await asyncio.wait_for(asyncio.gather(*bulks), 120)
            return peak, held_while_bulk, realtime, done

        peak, held, realtime, done = asyncio.run(run())
        assert peak == 2, peak
        assert held == 6  # two running, four waiting in the engine: all counted for the autoscaler
        assert len(realtime[0]) == 4
        assert all(0 < n <= 300 for n in done), done  # each ran (an EOS may end one early)
        assert eng.describe()["bulk_max_running_sequences"] == 2
    finally:
        eng.shutdown()
