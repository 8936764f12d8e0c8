"""Attention one sequence at a time equals transformers' packed, block-diagonally masked call."""

from __future__ import annotations

import torch
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.utils import build_attention_mask
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from app.models import sequence_sdpa


class _KeysAsGiven(PagedAttentionCache):
    """A paged cache whose update hands back the packed keys and values it is given."""

    def __init__(self):  # noqa: D107 - no blocks: nothing is stored
        pass

    def update(self, key_states, value_states, layer_idx, kwargs):
        return key_states, value_states


class _Layer(torch.nn.Module):
    def __init__(self, heads: int, kv_heads: int):
        super().__init__()
        self.layer_idx = 0
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True
        self.config = type("C", (), {})()


def packed_step(q_lens: list[int], k_lens: list[int], heads: int = 4, kv_heads: int = 2, dim: int = 16, pad: int = 3):
    """A step's tensors as the manager builds them: sequences packed in one row, a block-diagonal
    mask (causal inside each block), and `pad` padding query rows after the last sequence."""
    torch.manual_seed(0)
    cu_q = torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)))
    cu_k = torch.tensor([0] + list(torch.tensor(k_lens).cumsum(0)))
    q_total, k_total = int(cu_q[-1]) + pad, int(cu_k[-1])
    mask = torch.full((1, 1, q_total, k_total), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q.tolist(), cu_k.tolist())
    query = torch.randn(1, heads, q_total, dim)
    key, value = torch.randn(1, kv_heads, k_total, dim), torch.randn(1, kv_heads, k_total, dim)
    return query, key, value, mask, cu_q, cu_k


def test_per_sequence_attention_equals_the_packed_call():
    # Decoding sequences (one query), a prefill chunk of a sequence with cached keys, a whole prompt.
    q_lens, k_lens = [1, 1, 7, 5, 1], [9, 30, 20, 5, 2]
    query, key, value, mask, cu_q, cu_k = packed_step(q_lens, k_lens)
    layer = _Layer(4, 2)
    want, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.25)
    got, _ = sequence_sdpa.sequence_sdpa_forward(layer, query, key, value, {"full_attention": mask}, scaling=0.25,
                                                 cache=_KeysAsGiven(), cu_seq_lens_q=cu_q,
                                                 cu_seq_lens_k={"full_attention": cu_k})
    n = int(cu_q[-1])
    assert got.shape == want.shape
    torch.testing.assert_close(got[:, :n], want[:, :n], rtol=1e-5, atol=1e-5)
    assert not got[:, n:].any()  # padding rows: no sequence, no output


def test_calls_outside_a_paged_step_go_to_transformers():
    query, key, value, mask, _, _ = packed_step([3], [3], pad=0)
    layer = _Layer(4, 2)
    want, _ = sdpa_attention_forward(layer, query, key, value, mask)
    sequence_sdpa.install()
    try:
        got, _ = sequence_sdpa.sequence_sdpa_forward(layer, query, key, value, mask)
    finally:
        sequence_sdpa.uninstall()
    torch.testing.assert_close(got, want)
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward


def test_sliding_window_layers_are_told_apart_as_the_manager_groups_them():
    from transformers import LlamaConfig, Qwen2Config

    layer = _Layer(4, 2)
    assert not sequence_sdpa.sliding_window_layer(layer)  # no layer types, no window: full attention
    layer.config.sliding_window = 64  # a window and no layer types: the manager takes every layer as sliding
    assert sequence_sdpa.sliding_window_layer(layer)
    layer.config = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=64, max_window_layers=2)
    kinds = [sequence_sdpa.sliding_window_layer(type("M", (), {"config": layer.config, "layer_idx": i})())
             for i in range(4)]
    assert kinds == [t == "sliding_attention" for t in layer.config.layer_types] and any(kinds) and not all(kinds)
    layer.config = LlamaConfig(num_hidden_layers=2)
    assert not sequence_sdpa.sliding_window_layer(layer)
