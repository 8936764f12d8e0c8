"""Generation on a gang of processes: a DeepSpeed AutoTP gang (deepspeed_tp) or a pipeline of
layer stages (fairscale_pp plans); the generator replica is rank 0 and drives the gang.

transformers' continuous-batching manager is built for tensor parallelism: rank 0 (its "TP driver")
owns the request queue and, at every step, broadcasts the new requests and cancellations to the
other ranks over a gloo group; every rank then schedules the same batch from the same state and
runs the same forward over its part of the model. So every rank here runs the same
GenerationEngine, and only rank 0's is given requests:
- tensor-parallel: each rank holds 1/tp of every layer (DeepSpeed's all-reduces inside the forward)
  and the KV cache of its own heads;
- pipeline: each rank is a stage holding its layers and their KV cache; hidden states go stage to
  stage and the last stage's logits are broadcast (app/models/generation_stages.py);
- tp x pp: each stage is a tensor-parallel group of tp ranks (its own DeepSpeed AutoTP group), and
  rank t of a stage sends to rank t of the next. Fairscale's
  Pipe does not fit here: it splits one tensor into micro-batches along the batch dimension, while
  the manager packs a step's sequences into one row and passes its paged cache and indices beside
  the tensors, which Pipe cannot carry through its stages. One step visits the stages in turn (no
  micro-batches overlap across stages yet; docs/performance.md measures what that costs).
No sampled token is broadcast: every rank has the same logits (all-reduced, or broadcast from the
last stage) and sampling.py's noise is a pure function of (seed, position, vocabulary index), so
every rank takes the same token.

Rank 0 lives in the replica (no extra hop per token); ranks 1.. are Ray actors in the replica's
placement group (bundle s holds stage s's ranks: one bundle for a TP gang, one per stage of a
pipeline, whose stages Ray may place on different nodes). A rank that dies leaves the others in a collective that
never completes: a watcher sees its `serve` call end, aborts every stream with 503 at once, and the
health check fails so Serve replaces the whole gang.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional

import ray
import torch

from app.config import ModelSpec
from app.kv_cache import KVBudget, free_memory_bytes, kv_budget, kv_bytes_per_token
from app.planner import ParallelPlan
from app.runners.tp_group import (free_port, gang_gpu_ids, join_process_group, remove_shm_buffers, shard_with_autotp,
                                  shm_buffer_prefix, spawn_ranks, where_am_i)

logger = logging.getLogger("ray.serve")

_HEALTH_TIMEOUT_S = 30.0


def gang_size(plan: ParallelPlan) -> int:
    """Ranks of the gang: tp (deepspeed_tp), pp (stages of one rank) or tp x pp (stages of tp ranks)."""
    return plan.tp * plan.pp


def kv_shares(plan: ParallelPlan, num_layers: int) -> list[float]:
    """The share of every token's keys and values each rank holds: 1/tp of the heads of its stage's layers."""
    if plan.pp == 1:
        return [1.0 / plan.tp] * plan.tp
    from app.models.generation_stages import layer_ranges

    return [(b - a) / num_layers / plan.tp for a, b in layer_ranges(plan.balance or (), num_layers)
            for _ in range(plan.tp)]


def load_part(spec: ModelSpec, plan: ParallelPlan, vocab_size: int, rank: int, master_addr: str, master_port: int,
              gang_gpus: Optional[list[str]]) -> tuple[Any, int]:
    """Join the gang, build the seeded model and keep this rank's part (a TP shard or a stage);
    returns it and the free memory where this rank's KV cache will live."""
    from torch.distributed.device_mesh import DeviceMesh

    from app.models.loader import build_backbone, resolve_dtype

    world = gang_size(plan)
    device = join_process_group(rank, world, master_addr, master_port, gang_gpus)
    dtype = resolve_dtype(spec, device)
    if plan.pp == 1:
        model = shard_with_autotp(build_backbone(spec, vocab_size, device, dtype), world, dtype)
        # Whether the KV heads are split, for the manager's cache (DistributedHelper.are_kv_heads_tp_ed
        # looks for exactly these two keys; set past the tp_plan setter, which would warn that they
        # name nothing where the layers sit elsewhere, e.g. OPT).
        model._tp_plan = {**(getattr(model, "_tp_plan", None) or {}),
                          "layers.*.self_attn.k_proj": "colwise", "layers.*.self_attn.v_proj": "colwise"}
        check_kv_heads_split(model, world)
    else:
        from app.models.generation_stages import cut_stage, layer_ranges, split_heads_in_config

        stage, t = divmod(rank, plan.tp)
        # Every rank creates every stage's group, in the same order (new_group is collective).
        groups = [torch.distributed.new_group(ranks=list(range(s * plan.tp, (s + 1) * plan.tp)))
                  for s in range(plan.pp)] if plan.tp > 1 else []
        # Built whole on the host and cut before it moves: only the stage's layers reach its device
        # (the host holds the whole model once per stage process while it loads).
        model = build_backbone(spec, vocab_size, "cpu", dtype)
        ranges = layer_ranges(plan.balance or (), model.config.get_text_config().num_hidden_layers)
        model = cut_stage(model, stage, ranges, plan.tp, t).to(device)
        if plan.tp > 1:  # each stage a DeepSpeed AutoTP group of its own tp ranks
            model = shard_with_autotp(model, plan.tp, dtype, groups[stage])
            check_kv_heads_split(model, plan.tp)
            split_heads_in_config(model, plan.tp)
    # What the manager reads to know it is one rank of `world` (its request broadcast and lockstep).
    model._device_mesh = DeviceMesh(device.type, list(range(world)))
    return model, free_memory_bytes(device)


