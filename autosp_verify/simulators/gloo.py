"""P real CPU processes over gloo: the check that nothing depends on sharing one address space."""
from autosp_verify.simulators.base import Simulator
from autosp_verify.simulators.processes import run_processes


class GlooSimulator(Simulator):
    name = "gloo"
    in_process = False

    def run(self, world_size, rank_fn, payload, timeout):
        return run_processes(world_size, rank_fn, payload, timeout, backend="gloo")
