"""The flash kernel's varlen call equals transformers' packed, block-diagonally masked SDPA call on
a continuous-batching step (runs on a GPU machine only: `pytest tests/gpu`)."""

import pytest
import torch

from tests.unit.test_sequence_sdpa import _KeysAsGiven, _Layer, packed_step

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("heads,kv_heads,dim", [(32, 8, 64), (16, 16, 128)])
def test_flash_varlen_equals_the_packed_call(heads, kv_heads, dim):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from app.models import sequence_sdpa

    # Decoding sequences of different lengths, prefill chunks over cached keys, a whole prompt.
    q_lens = [1] * 40 + [37, 1, 128, 5]
    k_lens = [int(x) for x in torch.randint(2, 900, (40,))] + [300, 17, 128, 5]
    query, key, value, mask, cu_q, cu_k = packed_step(q_lens, k_lens, heads=heads, kv_heads=kv_heads, dim=dim)
    layer = _Layer(heads, kv_heads)
    cuda = lambda t: t.to("cuda", torch.bfloat16)  # noqa: E731
    # Reference: transformers' own call in float32 on the same bf16-rounded inputs.
    ref = [cuda(t).float() for t in (query, key, value)]
    want, _ = sdpa_attention_forward(layer, *ref, mask.to("cuda"), scaling=dim ** -0.5)
    got, _ = sequence_sdpa.sequence_sdpa_forward(
        layer, *(cuda(t) for t in (query, key, value)), {"full_attention": cuda(mask)}, scaling=dim ** -0.5,
        cache=_KeysAsGiven(), cu_seq_lens_q=cu_q.to("cuda", torch.int32),
        cu_seq_lens_k={"full_attention": cu_k.to("cuda", torch.int32)},
        max_length_q=max(q_lens), max_length_k={"full_attention": max(k_lens)})
    got = got.float()
    n = int(cu_q[-1])
    assert got.shape == want.shape
    err = (got[:, :n] - want[:, :n]).norm() / want[:, :n].norm()
    assert err < 1e-2, err
    assert not got[:, n:].any()  # padding rows: no sequence, no output


def test_a_sliding_window_layer_keeps_the_packed_call():
    from transformers.generation.continuous_batching.utils import build_attention_mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from app.models import sequence_sdpa

    q_lens, k_lens = [1, 1, 9], [40, 12, 30]
    query, key, value, _, cu_q, cu_k = packed_step(q_lens, k_lens, pad=0)
    mask = torch.full((1, 1, sum(q_lens), sum(k_lens)), torch.finfo(torch.float32).min)
    build_attention_mask(mask, cu_q.tolist(), cu_k.tolist(), sliding_window=8)  # the window is in the mask only
    layer = _Layer(4, 2)
    layer.config.sliding_window = 8
    args = [t.to("cuda", torch.bfloat16) for t in (query, key, value)]
    want, _ = sdpa_attention_forward(layer, *args, mask.to("cuda", torch.bfloat16), scaling=0.25)
    got, _ = sequence_sdpa.sequence_sdpa_forward(
        layer, *args, mask.to("cuda", torch.bfloat16), scaling=0.25, cache=_KeysAsGiven(),
        cu_seq_lens_q=cu_q.to("cuda", torch.int32), cu_seq_lens_k=cu_k.to("cuda", torch.int32),
        max_length_q=max(q_lens), max_length_k=max(k_lens))
    torch.testing.assert_close(got, want)
