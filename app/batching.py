"""Batch assembly and batch-size policy: pure functions, no Ray, no model.

The Serve side (`@serve.batch`) decides *which* requests share a batch; this module decides how
their items become one padded tensor pair, how outputs go back to their requests, and how large a
batch the device memory allows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from app.config import ModelSpec
from app.errors import PayloadTooLarge
from app.requests import ModelInput


@dataclass
class BatchEntry:
    """One request's chunk as it waits in the batch queue."""

    inputs: ModelInput
    arrived_s: float  # time.perf_counter() when the replica received it
    started: bool = False  # set when its batch begins; a cancelled entry never starts
    batch_id: str = ""  # the device batch it ran in (logs, traces, X-Batch-Id)


def count_items(entries: Sequence[BatchEntry]) -> int:
    """`batch_size_fn` for @serve.batch: a multi-item request counts fully.

    Must never raise: an exception here hangs Serve's batch loop (ray #66140).
    """
    total = 0
    for e in entries:
        try:
            total += len(e.inputs)
        except Exception:  # noqa: BLE001 - a malformed entry counts as one item rather than wedging the loop
            total += 1
    return total


def collate(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad id lists to the longest row: ([B, L] ids, [B, L] mask), both int64.

    Vectorised through numpy (one flat copy of every id, one boolean scatter): a torch copy per row
    cost ~20 us a row, 2.6 ms for 128 rows of 128 tokens, against 0.3 ms this way."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    length = int(lengths.max())
    if int(lengths.min()) == length:  # all rows equally long (truncated texts): one copy
        ids = np.array(rows, dtype=np.int64).reshape(len(rows), length)
        return torch.from_numpy(ids), torch.ones((len(rows), length), dtype=torch.long)
    valid = np.arange(length) < lengths[:, None]
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    ids[valid] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    return torch.from_numpy(ids), torch.from_numpy(valid.astype(np.int64))


def token_budget_groups(rows: Sequence[Sequence[int]], budget: int) -> list[Sequence[Sequence[int]]]:
    """Consecutive groups of rows whose padded size (rows x longest row) stays within `budget`.

    Order is kept so outputs concatenate back in place; a single row always forms a group.
    """
    groups: list[Sequence[Sequence[int]]] = []
    start, longest = 0, 0
    for i, r in enumerate(rows):
        longest_with = max(longest, len(r))
        if i > start and (i - start + 1) * longest_with > budget:
            groups.append(rows[start:i])
            start, longest_with = i, len(r)
        longest = longest_with
    if start < len(rows):
        groups.append(rows[start:])
    return groups


def split_rows(outputs: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    if outputs.shape[0] != sum(sizes):
        raise RuntimeError(f"runner returned {outputs.shape[0]} rows for {sum(sizes)} items")
    return list(torch.split(outputs, list(sizes)))


def max_batch_size_from_memory(free_bytes: int, per_sample_bytes: int, cap: int, headroom: float = 0.8) -> int:
    """The seed formula: floor(free memory x 0.8 / per-sample bytes), at least 1, at most `cap`."""
    if per_sample_bytes <= 0:
        return cap
    return max(1, min(cap, math.floor(free_bytes * headroom / per_sample_bytes)))


def check_token_budget(inputs: ModelInput, spec: ModelSpec, encoder: Any) -> None:
    """413 before batching for a request that needs more tokens than one batch may hold
    (`limits.max_batch_tokens`).

    A token covers at least one UTF-8 byte (WordPiece, BPE, SentencePiece), so bytes + a few
    special tokens bound the count without tokenising; only a request over that bound is
    tokenised (`encoder`: app/models/tokenize.py's TextEncoder) to decide exactly."""
    budget = spec.limits.max_batch_tokens
    if budget is None:
        return
    cap = spec.max_seq_len
    if inputs.texts is not None:
        bound = sum(min(cap, len(t.encode("utf-8", "surrogatepass")) + 4) for t in inputs.texts)
    else:
        bound = sum(min(cap, len(r)) for r in inputs.token_ids or [])
    if bound <= budget:
        return
    tokens = sum(len(r) for r in encoder.encode([inputs]))
    if tokens > budget:
        raise PayloadTooLarge(
            f"the request holds {tokens} tokens; model {spec.name!r} takes at most "
            f"{budget} per batch (limits.max_batch_tokens): send fewer or shorter texts"
        )
