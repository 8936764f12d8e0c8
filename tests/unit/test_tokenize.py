"""The direct `tokenizers` path gives exactly transformers' fast-tokenizer ids."""

import pytest
from transformers import AutoTokenizer

from app.config import ModelSpec
from app.models.loader import load_tokenizer, tokenizer_dir
from app.models.tokenize import HFTokenizer, RustTokenizer, TextEncoder
from app.requests import ModelInput

TEXTS = ["", "a", "Hello, World!", "ünïcode ✓ emoji 🎉 and CJK 漢字", "x " * 400, "tab\tand\nnewline",
         "The quick brown fox jumps over the lazy dog. " * 20, "[CLS] literal [SEP] tokens", "  spaces  "]


@pytest.mark.parametrize("max_len", [4, 32, 256])
def test_rust_tokenizer_matches_transformers(max_len):
    spec = ModelSpec.model_validate({"name": "m", "source": {"kind": "packaged"}, "task": "embed"})
    ours = load_tokenizer(spec)
    assert isinstance(ours, RustTokenizer)
    ref = HFTokenizer(AutoTokenizer.from_pretrained(str(tokenizer_dir(spec)), use_fast=True))
    assert ours.encode_ids(TEXTS, max_len) == ref.encode_ids(TEXTS, max_len)
    assert (len(ours), ours.pad_token_id) == (len(ref), ref.pad_token_id)


def test_encoder_keeps_item_order_across_inputs():
    spec = ModelSpec.model_validate({"name": "m", "source": {"kind": "packaged"}, "task": "embed"})
    enc = TextEncoder(load_tokenizer(spec), 16)
    rows = enc.encode([ModelInput(texts=["b", "a"]), ModelInput(token_ids=[[101, 7, 102]]), ModelInput(texts=["c"])])
    single = [enc.encode([ModelInput(texts=[t])])[0] for t in ("b", "a")]
    assert rows[:2] == single and rows[2] == [101, 7, 102] and rows[3] == enc.encode([ModelInput(texts=["c"])])[0]
