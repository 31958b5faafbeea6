"""AutoSP: Ulysses sequence parallelism inserted by torch.compile passes, exact against one device."""
from autosp.api import CompiledSP, compile, prepare_autosp_inputs, prepare_inputs
from autosp.collectives import collective_counts, gather_sequence, reset_collective_counts  # registers autosp:: ops
from autosp.config import SPConfig
from autosp.errors import AutoSPError
from autosp.passes.registry import COUNTERS

__all__ = ["AutoSPError", "COUNTERS", "CompiledSP", "SPConfig", "collective_counts", "compile",
           "gather_sequence", "prepare_autosp_inputs", "prepare_inputs", "reset_collective_counts"]
