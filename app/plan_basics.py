"""What the planners share: a model's footprint, the plan, its error, and the stage balance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

GiB = 2**30
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The seed formula's headroom: floor(free x 0.8 / per-sample bytes).
BATCH_HEADROOM = 0.8


class PlanError(ValueError):
    """The model cannot be placed under the declared budget (or a forced setting cannot work)."""


@dataclass(frozen=True)
class Footprint:
    """Sizes of one model, from its config alone."""

    architecture: str
    dtype_bytes: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    # Bytes of the pipeline units in order: [embeddings, layer 0 .. layer n-1, final norm + head].
    unit_bytes: tuple[int, ...]
    activation_bytes_per_sample: int
    kv_bytes_per_token: int  # what a generator's KV cache holds per token (app/kv_cache.py)

    @property
    def param_bytes(self) -> int:
        return sum(self.unit_bytes)



@dataclass(frozen=True)
class ParallelPlan:
    strategy: str  # replicated | deepspeed_tp | fairscale_pp
    tp: int
    pp: int
    chunks: int
    balance: Optional[tuple[int, ...]]  # pipeline units per stage
    devices: int  # devices one replica holds
    max_batch_size: int  # min(config cap, memory_max_batch_size)
    memory_max_batch_size: int  # what memory alone allows (the seed formula); bounds live retunes too
    param_bytes: int
    per_device_param_bytes: int
    activation_bytes_per_sample: int
    usable_bytes_per_device: int
    reasons: tuple[str, ...] = field(default_factory=tuple)
    # Generators: KV cache tokens the planner expects after the weights (the replica measures the
    # real figure at start: free memory x kv_cache_memory_fraction, under kv_cache_max_tokens).
    kv_cache_tokens: Optional[int] = None

    def explain(self) -> str:
        return "; ".join(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        d["balance"] = list(self.balance) if self.balance else None
        return d


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def balance_stages(unit_bytes: Sequence[int], stages: int) -> tuple[int, ...]:
    """Split units into `stages` contiguous groups minimising the largest group (binary search on it)."""
    n = len(unit_bytes)
    if stages > n:
        raise PlanError(f"pp: {stages} stages for only {n} pipeline units")

    def groups_needed(limit: int) -> Optional[list[int]]:
        counts, acc, cnt = [], 0, 0
        for b in unit_bytes:
            if b > limit:
                return None
            if acc + b > limit:
                counts.append(cnt)
                acc, cnt = 0, 0
            acc += b
            cnt += 1
        counts.append(cnt)
        return counts

    lo, hi = max(unit_bytes), sum(unit_bytes)
    while lo < hi:
        mid = (lo + hi) // 2
        got = groups_needed(mid)
        if got is not None and len(got) <= stages:
            hi = mid
        else:
            lo = mid + 1
    counts = groups_needed(lo) or [n]
    # Exactly `stages` groups: split the largest groups of several units until the count is right.
    while len(counts) < stages:
        i = max(range(len(counts)), key=lambda k: counts[k])
        a = counts[i] // 2
        counts[i : i + 1] = [a, counts[i] - a]
    return tuple(counts)


def _tp_ok(fp: Footprint, t: int) -> bool:
    return fp.num_heads % t == 0 and fp.hidden_size % t == 0 and fp.num_kv_heads % t == 0


def _widest_tp(fp: Footprint, per_node: int) -> int:
    """The largest tp <= a node's devices that divides the heads (1 if none does)."""
    return max((t for t in range(1, per_node + 1) if t == 1 or _tp_ok(fp, t)), default=1)
