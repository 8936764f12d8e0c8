"""The output projection (lm_head) of a generator on CPU, in the weight layout the CPU's BLAS runs faster.

A decoding step multiplies one hidden row per sampling sequence by the vocabulary's weight
([vocab, hidden], read whole every step): a skinny product whose speed on CPU depends on the
weight's layout more than on its arithmetic. On the 2-core AMD machine of this project (MKL,
float32, one thread), `linear(x, W)` of a [30,522 x 256] head took 3.9 ms for one row and 10.9 ms
for 16, and `x @ W.T` with `W.T` contiguous 1.1 and 8.0 ms; at 512 rows the copy was slower (0.93-0.97x),
and for a [4,864 x 896] layer it is 2.9x faster at one row and slower at 16. Which layout wins is
the BLAS's and the shape's affair, so it is timed here, at load, on the model's own weight: row
counts 1, 2, 4, ... up to the engine's running cap, stopping at the first where the copy does not
win by `MIN_GAIN`. Each call then takes the copy up to the last row count where it won, and
`linear` above it (kept only when such a count exists).

Only a plain `torch.nn.Linear` on CPU is touched: a tensor-parallel head (DeepSpeed's all-reduce
wrapper), a pipeline stage without the head, and every CUDA model keep theirs. The copy is one more
[vocab x hidden] tensor beside the original (an untied head that wins at every count drops the
original). `BATCHSERVE_CPU_HEAD_LAYOUT=linear` in the replica's environment keeps `linear` (the
benchmark's "before"); `=transposed` takes the copy for every call, without timing.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Callable, Optional

import torch

from app.backends.choice import time_candidates_ms

logger = logging.getLogger("ray.serve")

LAYOUT_ENV = "BATCHSERVE_CPU_HEAD_LAYOUT"
MIN_GAIN = 1.1  # the copy must be this much faster: timing noise is not a reason to keep it


class TransposedHead(torch.nn.Module):
    """`linear(x, weight, bias)`, computed as `x @ weight_t (+ bias)` (`weight_t` = weight.T
    contiguous) for calls of at most `max_rows` rows, and by `linear` on the original `weight`
    above that (`weight` None: every call takes the copy)."""

    def __init__(self, weight_t: torch.Tensor, bias: Optional[torch.Tensor], weight: Optional[torch.Tensor] = None,
                 max_rows: float = math.inf):
        super().__init__()
        self.weight_t = torch.nn.Parameter(weight_t, requires_grad=False)
        self.weight = None if weight is None else torch.nn.Parameter(weight.detach(), requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)
        self.in_features, self.out_features = weight_t.shape
        self.max_rows = max_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and hidden.numel() // self.in_features > self.max_rows:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        out = torch.matmul(hidden, self.weight_t)
        return out if self.bias is None else out + self.bias


def head_gains(weight: torch.Tensor, weight_t: torch.Tensor, max_rows: int,
               time_ms: Callable[[dict[str, Callable[[], Any]]], dict[str, float]] = time_candidates_ms
               ) -> dict[int, float]:
    """linear(x, weight)'s time over x @ weight_t's for x of 1, 2, 4, ... rows, up to max_rows (the
    last count is max_rows itself), stopping after the first count where the copy is not faster.
    Timed as `backend: auto` times its candidates: interleaved rounds, the best round kept."""
    gains: dict[int, float] = {}
    counts = sorted({min(2 ** i, max_rows) for i in range(max(1, max_rows).bit_length() + 1)})
    with torch.inference_mode():
        for n in counts:
            x = torch.randn(n, weight.shape[1], dtype=weight.dtype)
            ms = time_ms({"linear": lambda: torch.nn.functional.linear(x, weight),
                          "transposed": lambda: x @ weight_t})
            gains[n] = ms["linear"] / ms["transposed"]
            if gains[n] < MIN_GAIN:
                break
    return gains


def rows_for_copy(gains: dict[int, float]) -> int:
    """The most rows up to which the copy won at every count timed (0: it never won)."""
    best = 0
    for n in sorted(gains):
        if gains[n] < MIN_GAIN:
            break
        best = n
    return best


def use_faster_head_layout(model: Any, max_rows: int, environ: Optional[dict[str, str]] = None) -> bool:
    """Give `model` the transposed head when it is a CPU float Linear and the copy wins for some row
    count up to `max_rows` (see the module's docstring). Returns whether the head was replaced."""
    choice = (environ if environ is not None else os.environ).get(LAYOUT_ENV, "auto").lower()
    if choice not in ("auto", "linear", "transposed"):
        raise ValueError(f"{LAYOUT_ENV} must be auto, linear or transposed, not {choice!r}")
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if (choice == "linear" or type(head) is not torch.nn.Linear or head.weight.device.type != "cpu"
            or not head.weight.dtype.is_floating_point):
        return False
    weight = head.weight.detach()
    weight_t = weight.t().contiguous()
    copy_rows: float = math.inf
    if choice == "auto":
        gains = head_gains(weight, weight_t, max_rows)
        copy_rows = rows_for_copy(gains)
        logger.info("output projection %s: speed-up of x @ W.T (contiguous) over linear(x, W) by rows %s: "
                    "the copy for calls of up to %d rows", tuple(weight.shape),
                    {n: round(g, 2) for n, g in gains.items()}, copy_rows)
        if copy_rows == 0:
            return False
        if copy_rows >= max_rows:
            copy_rows = math.inf
    embedding = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    tied = embedding is not None and getattr(embedding, "weight", None) is head.weight
    keep = weight if copy_rows != math.inf else None
    if tied or keep is not None:
        logger.info("output projection: the transposed copy adds %.0f MB beside the original",
                    weight_t.numel() * weight_t.element_size() / 2**20)
    model.set_output_embeddings(TransposedHead(weight_t, head.bias, weight=keep, max_rows=copy_rows))
    return True
