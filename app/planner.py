"""Size-aware execution planning: replicated, DeepSpeed tensor-parallel or Fairscale pipeline-parallel.

Pure: the model is built on the meta device (no weights allocated), sizes come from its parameters
and a per-sample activation estimate, and the decision is a function of those sizes and the device
budget. Every decision carries its reasons in words.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from app.models.anatomy import UnsupportedArchitecture, layer_modules
from app.config import ModelSpec, ParallelConfig
from app.kv_cache import kv_budget, kv_bytes_per_token

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


# ----------------------------------------------------------------------------------------------
# Footprint from a transformers config, on the meta device
# ----------------------------------------------------------------------------------------------


def _params_bytes(modules: Sequence[Any], dtype_bytes: int, seen: set[int]) -> int:
    total = 0
    for mod in modules:
        for p in mod.parameters():
            if id(p) not in seen:  # a tied weight counts once
                seen.add(id(p))
                total += p.numel() * dtype_bytes
    return total


def activation_bytes_per_sample(seq_len: int, hidden: int, intermediate: int, heads: int, dtype_bytes: int) -> int:
    """Peak activation memory of one sample in one layer at inference (layers run one after another).

    Residual stream and its norm (2h), q/k/v and attention output (4h), the MLP's up/gate outputs
    (2i), per token; plus one heads x L x L score matrix (the math attention path materialises it).
    An estimate: the replica measures the real figure at start-up.
    """
    per_token = 6 * hidden + 2 * intermediate
    return seq_len * per_token * dtype_bytes + heads * seq_len * seq_len * dtype_bytes


def footprint(spec: ModelSpec, config: Any) -> Footprint:
    """Sizes of the model described by `config` (a transformers config), without allocating weights."""
    import torch

    from app.models.loader import auto_model_class

    dtype = "float32" if spec.dtype == "auto" and spec.parallel.devices.kind == "cpu" else spec.dtype
    dtype_bytes = _DTYPE_BYTES.get(dtype, 2)  # auto on GPU serves bf16
    with torch.device("meta"):
        model = auto_model_class(spec).from_config(config)
    try:
        _, embeddings, layers, after = layer_modules(model)
    except UnsupportedArchitecture as e:
        raise PlanError(str(e)) from None
    seen: set[int] = set()
    units = [_params_bytes([embeddings], dtype_bytes, seen)]
    units += [_params_bytes([layer], dtype_bytes, seen) for layer in layers]
    units.append(_params_bytes(after, dtype_bytes, seen))
    units[-1] += sum(p.numel() * dtype_bytes for p in model.parameters() if id(p) not in seen)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    inter = int(getattr(config, "intermediate_size", None) or getattr(config, "ffn_dim", 4 * hidden))
    return Footprint(
        architecture=config.model_type,
        dtype_bytes=dtype_bytes,
        num_layers=len(layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        intermediate_size=inter,
        unit_bytes=tuple(units),
        activation_bytes_per_sample=activation_bytes_per_sample(spec.max_seq_len, hidden, inter, heads, dtype_bytes),
        kv_bytes_per_token=kv_bytes_per_token(config, dtype_bytes),
    )


# ----------------------------------------------------------------------------------------------
# Decision
# ----------------------------------------------------------------------------------------------


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


def chunks_for_bubble(pp: int, max_bubble: float) -> int:
    """Smallest micro-batch count m with (p-1)/(m+p-1) <= max_bubble."""
    if pp <= 1:
        return 1
    return max(1, math.ceil((pp - 1) * (1 - max_bubble) / max_bubble - 1e-9))


_MAX_BATCH = 65536


def _batch_cap(free_bytes: float, act: int, cap: int = _MAX_BATCH) -> int:
    if free_bytes <= 0:
        return 0
    return min(cap, math.floor(free_bytes * BATCH_HEADROOM / max(act, 1)))


def _tp_ok(fp: Footprint, t: int) -> bool:
    return fp.num_heads % t == 0 and fp.hidden_size % t == 0 and fp.num_kv_heads % t == 0


def _tp_device_bytes(fp: Footprint, t: int, batch: int) -> tuple[float, float]:
    """(parameter bytes, activation bytes for `batch`) on one TP rank.

    Attention heads and the MLP are split t ways; the residual stream (a third of the per-token
    activation estimate, roughly) stays whole on every rank.
    """
    act = fp.activation_bytes_per_sample * (1 / 3 + (2 / 3) / t)
    return fp.param_bytes / t, act * batch


def plan(spec: ModelSpec, fp: Footprint) -> ParallelPlan:
    par: ParallelConfig = spec.parallel
    dev = par.devices
    usable = dev.memory_gib * GiB * dev.usable_fraction
    act = fp.activation_bytes_per_sample
    cap = spec.batching.max_batch_size
    total_devices = dev.per_node * dev.nodes
    need_one = fp.param_bytes + par.min_batch_size * act
    sizes = (
        f"{fp.architecture}: {_gb(fp.param_bytes)} of parameters ({fp.num_layers} layers, hidden {fp.hidden_size}), "
        f"~{act / 2**20:.1f} MiB activations per sample at seq {spec.max_seq_len}; "
        f"{dev.kind} budget {dev.per_node} x {dev.memory_gib:g} GiB per node x {dev.nodes} node(s), "
        f"{_gb(usable)} usable per device"
    )
    reasons = [sizes]

    def replicated(why: str) -> ParallelPlan:
        if spec.task == "generate":
            return generator(why)
        mem = _batch_cap(usable - fp.param_bytes, act)
        mb = min(cap, mem)
        if mb < par.min_batch_size:
            raise PlanError(
                f"{spec.name}: replicated needs {_gb(need_one)} on one device ({_gb(fp.param_bytes)} parameters + "
                f"{par.min_batch_size} x {act / 2**20:.1f} MiB activations) but {_gb(usable)} is usable"
            )
        return ParallelPlan("replicated", 1, 1, 1, None, 1, mb, mem, fp.param_bytes, fp.param_bytes, act, int(usable),
                            tuple(reasons + [why, f"max_batch_size {mb} = min(cap {cap}, floor(free x 0.8 / per-sample))"]))

    def generator(why: str, t: int = 1) -> ParallelPlan:
        """A generator on one device (t = 1) or a tp-rank gang: each rank holds 1/t of the weights
        and of every token's keys and values, so the KV budget is counted per rank."""
        g = spec.generation
        run = g.max_running_sequences
        if t > 1 and not _tp_ok(fp, t):
            raise PlanError(f"{spec.name}: tp={t} must divide attention heads ({fp.num_heads}), kv heads "
                            f"({fp.num_kv_heads}) and hidden size ({fp.hidden_size})")
        p_bytes, kv_per_rank = fp.param_bytes / t, fp.kv_bytes_per_token // t
        budget = kv_budget(int(max(0.0, usable - p_bytes)), kv_per_rank, g.kv_cache_memory_fraction,
                           g.kv_cache_max_tokens)
        kv_tokens = budget.tokens
        cap_note = f" (capped by kv_cache_max_tokens {g.kv_cache_max_tokens})" if budget.capped_by else ""
        where = "" if t == 1 else f" per rank of tp={t}"
        if kv_tokens < spec.max_seq_len:
            raise PlanError(
                f"{spec.name}: after {_gb(p_bytes)} of parameters{where}, {_gb(max(0.0, usable - p_bytes))} "
                f"leaves a KV cache of {kv_tokens} tokens ({kv_per_rank} bytes each{where}), under one "
                f"full-length sequence ({spec.max_seq_len}); a generator pipeline is not built")
        full = kv_tokens // spec.max_seq_len
        kv = (f"KV cache {kv_tokens} tokens = floor(free x {g.kv_cache_memory_fraction:g} / "
              f"{kv_per_rank} B per token{where}){cap_note}: {full} full-length sequences at once, "
              f"{run} decoded per step")
        strategy = "replicated" if t == 1 else "deepspeed_tp"
        return ParallelPlan(strategy, t, 1, 1, None, t, run, run, fp.param_bytes, int(p_bytes), act, int(usable),
                            tuple(reasons + [why, kv]), kv_cache_tokens=kv_tokens)

    def generator_pipeline(p: int, why: str) -> ParallelPlan:
        """A generator cut into p stages of layers, each stage holding its layers' KV cache."""
        g = spec.generation
        found = _generator_stages(spec, fp, p, usable)
        if found is None:
            raise PlanError(f"{spec.name}: pp={p} leaves a generator stage without a decoder layer "
                            f"({fp.num_layers} layers): use fewer stages")
        balance, worst, tokens, kv_worst = found
        budget_cap = g.kv_cache_max_tokens
        kv_tokens = min(tokens, budget_cap) if budget_cap is not None else tokens
        if kv_tokens < spec.max_seq_len:
            raise PlanError(f"{spec.name}: pp={p} leaves a KV cache of {kv_tokens} tokens on its fullest stage "
                            f"({_gb(worst)} of parameters), under one full-length sequence ({spec.max_seq_len})")
        notes = [why, f"stages of {list(balance)} units, fullest {_gb(worst)}; KV cache {kv_tokens} tokens "
                      f"(the stage that runs out first holds {kv_worst} B per token), {g.max_running_sequences} "
                      "decoded per step; stage processes step in lockstep (Fairscale Pipe cannot carry the "
                      "paged KV cache), no micro-batches overlap yet"]
        run = g.max_running_sequences
        return ParallelPlan("fairscale_pp", 1, p, 1, balance, p, run, run, fp.param_bytes, worst, act, int(usable),
                            tuple(reasons + notes), kv_cache_tokens=kv_tokens)

    def tensor_parallel(t: int, why: str) -> ParallelPlan:
        if not _tp_ok(fp, t):
            raise PlanError(
                f"{spec.name}: tp={t} must divide attention heads ({fp.num_heads}), kv heads ({fp.num_kv_heads}) "
                f"and hidden size ({fp.hidden_size})"
            )
        p_bytes, a_bytes = _tp_device_bytes(fp, t, 1)
        mem = _batch_cap(usable - p_bytes, int(a_bytes))
        mb = min(cap, mem)
        if mb < par.min_batch_size:
            raise PlanError(f"{spec.name}: tp={t} leaves {_gb(p_bytes)} of parameters per device; {_gb(usable)} is usable")
        return ParallelPlan("deepspeed_tp", t, 1, 1, None, t, mb, mem, fp.param_bytes, int(p_bytes), act, int(usable),
                            tuple(reasons + [why, f"max_batch_size {mb} from the memory left on each rank"]))

    def pipeline(p: int, why: str) -> ParallelPlan:
        balance = balance_stages(fp.unit_bytes, p)
        stage_bytes, i = [], 0
        for c in balance:
            stage_bytes.append(sum(fp.unit_bytes[i : i + c]))
            i += c
        worst = max(stage_bytes)
        m = par.chunks or chunks_for_bubble(p, par.max_bubble)
        # Each stage holds one micro-batch's activations at a time (plus its neighbour's in flight).
        mem = _batch_cap(usable - worst, act)
        mem = max(mem * m // 2, mem) if m > 1 else mem
        mb = min(cap, mem)
        if mb < max(par.min_batch_size, 1):
            raise PlanError(f"{spec.name}: pp={p} leaves {_gb(worst)} on the fullest stage; {_gb(usable)} is usable")
        bubble = (p - 1) / (m + p - 1)
        notes = [why, f"stages of {list(balance)} units, fullest {_gb(worst)}; {m} micro-batches -> bubble {bubble:.0%}"]
        if p > dev.per_node:
            notes.append(f"{p} stages span {math.ceil(p / dev.per_node)} nodes: needs a multi-node pipeline, "
                         "which the fairscale runner (one process) does not run")
        return ParallelPlan("fairscale_pp", 1, p, m, balance, p, mb, mem, fp.param_bytes, worst, act, int(usable),
                            tuple(reasons + notes))

    # ---------------- forced settings
    if par.strategy == "replicated":
        return replicated("strategy forced to replicated by parallel.strategy")
    if par.strategy == "deepspeed_tp":
        t = par.tp or (_smallest_generator_tp(spec, fp, dev.per_node, usable) if spec.task == "generate"
                       else _smallest_tp(fp, dev.per_node, usable, par.min_batch_size))
        if t is None:
            raise PlanError(f"{spec.name}: no tp <= {dev.per_node} fits and divides the heads; {sizes}")
        if spec.task == "generate":
            return generator(f"strategy forced to deepspeed_tp (tp={t})", t)
        return tensor_parallel(t, f"strategy forced to deepspeed_tp (tp={t})")
    if par.strategy == "fairscale_pp" and spec.task == "generate":
        p = par.pp or _smallest_generator_pp(spec, fp, total_devices, usable) or 2
        return generator_pipeline(p, f"strategy forced to fairscale_pp (pp={p})")
    if par.strategy == "fairscale_pp":
        p = par.pp or _smallest_pp(fp, total_devices, usable, par.min_batch_size) or 2
        return pipeline(p, f"strategy forced to fairscale_pp (pp={p})")

    # ---------------- auto
    if spec.task == "generate":  # one device, else a TP gang inside a node (no generator pipeline)
        if _generator_fits(spec, fp, 1, usable):
            return replicated(f"weights and one full-length sequence's KV cache fit one device "
                              f"({_gb(fp.param_bytes)} of parameters)")
        t = _smallest_generator_tp(spec, fp, dev.per_node, usable)
        if t is not None:
            return generator(f"does not fit one device with a full-length sequence's KV cache; tp={t} is the "
                             "smallest split inside one node that does and divides the heads", t)
        p = _smallest_generator_pp(spec, fp, total_devices, usable)
        if p is not None:
            return generator_pipeline(p, f"does not fit one device nor a tp gang inside one node ({dev.per_node} "
                                         f"devices) with a full-length sequence's KV cache; {p} stages do")
        raise PlanError(f"{spec.name}: a generator needs its weights and one full-length sequence's KV cache on one "
                        f"device, a tp gang of at most {dev.per_node} devices or a pipeline of at most "
                        f"{total_devices}; none fits ({sizes})")
    if need_one <= usable:
        return replicated(f"fits one device ({_gb(need_one)} <= {_gb(usable)}): one copy per replica, replicas scale out")
    deep_narrow = fp.num_layers >= par.pipeline_min_layers and fp.hidden_size <= par.pipeline_max_hidden
    p = _smallest_pp(fp, total_devices, usable, par.min_batch_size)
    if deep_narrow and p is not None:
        return pipeline(p, f"does not fit one device; deep ({fp.num_layers} layers) and narrow (hidden {fp.hidden_size}): "
                           f"a pipeline of {p} stages avoids two all-reduces per layer")
    t = _smallest_tp(fp, dev.per_node, usable, par.min_batch_size)
    if t is not None:
        return tensor_parallel(t, f"does not fit one device ({_gb(need_one)} > {_gb(usable)}); "
                                  f"tp={t} is the smallest split inside one node that fits and divides the heads")
    if p is not None:
        return pipeline(p, f"does not fit one device nor tensor-parallel inside one node ({dev.per_node} devices); "
                           f"a pipeline of {p} stages fits")
    raise PlanError(
        f"{spec.name} fits nowhere: {_gb(fp.param_bytes)} of parameters plus activations do not fit "
        f"one device ({_gb(usable)} usable), tensor-parallel over {dev.per_node} devices of a node, "
        f"nor a pipeline over {total_devices} devices ({sizes})"
    )


def _generator_fits(spec: ModelSpec, fp: Footprint, t: int, usable: float) -> bool:
    """Weights and one full-length sequence's KV cache, 1/t of each per rank, within the KV fraction."""
    left = usable - fp.param_bytes / t
    return left * spec.generation.kv_cache_memory_fraction >= spec.max_seq_len * fp.kv_bytes_per_token / t


def _smallest_generator_tp(spec: ModelSpec, fp: Footprint, per_node: int, usable: float) -> Optional[int]:
    for t in range(2, per_node + 1):
        if _tp_ok(fp, t) and _generator_fits(spec, fp, t, usable):
            return t
    return None


def generator_balance(unit_bytes: Sequence[int], stages: int) -> tuple[int, ...]:
    """balance_stages for a generator: every stage holds at least one decoder layer (the embeddings
    ride with the first layer and the head with the last), since a stage's paged KV cache and its
    place in the lockstep need a layer of its own."""
    u = list(unit_bytes)
    if len(u) < 3 or stages > len(u) - 2:
        raise PlanError(f"pp: {stages} generator stages for only {len(u) - 2} decoder layers")
    merged = [u[0] + u[1]] + u[2:-2] + [u[-2] + u[-1]] if len(u) > 3 else [sum(u)]
    b = list(balance_stages(merged, stages))
    b[0] += 1
    b[-1] += 1
    return tuple(b)


def _generator_stages(spec: ModelSpec, fp: Footprint, p: int, usable: float
                      ) -> Optional[tuple[tuple[int, ...], int, int, int]]:
    """(balance, fullest stage's bytes, KV tokens of the stage that runs out first, its KV bytes per
    token) for p stages; None where a stage would hold no decoder layer."""
    from app.models.generation_stages import layer_ranges

    try:
        balance = generator_balance(fp.unit_bytes, p)
        ranges = layer_ranges(balance, fp.num_layers)
    except (PlanError, ValueError):
        return None
    worst, tokens, kv_worst, i = 0, None, 0, 0
    for count, (a, b) in zip(balance, ranges):
        stage_bytes = sum(fp.unit_bytes[i : i + count])
        i += count
        worst = max(worst, stage_bytes)
        kv = max(1, fp.kv_bytes_per_token * (b - a) // fp.num_layers)
        t = int(max(0.0, usable - stage_bytes) * spec.generation.kv_cache_memory_fraction) // kv
        if tokens is None or t < tokens:
            tokens, kv_worst = t, kv
    return balance, worst, int(tokens or 0), kv_worst


def _smallest_generator_pp(spec: ModelSpec, fp: Footprint, total_devices: int, usable: float) -> Optional[int]:
    for p in range(2, min(total_devices, fp.num_layers) + 1):
        found = _generator_stages(spec, fp, p, usable)
        if found is not None and found[2] >= spec.max_seq_len:
            return p
    return None


def _smallest_tp(fp: Footprint, per_node: int, usable: float, min_batch: int) -> Optional[int]:
    for t in range(2, per_node + 1):
        if not _tp_ok(fp, t):
            continue
        p_bytes, a_bytes = _tp_device_bytes(fp, t, min_batch)
        if p_bytes + a_bytes <= usable:
            return t
    return None


def _smallest_pp(fp: Footprint, total_devices: int, usable: float, min_batch: int) -> Optional[int]:
    for p in range(2, min(total_devices, len(fp.unit_bytes)) + 1):
        balance = balance_stages(fp.unit_bytes, p)
        i, worst = 0, 0
        for c in balance:
            worst = max(worst, sum(fp.unit_bytes[i : i + c]))
            i += c
        if worst + min_batch * fp.activation_bytes_per_sample <= usable:
            return p
    return None


def plan_model(spec: ModelSpec, vocab_size: Optional[int] = None) -> ParallelPlan:
    """Footprint + decision for one spec (builds the config, allocates nothing)."""
    from app.models.loader import build_config

    return plan(spec, footprint(spec, build_config(spec, vocab_size)))