def check_kv_heads_split(model: Any, world: int) -> None:
    """The cache holds kv_heads / world heads per rank: make sure AutoTP did split the K projection."""
    text = model.config.get_text_config()
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for name, module in model.named_modules():
        if name.endswith("self_attn.k_proj"):
            rows = module.weight.shape[0]
            if rows != kv_heads * head_dim // world:
                raise RuntimeError(f"AutoTP left {name} with {rows} rows, not {kv_heads * head_dim // world} "
                                   f"({kv_heads} kv heads / tp {world}): this model does not generate tensor-parallel")
            return
    raise RuntimeError("no self_attn.k_proj in the model: tensor-parallel generation knows no other attention layout")


def gang_budget(spec: ModelSpec, config: Any, dtype_bytes: int, shares: list[float], frees: list[int],
                on_gpu: bool) -> KVBudget:
    """The seed formula for a gang, rank i holding shares[i] of every token's keys and values: on
    GPUs the rank that runs out first decides; CPU ranks share the host's memory, so the whole
    token's bytes come out of it."""
    g = spec.generation
    full = kv_bytes_per_token(config, dtype_bytes)
    if not on_gpu:
        return kv_budget(min(frees), full, g.kv_cache_memory_fraction, g.kv_cache_max_tokens)
    per_rank = [kv_budget(free, max(1, int(full * share)), g.kv_cache_memory_fraction, g.kv_cache_max_tokens)
                for free, share in zip(frees, shares)]
    return min(per_rank, key=lambda b: b.tokens)


