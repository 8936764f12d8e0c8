"""Batched tokenisation inside the replica: many requests' texts in one tokenizer call."""

from __future__ import annotations

from typing import Sequence

from app.schemas import ModelInput


class TextEncoder:
    def __init__(self, tokenizer, max_seq_len: int):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.pad_id = int(tokenizer.pad_token_id)
        self.vocab_size = len(tokenizer)

    def encode(self, inputs: Sequence[ModelInput]) -> list[list[int]]:
        """Token id rows for every item of every input, in order; texts are tokenised in one call.

        Texts longer than max_seq_len tokens are truncated, as sentence-transformers does.
        """
        texts = [t for x in inputs if x.texts is not None for t in x.texts]
        encoded = iter(
            self.tokenizer(texts, truncation=True, max_length=self.max_seq_len, padding=False)["input_ids"]
            if texts
            else []
        )
        rows: list[list[int]] = []
        for x in inputs:
            if x.texts is not None:
                rows.extend(next(encoded) for _ in x.texts)
            else:
                rows.extend(x.token_ids or [])
        return rows
