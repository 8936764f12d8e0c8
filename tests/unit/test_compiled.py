"""Model rewrites of acceleration.compile_layers that run without a GPU: the fused query/key/value
projection gives the same outputs, and the repeated blocks are the encoder's layers."""

import copy

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

from app.models.compiled import fuse_qkv, repeated_blocks

CFG = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128, vocab_size=1000)


def test_fused_qkv_equals_three_projections():
    torch.manual_seed(0)
    model = BertForSequenceClassification._from_config(CFG, attn_implementation="sdpa").eval()
    fused = copy.deepcopy(model)
    assert fuse_qkv(fused) == 3
    attn = fused.bert.encoder.layer[0].attention.self
    assert attn.qkv.out_features == 3 * 64 and not hasattr(attn, "query")
    ids = torch.randint(0, 1000, (3, 16))
    mask = torch.ones_like(ids)
    mask[1:, 9:] = 0  # padding rows must still be masked
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits
        got = fused(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_repeated_blocks_are_the_encoder_layers():
    model = BertModel._from_config(CFG, attn_implementation="sdpa")
    assert repeated_blocks(model) == list(model.encoder.layer)
    mixed = nn.Sequential(nn.ModuleList([nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)]), nn.ModuleList([nn.ReLU()] * 2))
    assert repeated_blocks(mixed) == list(mixed[1])  # the longest list of one class, not the longest list
    assert repeated_blocks(nn.Linear(2, 2)) == []
