"""Simulators, chosen by name: threaded (default, exact), gloo (processes), fake (structural), nccl (GPUs)."""
from autosp_verify.simulators.base import (RankContext, RankError, RankFailure, SimulationError, Simulator,
                                           SimulatorUnavailable)

NAMES = ("threaded", "gloo", "fake", "nccl")


def get_simulator(name: str) -> Simulator:
    if name == "threaded":
        from autosp_verify.simulators.threaded import ThreadedSimulator
        return ThreadedSimulator()
    if name == "gloo":
        from autosp_verify.simulators.gloo import GlooSimulator
        return GlooSimulator()
    if name == "fake":
        from autosp_verify.simulators.fake import FakeSimulator
        return FakeSimulator()
    if name == "nccl":
        from autosp_verify.simulators.nccl import NcclSimulator
        return NcclSimulator()
    raise ValueError(f"unknown simulator {name!r}; choose one of {', '.join(NAMES)}")


__all__ = ["NAMES", "get_simulator", "RankContext", "RankError", "RankFailure", "SimulationError", "Simulator",
           "SimulatorUnavailable"]
