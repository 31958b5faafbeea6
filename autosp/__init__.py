"""AutoSP: Ulysses sequence parallelism inserted by torch.compile passes, exact against one device."""
from autosp.api import CompiledSP, compile, prepare_autosp_inputs, prepare_inputs
from autosp.collectives import collective_counts, gather_sequence, reset_collective_counts  # registers autosp:: ops
from autosp.config import SPConfig
from autosp.errors import AutoSPError
from autosp.passes.registry import COUNTERS
from autosp.passes.token_wise import register_token_wise

__all__ = ["AutoSPError", "COUNTERS", "CompiledSP", "SPConfig", "collective_counts", "compile",
           "gather_sequence", "prepare_autosp_inputs", "prepare_inputs", "register_token_wise",
           "reset_collective_counts"]
