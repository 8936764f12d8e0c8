"""Tokenisation inside the replica: many requests' texts in one call.

`RustTokenizer` runs a model's `tokenizer.json` through the `tokenizers` library directly. It is
the same Rust object transformers' fast tokenizer wraps, so the ids are identical (tested), but
it skips importing transformers' tokenizer machinery (~2 s of a replica's start on an idle core,
~10 s on a loaded 2-core machine, which is most of a scale-up) and building a BatchEncoding on
every batch. A source without tokenizer.json falls back to transformers' AutoTokenizer.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from app.requests import ModelInput


def _token_text(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class RustTokenizer:
    def __init__(self, path: Path, word_cache: int = 0):
        """`word_cache` > 0: ASCII texts of a BERT-style tokenizer go through app/models/wordpiece.py
        with a cache of that many words (same ids, several times cheaper); 0: all through Rust."""
        from tokenizers import Tokenizer

        from app.models.wordpiece import AsciiWordPiece

        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_padding()
        self._tok.no_truncation()
        self._fast = AsciiWordPiece.from_file(self._tok, str(path / "tokenizer.json"), word_cache)
        self._truncation: Optional[int] = None
        self._lock = threading.Lock()
        special: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            f = path / name
            if f.exists():
                special.update({k: v for k, v in json.loads(f.read_text()).items() if k.endswith("_token")})
        pad_id = None
        for key in ("pad_token", "eos_token", "unk_token"):
            text = _token_text(special.get(key))
            if text is not None and self._tok.token_to_id(text) is not None:
                pad_id = self._tok.token_to_id(text)
                break
        if pad_id is None:
            raise ValueError(f"{path}: no pad, eos or unk token in the tokenizer files")
        self.pad_token_id = int(pad_id)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode_ids(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        if self._fast is None:
            return self._encode_rust(texts, max_len)
        rows = [self._fast.encode(t, max_len) for t in texts]
        rest = [i for i, r in enumerate(rows) if r is None]
        if rest:
            for i, ids in zip(rest, self._encode_rust([texts[i] for i in rest], max_len)):
                rows[i] = ids
        return rows  # type: ignore[return-value]

    def _encode_rust(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        with self._lock:  # truncation is tokenizer state; set it once per length
            if self._truncation != max_len:
                self._tok.enable_truncation(max_len)
                self._truncation = max_len
        return [e.ids for e in self._tok.encode_batch(list(texts))]


class HFTokenizer:
    """transformers' AutoTokenizer, for sources that ship no tokenizer.json."""

    def __init__(self, tok: Any):
        self._tok = tok
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        self.pad_token_id = int(tok.pad_token_id)

    def __len__(self) -> int:
        return len(self._tok)

    def encode_ids(self, texts: Sequence[str], max_len: int) -> list[list[int]]:
        return self._tok(list(texts), truncation=True, max_length=max_len, padding=False)["input_ids"]


class TextEncoder:
    def __init__(self, tokenizer: RustTokenizer | HFTokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_id = tokenizer.pad_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, inputs: Sequence[ModelInput]) -> list[list[int]]:
        """Token id rows for every item of every input, in order; texts are tokenised in one call.

        Texts longer than max_seq_len tokens are truncated, as sentence-transformers does.
        """
        texts = [t for x in inputs if x.texts is not None for t in x.texts]
        encoded = iter(self.tokenizer.encode_ids(texts, self.max_seq_len) if texts else [])
        rows: list[list[int]] = []
        for x in inputs:
            if x.texts is not None:
                rows.extend(next(encoded) for _ in x.texts)
            else:
                rows.extend(x.token_ids or [])
        return rows
