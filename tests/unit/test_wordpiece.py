"""The ASCII WordPiece fast path gives exactly the Rust pipeline's ids, and hands back what it does not take."""

import json
import random
import string

import pytest
from tokenizers import Tokenizer

from app.config import ModelSpec
from app.models.loader import tokenizer_dir
from app.models.tokenize import RustTokenizer
from app.models.wordpiece import AsciiWordPiece

SPEC = ModelSpec.model_validate({"name": "m", "source": {"kind": "packaged"}, "task": "embed"})
PATH = tokenizer_dir(SPEC)
EDGES = ["", " ", "a", "A", "Hello, World!", "tab\tand\nnewline\r\n", "ctrl\x00\x01\x07\x0b\x0c\x1b\x7fchars",
         "x" * 150 + " after a word past 100 chars", "don't e-mail me @ 9:30pm (ok?)", "1,000.50 $ 12%",
         "[CLS] literal [SEP] and [MASK]", "[mask] in lower case", "UPPER lower MiXeD", "~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/"]


def rust(max_len: int) -> Tokenizer:
    tok = Tokenizer.from_file(str(PATH / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_len)
    return tok


def fast(cache_size: int = 1000) -> AsciiWordPiece:
    tok = Tokenizer.from_file(str(PATH / "tokenizer.json"))
    wp = AsciiWordPiece.from_file(tok, str(PATH / "tokenizer.json"), cache_size)
    assert wp is not None
    return wp


def random_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    chars = string.printable + "\x00\x01\x0b\x0c\x1f\x7f"
    wordy = string.ascii_letters + string.digits + "'-.,!?;:()"
    texts = []
    for i in range(n):
        if i % 2:
            texts.append("".join(rng.choice(chars) for _ in range(rng.randint(0, 300))))
        else:
            texts.append(" ".join("".join(rng.choice(wordy) for _ in range(rng.randint(1, 14)))
                                  for _ in range(rng.randint(0, 60))))
    return texts


@pytest.mark.parametrize("max_len", [8, 16, 128, 512])
def test_fast_path_ids_equal_rust(max_len):
    wp, ref = fast(), rust(max_len)
    texts = EDGES + random_texts(1500, seed=max_len)
    taken = 0
    for text in texts:
        got = wp.encode(text, max_len)
        if got is not None:
            taken += 1
            assert got == ref.encode(text).ids, repr(text)
    assert taken >= len(texts) - 3  # only the texts holding an added token's text go to Rust


def test_non_ascii_and_added_tokens_go_to_rust():
    wp = fast()
    for text in ["ünïcode", "emoji 🎉", "漢字", "[CLS] literal", "a [MASK] b", "[PAD]"]:
        assert wp.encode(text, 64) is None
    assert wp.encode("[mask] is not the token [MASK] is", 64) is None


def test_replica_tokenizer_mixes_both_paths_in_order():
    texts = ["plain ascii", "ünïcode ✓", "[SEP] literal", "more plain text, with punctuation."] * 3
    with_cache, rust_only = RustTokenizer(PATH, word_cache=64), RustTokenizer(PATH, word_cache=0)
    assert rust_only._fast is None and with_cache._fast is not None
    assert with_cache.encode_ids(texts, 32) == rust_only.encode_ids(texts, 32)


def test_cache_stays_bounded_and_right():
    wp, ref = fast(cache_size=8), rust(512)
    for text in random_texts(200, seed=7)[::2]:
        assert wp.encode(text, 512) == ref.encode(text).ids
        assert len(wp._cache) <= 8


def test_other_pipelines_keep_rust():
    doc = json.loads((PATH / "tokenizer.json").read_text())
    tok = Tokenizer.from_file(str(PATH / "tokenizer.json"))
    assert AsciiWordPiece.for_tokenizer(tok, doc, 0) is None
    for part, other in [("normalizer", {"type": "NFKC"}), ("pre_tokenizer", {"type": "Whitespace"}),
                        ("model", {"type": "BPE"}), ("post_processor", None)]:
        assert AsciiWordPiece.for_tokenizer(tok, {**doc, part: other}, 100) is None, part
