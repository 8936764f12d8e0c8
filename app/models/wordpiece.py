"""BERT-style WordPiece tokenisation of ASCII texts with a word cache: the same ids as the Rust
pipeline of `tokenizers`, several times cheaper per text.

Why: at serving rates the tokenizer is the front end's largest cost. `tokenizers` runs its
normaliser, pre-tokeniser and model over alignment-tracked strings and builds an `Encoding`
(offsets, masks, word ids) for every text: ~0.5 ms for a 128-token English text on one core,
where the HTTP work of a request is about as much. For an ASCII text the BERT pipeline is simple
enough to run as three C-speed steps: a per-character translation (the normaliser), one regex
(the pre-tokeniser), and a dict of word -> ids (WordPiece, which depends on the word alone).
Words missing from the cache go to the Rust model itself, so the vocabulary logic is never
re-implemented. The normalisation table and the punctuation set are read off the Rust
normaliser and pre-tokeniser at start, one character at a time, not written out here.

Texts that are not pure ASCII, or that hold an added token's text (`[MASK]`), go to the Rust
pipeline, as does every tokenizer whose pipeline is not BERT's (`for_tokenizer` returns None).
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional

# The pipeline this fast path reproduces; anything else keeps the Rust pipeline.
_BERT_PIPELINE = {"normalizer": "BertNormalizer", "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece"}


class AsciiWordPiece:
    def __init__(self, tok: Any, added_tokens: list[str], cache_size: int):
        """`tok`: a `tokenizers.Tokenizer` with a BERT pipeline (see `for_tokenizer`)."""
        self._model = tok.model
        self._cache: dict[str, list[int]] = {}
        self._cache_size = cache_size
        self._added = added_tokens
        # The normaliser per ASCII character: lower case, control characters dropped, \t \n \r to
        # spaces (for ASCII, BertNormalizer acts on each character alone).
        self._table = {i: out for i in range(128) if (out := tok.normalizer.normalize_str(chr(i))) != chr(i)}
        # The pre-tokeniser splits on whitespace and cuts each punctuation character out alone.
        punct = []
        for i in range(33, 127):
            c = chr(i)
            pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(f"a{c}a")]
            if pieces == ["a", c, "a"]:
                punct.append(c)
            elif pieces != [f"a{c}a"]:
                raise ValueError(f"pre-tokeniser splits {c!r} in a way BERT's does not: {pieces}")
        p = re.escape("".join(punct))
        self._words = re.compile(rf"[^\s{p}]+|[{p}]" if punct else r"\S+")
        # The special tokens around one sequence, as the post-processor adds them: [CLS] ... [SEP].
        # (On a copy: the caller's tokenizer may pad or truncate.)
        bare = type(tok).from_str(tok.to_str())
        bare.no_padding()
        bare.no_truncation()
        probe = bare.token_to_id("a")
        ids = bare.encode("a").ids
        if probe is None or ids.count(probe) != 1:
            raise ValueError("cannot locate a one-token text in the post-processor's output")
        k = ids.index(probe)
        self._prefix, self._suffix = ids[:k], ids[k + 1 :]

    @classmethod
    def for_tokenizer(cls, tok: Any, tokenizer_json: dict[str, Any], cache_size: int) -> Optional["AsciiWordPiece"]:
        """The fast path for `tok`, or None where its pipeline is not BERT's or cache_size is 0."""
        if cache_size <= 0:
            return None
        for part, kind in _BERT_PIPELINE.items():
            if (tokenizer_json.get(part) or {}).get("type") != kind:
                return None
        if (tokenizer_json.get("post_processor") or {}).get("type") not in ("TemplateProcessing", "BertProcessing"):
            return None
        added = [t["content"] for t in tokenizer_json.get("added_tokens", [])]
        return cls(tok, added, cache_size)

    @classmethod
    def from_file(cls, tok: Any, path: str, cache_size: int) -> Optional["AsciiWordPiece"]:
        with open(path, encoding="utf-8") as f:
            return cls.for_tokenizer(tok, json.load(f), cache_size)

    def encode(self, text: str, max_len: int) -> Optional[list[int]]:
        """The ids of `text` with special tokens, truncated to max_len; None for a text this fast
        path does not take (the caller sends it through the Rust pipeline)."""
        if not text.isascii():
            return None
        normal = text.translate(self._table)
        if any(t in text or t in normal for t in self._added):
            return None
        budget = max_len - len(self._prefix) - len(self._suffix)
        out = list(self._prefix)
        end = len(out) + max(budget, 0)
        cache = self._cache
        for word in self._words.findall(normal):
            ids = cache.get(word)
            if ids is None:
                ids = self._word_ids(word)
            out += ids
            if len(out) >= end:
                del out[end:]
                break
        out += self._suffix
        return out

    def _word_ids(self, word: str) -> list[int]:
        ids = [t.id for t in self._model.tokenize(word)]
        if len(self._cache) >= self._cache_size:
            self._cache.clear()  # bounded; a working set refills it within a few texts
        self._cache[word] = ids
        return ids
