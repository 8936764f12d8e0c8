"""Joining a tensor-parallel gang: the process group, DeepSpeed AutoTP sharding, and the gang's
shared-memory files. Used by the encoder ranks (deepspeed_tp.py) and the generator gang
(tp_generation.py), so both shard the same way."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn


def spawn_ranks(actor_cls: type, ranks: range, world: int, rank_cpus: float, reserve_gpu: bool,
                bundle_of: Callable[[int], int], **options: Any) -> list[Any]:
    """One Ray actor per rank, `actor_cls(rank, world)`, each in its bundle of the replica's
    placement group (`bundle_of(rank)`), where the replica has one."""
    import ray
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = get_current_placement_group()
    cls = ray.remote(actor_cls)
    handles = []
    for rank in ranks:
        # A restarted rank could never rejoin the group's collectives: the replica is replaced as
        # a whole instead (its health check), so no rank restarts.
        opts: dict[str, Any] = {"num_cpus": rank_cpus, "num_gpus": 1 if reserve_gpu else 0, "max_restarts": 0, **options}
        if pg is not None:
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle_of(rank))
        handles.append(cls.options(**opts).remote(rank, world))
    return handles


def gang_gpu_ids(ranks: list[Any], world: int, own: Sequence[str] = ()) -> list[str]:
    """The GPU ids of a gang (`own`: the caller's, when it is rank 0), one per rank, or an error."""
    import ray

    ids = list(own) + [g for got in ray.get([r.gpu_ids.remote() for r in ranks]) for g in got]
    if len(ids) != world:
        raise RuntimeError(f"tensor-parallel gang got GPUs {ids}, expected one per rank ({world})")
    return ids


def first_failed_rank(refs: list[Any]) -> Optional[int]:
    """Wait for every rank's result in the order they finish; the index of the first that failed,
    None if none did. Whichever rank fails first breaks a gang: the others wait in a collective or a
    receive that will never complete, so waiting in rank order would hang."""
    import ray

    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            ray.get(done[0])
        except Exception:  # noqa: BLE001 - any rank failure breaks the whole gang
            return refs.index(done[0])
    return None


def where_am_i(rank: int) -> dict[str, Any]:
    """Rank, node and process, for /v1/models (which node each stage or rank landed on, and its pid)."""
    import ray

    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def join_process_group(rank: int, world: int, master_addr: str, master_port: int,
                       gang_gpus: Optional[list[str]]) -> torch.device:
    """Set this process up as rank `rank` of `world` and join the group; returns its device.
    Call before CUDA initialises in the process (it sets CUDA_VISIBLE_DEVICES)."""
    if gang_gpus:
        # See every GPU of the gang, use our own: NCCL only takes NVLink / peer-to-peer between
        # devices a process can see, and Ray shows each process just its own GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gang_gpus)
    else:
        # CPU ranks share the host; DeepSpeed's shared-memory all-reduce needs LOCAL_SIZE == world.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # transformers' continuous batching wants this before the group starts (NCCL captures better).
    os.environ.setdefault("NCCL_GRAPH_MIXING_SUPPORT", "0")
    os.environ.update({
        "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_SIZE": str(world),
        "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
    })
    device = torch.device("cuda", rank) if gang_gpus else torch.device("cpu")
    if gang_gpus:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        backend="nccl" if gang_gpus else "gloo", init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank, world_size=world,
    )
    return device


def shard_with_autotp(model: nn.Module, world: int, dtype: torch.dtype, group: Any = None) -> nn.Module:
    """DeepSpeed AutoTP over the joined group, or over `group` (a stage's ranks of a tp x pp gang):
    every rank of it calls this with the same seeded model."""
    import deepspeed  # imported here: only tensor-parallel processes need DeepSpeed

    if group is not None and torch.distributed.get_world_size() != world:
        # DeepSpeed's CPU shared-memory all-reduce spans the whole world and ignores the group
        # (deepspeed/comm/torch.py inference_all_reduce); marked incompatible, DeepSpeed falls
        # back to torch.distributed.all_reduce over the stage's group (and makes no /dev/shm files).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Without an `mpu` DeepSpeed's inference engine makes its own group of ranks 0..tp-1 (wrong for
    # every stage past the first) and overwrites tp_group with it; AutoTP's layers read tp_group.
    tp: dict[str, Any] = {"tp_size": world}
    if group is not None:
        tp.update(mpu=_StageGroup(group), tp_group=group)
        # What DeepSpeed does itself only on its own-group path: wrap the joined torch group.
        deepspeed.comm.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    engine = deepspeed.init_inference(model, tensor_parallel=tp, dtype=dtype, replace_with_kernel_inject=False)
    return engine.module


class _StageGroup:
    """The model-parallel unit DeepSpeed asks of an `mpu`: one stage's tensor-parallel group."""

    def __init__(self, group: Any):
        self.group = group

    def get_model_parallel_group(self) -> Any:
        return self.group

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(group=self.group)

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(group=self.group)


def shm_buffer_prefix(master_addr: str, master_port: int) -> str:
    """The names DeepSpeed's CPU all-reduce gives a gang's shared-memory files (one per rank,
    /dev/shm/<prefix>_<rank>, named as in its csrc/cpu/comm/shm.cpp)."""
    return f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}"


def remove_shm_buffers(prefix: Optional[str]) -> None:
    """Unlink a gang's all-reduce files: killed ranks never do, and each gang's files (~70 MB per
    rank) would stay in /dev/shm until the host reboots (a day of chaos drills filled 18 GB and got
    Ray's memory monitor killing the Serve controller). Ranks that still map one keep their mapping;
    a gang runs on one node (STRICT_PACK), so the files are on the caller's."""
    if prefix is None:
        return
    for path in glob.glob(f"/dev/shm/{prefix}_*"):
        with contextlib.suppress(OSError):
            os.unlink(path)
