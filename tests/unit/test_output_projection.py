"""The CPU output projection's layout (app/models/output_projection.py), without Ray: the transposed
head computes what the Linear did, the choice follows the timings and the operator's setting, and
heads it must not touch (tied weights, non-Linear heads) keep what they had."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from app.models.output_projection import (LAYOUT_ENV, MIN_GAIN, TransposedHead, head_gains, rows_for_copy,
                                          use_faster_head_layout)


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("bias", [False, True])
def test_transposed_head_computes_the_linear(bias):
    torch.manual_seed(1)
    linear = torch.nn.Linear(24, 300, bias=bias)
    head = TransposedHead(linear.weight.detach().t().contiguous(), linear.bias)
    x = torch.randn(3, 5, 24)
    assert torch.allclose(head(x), linear(x), atol=1e-5)
    assert head.weight_t.is_contiguous() and (head.in_features, head.out_features) == (24, 300)


def test_the_copy_serves_up_to_the_last_row_count_where_it_won():
    assert rows_for_copy({1: 3.5, 2: 1.9, 4: 1.4, 8: 1.2, 16: 1.36}) == 16
    assert rows_for_copy({1: 3.7, 2: 1.5, 4: 1.3, 8: 0.95}) == 4  # slower for a full batch
    assert rows_for_copy({1: MIN_GAIN * 0.99}) == 0  # within noise counts as no gain
    assert rows_for_copy({}) == 0


def test_gains_are_timed_at_doubling_row_counts_until_the_copy_loses():
    w = torch.randn(40, 8)
    timed = []

    def time_ms(forwards):  # linear's time over the copy's: 2 below 8 rows, 0.5 from 8 on
        outs = {name: forward() for name, forward in forwards.items()}
        timed.append(outs)
        return {"linear": 2.0 if outs["linear"].shape[0] < 8 else 0.5, "transposed": 1.0}
    gains = head_gains(w, w.t().contiguous(), max_rows=12, time_ms=time_ms)
    assert gains == {1: 2.0, 2: 2.0, 4: 2.0, 8: 0.5}  # 12 is not timed: 8 already lost
    assert torch.allclose(timed[-1]["linear"], timed[-1]["transposed"], atol=1e-5)  # the same product
    assert list(head_gains(w, w.t().contiguous(), max_rows=12,
                           time_ms=lambda f: {"linear": 1.0, "transposed": 1.0})) == [1]
    assert list(head_gains(w, w.t().contiguous(), max_rows=12,
                           time_ms=lambda f: {"linear": 2.0, "transposed": 1.0})) == [1, 2, 4, 8, 12]


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9])
def test_a_head_with_a_row_limit_takes_the_copy_up_to_it_and_linear_above(rows, monkeypatch):
    torch.manual_seed(2)
    linear = torch.nn.Linear(16, 50)
    head = TransposedHead(linear.weight.detach().t().contiguous(), linear.bias, weight=linear.weight, max_rows=4)
    calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or real_linear(*a, **k))
    x = torch.randn(1, rows, 16)
    assert torch.allclose(head(x), real_linear(x, linear.weight, linear.bias), atol=1e-5)
    assert bool(calls) == (rows > 4)


def test_forced_transposed_replaces_an_untied_head_with_the_same_logits():
    model = tiny_llama()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.inference_mode():
        before = model(ids).logits
    assert use_faster_head_layout(model, max_rows=1, environ={LAYOUT_ENV: "transposed"})
    assert isinstance(model.lm_head, TransposedHead)
    with torch.inference_mode():
        assert torch.allclose(model(ids).logits, before, atol=1e-5)


def test_a_tied_head_gets_a_copy_and_the_embedding_stays():
    model = tiny_llama(tie=True)
    embedding = model.get_input_embeddings().weight
    assert model.lm_head.weight is embedding
    assert use_faster_head_layout(model, max_rows=1, environ={LAYOUT_ENV: "transposed"})
    assert model.get_input_embeddings().weight is embedding
    assert torch.equal(model.lm_head.weight_t, embedding.detach().t())


def test_linear_setting_and_foreign_heads_are_left_alone():
    model = tiny_llama()
    head = model.lm_head
    assert not use_faster_head_layout(model, max_rows=1, environ={LAYOUT_ENV: "linear"})
    assert model.lm_head is head
    model.lm_head = torch.nn.Sequential(head)  # e.g. a tensor-parallel wrapper: not a plain Linear
    assert not use_faster_head_layout(model, max_rows=1, environ={LAYOUT_ENV: "transposed"})
    assert isinstance(model.lm_head, torch.nn.Sequential)


def test_a_bad_setting_is_a_clear_error():
    with pytest.raises(ValueError, match=LAYOUT_ENV):
        use_faster_head_layout(tiny_llama(), max_rows=1, environ={LAYOUT_ENV: "fast"})


def test_auto_times_the_models_own_head_and_says_what_it_chose():
    model = tiny_llama()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("ray.serve")  # Ray may have set it not to propagate: caplog would miss it
    level = log.level
    log.setLevel(logging.INFO)  # setLevel, not `log.level =`: it clears the logger's cached answers
    log.addHandler(handler)
    try:
        replaced = use_faster_head_layout(model, max_rows=4, environ={})
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert isinstance(model.lm_head, TransposedHead) == replaced
    assert any(line.startswith("output projection (500, 32)") for line in lines)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.inference_mode():  # whichever layout it chose, the logits are the Linear's
        assert torch.allclose(model(ids).logits, tiny_llama()(ids).logits, atol=1e-5)
