"""Seeded sampling (app/engine/sampling.py): a pure function of (seed, position, logits), with the
distribution softmax(logits / T) restricted to the top-p nucleus; T = 0 is greedy."""

from __future__ import annotations

import math

import torch

from app.engine.sampling import gumbel_noise, hash32, reference_sample, step_key


def test_hash_is_the_same_bits_everywhere_and_spreads():
    x = torch.arange(1 << 16, dtype=torch.int64)
    h = hash32(x)
    assert torch.equal(h, hash32(x.clone()))
    assert int(h.max()) < 2**32 and int(h.min()) >= 0
    assert len(set(h.tolist())) == len(x)  # a bijection on 32 bits: no collisions on distinct inputs
    # Bits are balanced: each of the 32 is set in about half of the outputs.
    ones = torch.stack([(h >> b) & 1 for b in range(32)]).float().mean(dim=1)
    assert bool(((ones - 0.5).abs() < 0.01).all()), ones


def test_keys_depend_on_seed_and_position():
    keys = {step_key(s, p) for s in range(50) for p in range(50)}
    assert len(keys) > 2490 and all(0 <= k < 2**31 for k in keys)
    assert step_key(7, 3) == step_key(7, 3)
    assert step_key(2**40 + 7, 3) != step_key(7, 3)  # the seed's high bits count


def test_noise_is_standard_gumbel():
    g = gumbel_noise(torch.arange(64, dtype=torch.int32), 4096, torch.device("cpu"))
    assert g.shape == (64, 4096) and bool(torch.isfinite(g).all())
    euler_gamma, var = 0.5772, math.pi ** 2 / 6
    assert abs(float(g.mean()) - euler_gamma) < 0.01
    assert abs(float(g.var()) - var) < 0.03


def test_greedy_is_the_argmax_whatever_the_seed():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert {reference_sample(logits, 0.0, 1.0, seed, 5) for seed in range(20)} == {int(logits.argmax())}


def test_draws_follow_softmax_over_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    for temperature in (0.5, 1.0, 1.5):
        n = 6000
        counts = torch.zeros(4)
        for i in range(n):
            counts[reference_sample(logits, temperature, 1.0, seed=i, position=i % 7)] += 1
        expected = torch.softmax(logits / temperature, dim=0) * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 16.3, (temperature, counts, expected)  # p = 0.001 at 3 degrees of freedom


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    picked = {reference_sample(logits, 1.0, 0.7, seed=i, position=0) for i in range(500)}
    assert picked == {0, 1}  # 0.5 alone is under 0.7; with 0.3 the nucleus holds 0.8
    assert {reference_sample(logits, 1.0, 0.01, seed=i, position=0) for i in range(100)} == {0}


def test_a_seed_gives_the_same_tokens_on_every_run():
    logits = torch.randn(32, 500, generator=torch.Generator().manual_seed(1))
    first = [reference_sample(row, 0.9, 0.95, seed=1234, position=p) for p, row in enumerate(logits)]
    again = [reference_sample(row, 0.9, 0.95, seed=1234, position=p) for p, row in enumerate(logits)]
    other = [reference_sample(row, 0.9, 0.95, seed=1235, position=p) for p, row in enumerate(logits)]
    assert first == again and first != other


def test_static_passes_give_the_same_bits_as_skipped_ones():
    """For a graphed or compiled step the processors run every pass; rows that need no pass must
    come out bit-identical to the path that skips it, whatever their batch mates need, and
    all-greedy batches too."""
    from app.engine.sampling import _SeededNoise, _Temperature, _TopP, sampling_kwargs

    class Req:
        def __init__(self, t, p, seed, pos):
            self.state = type("S", (), {"logit_processor_kwargs": sampling_kwargs(t, p, seed),
                                        "generated_tokens": [0] * pos})()

    torch.manual_seed(0)
    batches = [[Req(0.0, 1.0, 1, 3), Req(0.0, 1.0, 2, 5)],  # all greedy: every pass skipped on the CPU
               [Req(0.0, 1.0, 1, 3), Req(0.7, 0.9, 2, 5), Req(1.0, 1.0, 3, 0), Req(1.3, 0.5, 4, 9)]]
    for reqs in batches:
        logits = torch.randn(len(reqs), 97) * 4
        # A row alone through the checking path: what the row is with no batch mates.
        alone = []
        for r in reqs:
            s = logits[reqs.index(r)].unsqueeze(0)
            for proc in (_Temperature(), _TopP(), _SeededNoise()):
                s = proc(s, proc.prepare_tensor_args([r]))
            alone.append(s[0])
        scores = logits.clone()
        for proc in (_Temperature(static_passes=True), _TopP(static_passes=True), _SeededNoise(static_passes=True)):
            scores = proc(scores, proc.prepare_tensor_args(reqs))
        for i in range(len(reqs)):
            assert torch.equal(scores[i], alone[i]), i
