"""P processes on P CUDA devices over NCCL; unavailable (a skip, not a failure) with fewer GPUs."""
import torch

from autosp_verify.simulators.base import Simulator, SimulatorUnavailable
from autosp_verify.simulators.processes import run_processes


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class NcclSimulator(Simulator):
    name = "nccl"
    in_process = False

    def run(self, world_size, rank_fn, payload, timeout):
        found = gpu_count()
        if found < world_size:
            raise SimulatorUnavailable(f"skipped: needs {world_size} GPUs, found {found}")
        return run_processes(world_size, rank_fn, payload, timeout, backend="nccl")
