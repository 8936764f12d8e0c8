"""The planner's decision for generators (`task: generate`): one device, a tensor-parallel gang
inside a node, pipeline stages that are each a tensor-parallel group (tp x pp: TP over a node's
fast links, stages across nodes), or a pipeline of one-device stages where the heads do not
split; each sized with its share of the KV cache.

A generator needs room for its weights and at least one full-length sequence's keys and values:
on one device, 1/tp of both per rank of a gang, or each stage's layers' share on a pipeline. The
KV budget is the seed formula (app/kv_cache.py) on what the weights leave, per rank; the replica
measures the real figure at start.
"""

from __future__ import annotations

from typing import Optional, Sequence

from app.config import ModelSpec
from app.kv_cache import kv_budget
from app.plan_basics import Footprint, ParallelPlan, PlanError, _gb, _tp_ok, _widest_tp, balance_stages


def plan_generator(spec: ModelSpec, fp: Footprint, usable: float, reasons: list[str]) -> ParallelPlan:
    par, dev = spec.parallel, spec.parallel.devices
    total_devices = dev.per_node * dev.nodes
    if par.strategy == "replicated":
        return _on_gang(spec, fp, usable, reasons, "strategy forced to replicated by parallel.strategy", 1)
    if par.strategy == "deepspeed_tp":
        t = par.tp or _smallest_tp(spec, fp, dev.per_node, usable)
        if t is None:
            raise PlanError(f"{spec.name}: no tp <= {dev.per_node} holds the weights and a full-length sequence's "
                            f"KV cache and divides the heads")
        return _on_gang(spec, fp, usable, reasons, f"strategy forced to deepspeed_tp (tp={t})", t)
    if par.strategy == "fairscale_pp":
        p = par.pp or _smallest_pp(spec, fp, total_devices, usable) or 2
        return _pipeline(spec, fp, usable, reasons, f"strategy forced to fairscale_pp (pp={p})", p)
    if par.strategy == "tp_pp":
        t = par.tp or _widest_tp(fp, dev.per_node)
        p = par.pp or _smallest_pp(spec, fp, total_devices // t, usable, t) or 2
        return _pipeline(spec, fp, usable, reasons, f"strategy forced to tp_pp (tp={t} x pp={p})", p, t)
    if _fits(spec, fp, 1, usable):
        return _on_gang(spec, fp, usable, reasons, f"weights and one full-length sequence's KV cache fit one device "
                                                   f"({_gb(fp.param_bytes)} of parameters)", 1)
    t = _smallest_tp(spec, fp, dev.per_node, usable)
    if t is not None:
        return _on_gang(spec, fp, usable, reasons, f"does not fit one device with a full-length sequence's KV cache; "
                                                   f"tp={t} is the smallest split inside one node that does and "
                                                   "divides the heads", t)
    t = _widest_tp(fp, dev.per_node)
    p = _smallest_pp(spec, fp, total_devices // t, usable, t) if t > 1 and dev.nodes > 1 else None
    if p is not None:
        return _pipeline(spec, fp, usable, reasons, f"does not fit a tp gang inside one node ({dev.per_node} devices) "
                                                    f"with a full-length sequence's KV cache; tp={t} fills a node's "
                                                    f"fast links and {p} such stages across nodes do", p, t)
    p = _smallest_pp(spec, fp, total_devices, usable)
    if p is not None:
        return _pipeline(spec, fp, usable, reasons, f"does not fit one device nor a tp gang inside one node "
                                                    f"({dev.per_node} devices) with a full-length sequence's KV "
                                                    f"cache; {p} stages do", p)
    raise PlanError(f"{spec.name}: a generator needs its weights and one full-length sequence's KV cache on one "
                    f"device, a tp gang of at most {dev.per_node} devices, stages of such gangs over {dev.nodes} node(s) "
                    f"or a pipeline of at most {total_devices}; "
                    f"none fits ({reasons[0]})")


def _on_gang(spec: ModelSpec, fp: Footprint, usable: float, reasons: list[str], why: str, t: int) -> ParallelPlan:
    """One device (t = 1) or a tp-rank gang: each rank holds 1/t of the weights and of every
    token's keys and values, so the KV budget is counted per rank."""
    g = spec.generation
    run = g.max_running_sequences
    if t > 1 and not _tp_ok(fp, t):
        raise PlanError(f"{spec.name}: tp={t} must divide attention heads ({fp.num_heads}), kv heads "
                        f"({fp.num_kv_heads}) and hidden size ({fp.hidden_size})")
    p_bytes, kv_per_rank = fp.param_bytes / t, fp.kv_bytes_per_token // t
    budget = kv_budget(int(max(0.0, usable - p_bytes)), kv_per_rank, g.kv_cache_memory_fraction, g.kv_cache_max_tokens)
    kv_tokens = budget.tokens
    cap_note = f" (capped by kv_cache_max_tokens {g.kv_cache_max_tokens})" if budget.capped_by else ""
    where = "" if t == 1 else f" per rank of tp={t}"
    if kv_tokens < spec.max_seq_len:
        raise PlanError(
            f"{spec.name}: after {_gb(p_bytes)} of parameters{where}, {_gb(max(0.0, usable - p_bytes))} "
            f"leaves a KV cache of {kv_tokens} tokens ({kv_per_rank} bytes each{where}), under one "
            f"full-length sequence ({spec.max_seq_len})")
    full = kv_tokens // spec.max_seq_len
    kv = (f"KV cache {kv_tokens} tokens = floor(free x {g.kv_cache_memory_fraction:g} / "
          f"{kv_per_rank} B per token{where}){cap_note}: {full} full-length sequences at once, "
          f"{run} decoded per step")
    strategy = "replicated" if t == 1 else "deepspeed_tp"
    return ParallelPlan(strategy, t, 1, 1, None, t, run, run, fp.param_bytes, int(p_bytes),
                        fp.activation_bytes_per_sample, int(usable), tuple(reasons + [why, kv]),
                        kv_cache_tokens=kv_tokens)


def _pipeline(spec: ModelSpec, fp: Footprint, usable: float, reasons: list[str], why: str, p: int,
              t: int = 1) -> ParallelPlan:
    """p stages of layers, each stage holding its layers' KV cache; with t > 1 each stage is a
    tensor-parallel group of t ranks holding 1/t of the stage's weights and KV heads."""
    g = spec.generation
    if t > 1 and not _tp_ok(fp, t):
        raise PlanError(f"{spec.name}: tp={t} must divide attention heads ({fp.num_heads}), kv heads "
                        f"({fp.num_kv_heads}) and hidden size ({fp.hidden_size})")
    found = _stages(spec, fp, p, usable, t)
    if found is None:
        raise PlanError(f"{spec.name}: pp={p} leaves a generator stage without a decoder layer "
                        f"({fp.num_layers} layers): use fewer stages")
    balance, worst, tokens, kv_worst = found
    kv_tokens = min(tokens, g.kv_cache_max_tokens) if g.kv_cache_max_tokens is not None else tokens
    if kv_tokens < spec.max_seq_len:
        raise PlanError(f"{spec.name}: pp={p} leaves a KV cache of {kv_tokens} tokens on its fullest stage "
                        f"({_gb(worst)} of parameters), under one full-length sequence ({spec.max_seq_len})")
    run = g.max_running_sequences
    per = "" if t == 1 else f" per rank of tp={t}"
    notes = [why, f"stages of {list(balance)} units, fullest {_gb(worst)}{per}; KV cache {kv_tokens} tokens "
                  f"(the stage that runs out first holds {kv_worst} B per token{per}), {run} decoded per step; stage "
                  "processes step in lockstep (Fairscale Pipe cannot carry the paged KV cache), no micro-batches "
                  "overlap yet"]
    return ParallelPlan("fairscale_pp" if t == 1 else "tp_pp", t, p, 1, balance, t * p, run, run, fp.param_bytes,
                        worst, fp.activation_bytes_per_sample, int(usable), tuple(reasons + notes),
                        kv_cache_tokens=kv_tokens)


def _fits(spec: ModelSpec, fp: Footprint, t: int, usable: float) -> bool:
    """Weights and one full-length sequence's KV cache, 1/t of each per rank, within the KV fraction."""
    left = usable - fp.param_bytes / t
    return left * spec.generation.kv_cache_memory_fraction >= spec.max_seq_len * fp.kv_bytes_per_token / t


def _smallest_tp(spec: ModelSpec, fp: Footprint, per_node: int, usable: float) -> Optional[int]:
    for t in range(2, per_node + 1):
        if _tp_ok(fp, t) and _fits(spec, fp, t, usable):
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


def _stages(spec: ModelSpec, fp: Footprint, p: int, usable: float,
            t: int = 1) -> Optional[tuple[tuple[int, ...], int, int, int]]:
    """(balance, fullest stage's bytes per rank, KV tokens of the stage that runs out first, its KV
    bytes per token per rank) for p stages of t ranks; None where a stage would hold no decoder layer."""
    from app.models.generation_stages import layer_ranges

    try:
        balance = generator_balance(fp.unit_bytes, p)
        ranges = layer_ranges(balance, fp.num_layers)
    except (PlanError, ValueError):
        return None
    worst, tokens, kv_worst, i = 0, None, 0, 0
    for count, (a, b) in zip(balance, ranges):
        stage_bytes = sum(fp.unit_bytes[i : i + count]) // t
        i += count
        worst = max(worst, stage_bytes)
        kv = max(1, fp.kv_bytes_per_token * (b - a) // fp.num_layers // t)
        fit = int(max(0.0, usable - stage_bytes) * spec.generation.kv_cache_memory_fraction) // kv
        if tokens is None or fit < tokens:
            tokens, kv_worst = fit, kv
    return balance, worst, int(tokens or 0), kv_worst


def _smallest_pp(spec: ModelSpec, fp: Footprint, total_devices: int, usable: float, t: int = 1) -> Optional[int]:
    """Fewest stages of t ranks each (at most `total_devices` stages) that hold the weights and one
    full-length sequence's KV cache."""
    for p in range(2, min(total_devices, fp.num_layers) + 1):
        found = _stages(spec, fp, p, usable, t)
        if found is not None and found[2] >= spec.max_seq_len:
            return p
    return None
