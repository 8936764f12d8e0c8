"""Size-aware execution planning: replicated, DeepSpeed tensor-parallel or Fairscale pipeline-parallel.

Pure: the model is built on the meta device (no weights allocated), sizes come from its parameters
and a per-sample activation estimate, and the decision is a function of those sizes and the device
budget. Every decision carries its reasons in words.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from app.models.anatomy import UnsupportedArchitecture, layer_modules
from app.config import ModelSpec, ParallelConfig
from app.kv_cache import kv_bytes_per_token
from app.plan_basics import (BATCH_HEADROOM, GiB, _DTYPE_BYTES, Footprint, ParallelPlan, PlanError,  # noqa: F401
                             _gb, _tp_ok, _widest_tp, balance_stages)

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
    if spec.task == "generate":
        from app.planner_generate import plan_generator

        return plan_generator(spec, fp, usable, reasons)

    def replicated(why: str) -> ParallelPlan:
        mem = _batch_cap(usable - fp.param_bytes, act)
        mb = min(cap, mem)
        if mb < par.min_batch_size:
            raise PlanError(
                f"{spec.name}: replicated needs {_gb(need_one)} on one device ({_gb(fp.param_bytes)} parameters + "
                f"{par.min_batch_size} x {act / 2**20:.1f} MiB activations) but {_gb(usable)} is usable"
            )
        return ParallelPlan("replicated", 1, 1, 1, None, 1, mb, mem, fp.param_bytes, fp.param_bytes, act, int(usable),
                            tuple(reasons + [why, f"max_batch_size {mb} = min(cap {cap}, floor(free x 0.8 / per-sample))"]))

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
            notes.append(f"{p} stages span {math.ceil(p / dev.per_node)} nodes: fairscale's Pipe runs in one "
                         "process; strategy tp_pp runs stages as Ray actors across nodes")
        return ParallelPlan("fairscale_pp", 1, p, m, balance, p, mb, mem, fp.param_bytes, worst, act, int(usable),
                            tuple(reasons + notes))

    def stage_pipeline(t: int, p: int, why: str) -> ParallelPlan:
        """p stages of t ranks each, one Ray actor per rank (app/runners/stage_pipeline.py)."""
        if t > 1 and not _tp_ok(fp, t):
            raise PlanError(f"{spec.name}: tp={t} must divide attention heads ({fp.num_heads}), kv heads "
                            f"({fp.num_kv_heads}) and hidden size ({fp.hidden_size})")
        worst, balance = _fullest_stage(fp, p)
        m = par.chunks or chunks_for_bubble(p, par.max_bubble)
        p_bytes, a_bytes = worst / t, int(_tp_device_bytes(fp, t, 1)[1])
        mem = _batch_cap(usable - p_bytes, a_bytes)
        mem = max(mem * m // 2, mem) if m > 1 else mem  # a stage holds about one micro-batch at a time
        mb = min(cap, mem)
        if mb < max(par.min_batch_size, 1):
            raise PlanError(f"{spec.name}: tp={t} x pp={p} leaves {_gb(p_bytes)} per rank on the fullest stage; "
                            f"{_gb(usable)} is usable")
        bubble = (p - 1) / (m + p - 1)
        return ParallelPlan("tp_pp", t, p, m, balance, t * p, mb, mem, fp.param_bytes, int(p_bytes), act, int(usable),
                            tuple(reasons + [why, f"stages of {list(balance)} units, {_gb(p_bytes)} per rank on the "
                                                  f"fullest; {m} micro-batches in flight -> bubble {bubble:.0%}; "
                                                  "stages are Ray actors, a stage's ranks on one node"]))

    # ---------------- forced settings
    if par.strategy == "replicated":
        return replicated("strategy forced to replicated by parallel.strategy")
    if par.strategy == "deepspeed_tp":
        t = par.tp or _smallest_tp(fp, dev.per_node, usable, par.min_batch_size)
        if t is None:
            raise PlanError(f"{spec.name}: no tp <= {dev.per_node} fits and divides the heads; {sizes}")
        return tensor_parallel(t, f"strategy forced to deepspeed_tp (tp={t})")
    if par.strategy == "fairscale_pp":
        p = par.pp or _smallest_pp(fp, total_devices, usable, par.min_batch_size) or 2
        return pipeline(p, f"strategy forced to fairscale_pp (pp={p})")
    if par.strategy == "tp_pp":
        t = par.tp or _widest_tp(fp, dev.per_node)
        p = par.pp or _smallest_pp(fp, total_devices // t, usable, par.min_batch_size, t) or 2
        return stage_pipeline(t, p, f"strategy forced to tp_pp (tp={t} x pp={p})")

    # ---------------- auto
    if need_one <= usable:
        return replicated(f"fits one device ({_gb(need_one)} <= {_gb(usable)}): one copy per replica, replicas scale out")
    deep_narrow = fp.num_layers >= par.pipeline_min_layers and fp.hidden_size <= par.pipeline_max_hidden
    p = _smallest_pp(fp, total_devices, usable, par.min_batch_size)
    if p is not None and p > dev.per_node and dev.nodes > 1:
        # One process cannot hold stages on several nodes: stages as Ray actors, each as wide a
        # tensor-parallel group as a node's fast links allow, as few stages as fit.
        t = _widest_tp(fp, dev.per_node)
        p2 = _smallest_pp(fp, total_devices // t, usable, par.min_batch_size, t)
        if p2 is not None:
            return stage_pipeline(t, p2, f"does not fit one node's devices as one pipeline or tp gang; tp={t} fills "
                                         f"a node's fast links and {p2} such stages across nodes fit")
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


def _smallest_tp(fp: Footprint, per_node: int, usable: float, min_batch: int) -> Optional[int]:
    for t in range(2, per_node + 1):
        if not _tp_ok(fp, t):
            continue
        p_bytes, a_bytes = _tp_device_bytes(fp, t, min_batch)
        if p_bytes + a_bytes <= usable:
            return t
    return None


def _fullest_stage(fp: Footprint, p: int) -> tuple[int, tuple[int, ...]]:
    """(bytes of the fullest of p balanced stages, the balance)."""
    balance = balance_stages(fp.unit_bytes, p)
    i, worst = 0, 0
    for c in balance:
        worst = max(worst, sum(fp.unit_bytes[i : i + c]))
        i += c
    return worst, tuple(balance)


def _smallest_pp(fp: Footprint, total_devices: int, usable: float, min_batch: int, t: int = 1) -> Optional[int]:
    """Fewest stages (of t ranks each) whose fullest stage holds its weights and min_batch samples."""
    for p in range(2, min(total_devices, len(fp.unit_bytes)) + 1):
        worst, _ = _fullest_stage(fp, p)
        if worst / t + min_batch * _tp_device_bytes(fp, t, 1)[1] <= usable:
            return p
    return None


def plan_model(spec: ModelSpec, vocab_size: Optional[int] = None) -> ParallelPlan:
    """Footprint + decision for one spec (builds the config, allocates nothing)."""
    from app.models.loader import build_config

    return plan(spec, footprint(spec, build_config(spec, vocab_size)))
