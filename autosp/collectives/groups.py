"""Process groups named by their ranks, found at run time from any thread; per-rank counters.

A graph names its group with ``group_key(group)``, a string of the group's global ranks. At run
time ``resolve_group(key)`` finds the group with those ranks in torch's own registry of this
process (``distributed_c10d``), as torch's functional collectives do for a (ranks, tag) pair:
nothing is registered per thread, so the backward may run on another thread (CUDA's autograd
engine does), and a key never stands for two groups of different members. On the threaded
simulator each rank thread has its own registry (torch's threaded world); a thread a simulator
starts for a rank adopts that rank's registry, as a real process would have it.
"""
from __future__ import annotations

import threading
from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from autosp.errors import AutoSPError

WORLD = "world"  # the default group, whatever its ranks (the ``backend="autosp"`` entry point)
_PREFIX = "ranks:"


def group_key(group) -> str:
    """The key that names ``group`` in a compiled graph: its global ranks."""
    if not isinstance(group, dist.ProcessGroup):
        raise AutoSPError(f"the sequence-parallel group must be a torch.distributed.ProcessGroup, got "
                          f"{type(group).__name__}: {group!r}")
    return _PREFIX + ",".join(str(r) for r in dist.get_process_group_ranks(group))


def resolve_group(key: str) -> dist.ProcessGroup:
    """The process group a key names, in this process (any thread)."""
    if not dist.is_initialized():
        raise AutoSPError("torch.distributed is not initialized in this process: call init_process_group first")
    if key == WORLD:
        return dist.group.WORLD
    if not key.startswith(_PREFIX):
        raise AutoSPError(f"{key!r} does not name a process group (expected {_PREFIX}<ranks>)")
    ranks = [int(r) for r in key[len(_PREFIX):].split(",")]
    group = c10d._find_pg_by_ranks_and_tag("", ranks)
    if group is None:
        raise AutoSPError(f"no process group of ranks {ranks} exists in this process (rank {dist.get_rank()}): "
                          "it was destroyed, or was never created here")
    return group


def check_device(t: torch.Tensor, group: dist.ProcessGroup, op: str) -> None:
    """A tensor the group's backend cannot take (NCCL takes CUDA tensors only) is named, not sent."""
    types = {d.type for d in getattr(group, "_device_types", ())}
    if types and t.device.type not in types:
        raise AutoSPError(f"autosp::{op}: a {tuple(t.shape)} tensor on {t.device} handed to a process group "
                          f"whose backend takes tensors on {sorted(types)} (rank {dist.get_rank(group)})")


# --- counters: per rank, whatever thread runs the collective ---------------------------------------

_COUNTS: dict[int, Counter] = {}
_COUNTS_LOCK = threading.Lock()


def _this_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else -1


def collective_counts() -> Counter:
    """Collectives this rank ran through autosp's ops, by kind (all_to_all, all_reduce,
    all_gather, reduce_scatter), and the bytes handed to them (``*_bytes``). One counter per rank
    (the default group's rank), the backward's collectives included whatever thread ran them."""
    with _COUNTS_LOCK:
        return _COUNTS.setdefault(_this_rank(), Counter())


def reset_collective_counts() -> None:
    collective_counts().clear()


def count(kind: str, t: torch.Tensor, sent: float) -> None:
    """One collective of ``kind`` handed ``t``, of which ``sent`` bytes leave this rank."""
    counts = collective_counts()
    with _COUNTS_LOCK:
        counts[kind] += 1
        counts[kind + "_bytes"] += t.numel() * t.element_size()
        counts["sent_bytes"] += sent
