"""P processes on P CUDA devices over NCCL; unavailable (a skip, not a failure) with fewer GPUs."""
from __future__ import annotations

import torch

from autosp_verify.simulators.base import Simulator, SimulatorUnavailable
from autosp_verify.simulators.processes import run_processes


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def unavailable(world_size: int) -> str | None:
    """Why ``world_size`` NCCL ranks cannot run here (the skip reason), or None when they can."""
    found = gpu_count()
    return f"skipped: needs {world_size} GPUs, found {found}" if found < world_size else None


class NcclSimulator(Simulator):
    name = "nccl"
    in_process = False

    def run(self, world_size, rank_fn, payload, timeout):
        reason = unavailable(world_size)
        if reason:
            raise SimulatorUnavailable(reason)
        return run_processes(world_size, rank_fn, payload, timeout, backend="nccl")