class GenerationRank:
    """Rank 1.. of a generator gang (a threaded Ray actor: `serve` blocks while `ping` answers)."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world
        self.engine: Any = None
        self.model: Any = None

    def gpu_ids(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]

    def where(self) -> dict[str, Any]:
        return where_am_i(self.rank)

    def load(self, spec: ModelSpec, plan: ParallelPlan, vocab_size: int, master_addr: str, master_port: int,
             gang_gpus: Optional[list[str]]) -> int:
        torch.set_num_threads(spec.intra_op_threads(int(max(1, spec.parallel.rank_num_cpus))))
        self.model, free = load_part(spec, plan, vocab_size, self.rank, master_addr, master_port, gang_gpus)
        return free

    def start_engine(self, budget: KVBudget, engine_args: dict[str, Any]) -> None:
        from app.engine.generation import GenerationEngine

        self.engine = GenerationEngine(self.model, budget=budget, **engine_args)

    def serve(self) -> str:
        """Returns when this rank's loop ends (a stop, or its error): the replica's watcher waits on it."""
        while self.engine.manager.is_running():
            time.sleep(0.2)
        return repr(self.engine.manager.background_thread_status.fatal_error)

    def ping(self) -> bool:
        self.engine.check_health()
        return True


class GenerationGang:
    """The gang seen from the replica (rank 0): start it, watch it, check it, stop it."""

    def __init__(self, spec: ModelSpec, plan: ParallelPlan, vocab_size: int):
        self.spec, self.plan, self.vocab_size = spec, plan, vocab_size
        self.world = gang_size(plan)
        # Each rank reserves a GPU where the budget is GPUs (a logical one on a test cluster); it
        # computes on CUDA only where CUDA is there.
        self.reserve_gpus = spec.parallel.devices.kind == "gpu" and spec.device != "cpu"
        self.use_gpu = self.reserve_gpus and torch.cuda.is_available()
        self.ranks: list[Any] = []
        self.gang_gpus: list[str] = []
        self.device = torch.device("cpu")
        self.engine: Any = None
        self._prefix: Optional[str] = None
        self.placement: list[dict[str, Any]] = []
        self._lost: Optional[str] = None

    def start(self, engine_args: dict[str, Any]) -> Any:
        """Start ranks 1..tp-1, load this process's shard beside them, size the KV cache from every
        rank's free memory, start every rank's engine; returns rank 0's engine."""
        from app.engine.generation import GenerationEngine
        from app.models.loader import build_config, resolve_dtype

        # Bundle s holds stage s's tp ranks (deployments/builder.py).
        self.ranks = spawn_ranks(GenerationRank, range(1, self.world), self.world, self.spec.parallel.rank_num_cpus,
                                 self.reserve_gpus, lambda rank: rank // self.plan.tp, max_concurrency=4)
        gang_gpus = gang_gpu_ids(self.ranks, self.world, [str(g) for g in ray.get_gpu_ids()]) if self.use_gpu else None
        addr, port = ray.util.get_node_ip_address(), free_port()
        self._prefix = shm_buffer_prefix(addr, port)
        loads = [r.load.remote(self.spec, self.plan, self.vocab_size, addr, port, gang_gpus) for r in self.ranks]
        model, free = load_part(self.spec, self.plan, self.vocab_size, 0, addr, port, gang_gpus)
        frees = [free] + ray.get(loads)
        self.device = next(model.parameters()).device
        self.gang_gpus = gang_gpus or []
        dtype = resolve_dtype(self.spec, self.device)
        config = build_config(self.spec, self.vocab_size)
        shares = kv_shares(self.plan, config.get_text_config().num_hidden_layers)
        budget = gang_budget(self.spec, config, dtype.itemsize, shares, frees, self.use_gpu)
        starts = [r.start_engine.remote(budget, engine_args) for r in self.ranks]
        self.engine = GenerationEngine(model, budget=budget, **engine_args)
        ray.get(starts)
        self.placement = [where_am_i(0)] + ray.get([r.where.remote() for r in self.ranks])
        serving = [r.serve.remote() for r in self.ranks]
        threading.Thread(target=self._watch, args=(serving,), name="tp-gang-watch", daemon=True).start()
        return self.engine

    def _watch(self, serving: list[Any]) -> None:
        done, _ = ray.wait(serving, num_returns=1, timeout=None)
        if self._lost is not None:  # shutdown() got here first
            return
        i = serving.index(done[0]) + 1
        try:
            why = f"its loop ended: {ray.get(done[0])}"
        except Exception as e:  # noqa: BLE001 - the actor died: that is the news
            why = type(e).__name__
        self._lost = f"{self.plan.strategy} rank {i} is gone ({why}); this replica is being replaced"
        logger.error("generator %s: %s", self.spec.name, self._lost)
        self.engine.abort(self._lost)
        for r in self.ranks:  # the survivors sit in a collective that never completes
            ray.kill(r, no_restart=True)
        remove_shm_buffers(self._prefix)

    def check_health(self) -> None:
        if self._lost is not None:
            raise RuntimeError(self._lost)
        ray.get([r.ping.remote() for r in self.ranks], timeout=_HEALTH_TIMEOUT_S)

    def describe(self) -> dict[str, Any]:
        kind = "cuda" if self.use_gpu else "cpu"
        tp, pp = self.plan.tp, self.plan.pp
        if pp == 1:
            return {"devices": [f"{kind}:rank{i}" for i in range(self.world)], "tp": tp, "ranks": self.placement}
        names = [f"{kind}:stage{i}" for i in range(pp)] if tp == 1 else [
            f"{kind}:stage{s}.rank{t}" for s in range(pp) for t in range(tp)]
        return {"devices": names, "pp": pp, "tp": tp, "ranks": self.placement, "balance": list(self.plan.balance or ()),
                "runner": "stage processes in lockstep (transformers continuous batching; Fairscale Pipe "
                          "cannot carry the paged KV cache)" + (", each stage a DeepSpeed AutoTP group" if tp > 1 else "")}

    def shutdown(self) -> None:
        """Stop rank 0's loop first (its stop reaches the other ranks at their next collective), then the actors."""
        self._lost = self._lost or "shut down"
        if self.engine is not None:
            self.engine.shutdown()
        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.ranks = []
        remove_shm_buffers(self._prefix)
