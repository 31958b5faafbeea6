"""SPConfig: everything AutoSP needs to know besides the model, validated up front."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.distributed as dist

from autosp.errors import AutoSPError
from autosp.masked_attention import DEFAULT_BLOCK_ELEMENTS

# Keyword inputs that carry the sequence on ``seq_dim`` in HF-style models.
SEQUENCE_INPUTS = ("input_ids", "inputs_embeds", "labels", "attention_mask", "position_ids",
                   "token_type_ids", "shift_labels")
PADDING_POLICIES = ("pad", "error")
ATTENTION_OUTPUT = ("auto", "once", "twice")
ATTENTION_KERNEL = ("auto", "blocks")


@dataclass
class SPConfig:
    """Configuration of one sequence-parallel compilation.

    group: the sequence-parallel process group (default: the world).
    mesh, sp_axis: alternatively a DeviceMesh and the name of its sequence-parallel axis
        (e.g. a DP x SP mesh); the group is ``mesh.get_group(sp_axis)``.
    seq_dim: the sequence dim of the sequence inputs.
    padding: "pad" pads a length that the group size does not divide (exact; padding never
        reaches the loss or real tokens' attention); "error" refuses such a length instead.
    backend: the torch.compile backend run after the passes ("inductor", "aot_eager", a callable).
    debug: print the graph diff and counters around each pass.
    sequence_inputs: keyword inputs marked as carrying the sequence (first positional tensor too;
        called by keyword with none of these names, the first keyword tensor); every other input
        of the same length along ``seq_dim`` is marked too (labels by another name: ``targets``).
    passes: the pass pipeline (names from autosp.passes.registry), for debugging.
    checkpointing: None (default: torch's partitioner decides what the backward keeps) or
        "selective": sequence-aware selective activation checkpointing (autosp/checkpointing.py):
        attention outputs and every autosp collective's output are saved, every other forward
        value carrying the sequence of at least ``checkpoint_min_bytes`` bytes is recomputed in
        the backward. Needs an AOTAutograd backend: "aot_eager" or "inductor".
    checkpoint_min_bytes: the size (bytes, per rank, at the compile-time length) from which a
        sequence-long value is recomputed rather than saved (default 0: all of them).
    attention_block_elements: the working memory of attention under a mask, in score elements
        (batch x this rank's heads x query rows x keys) per block of query rows: masks are
        rebuilt one block of rows at a time from O(S) data (``autosp.masked_attention``).
        0 (default): as many as the queries have elements (so it grows linearly in S).
    ulysses: past the head count, P = U x R: Ulysses all-to-alls over blocks of U ranks (heads),
        keys and values gathered over the R blocks (queries stay local). None (default): all
        Ulysses when an attention has at least P query heads, else the U dividing P (at most the
        query heads) that sends the fewest bytes (``autosp.collectives.sp_degrees``). An int fixes
        U; it must divide the group size.
    attention_output: where a rank holds an attention's output for the backward. "once": only
        sequence-sharded, as the output projection's input; the backward then sends
        rowsum(dO * O) with dO (H values per position more: 1/head_dim of that all-to-all).
        "twice": head-sharded for the attention's backward too, the Ulysses minimum in bytes.
        "auto" (default): "once" where that costs at most 2% more of the attention's all-to-all
        bytes (head dims of 16 and more), else "twice". Torch's CPU flash kernel and
        ``autosp::masked_attention`` can; elsewhere (CUDA's kernels for now) it is "twice".
    attention_kernel: "auto" (default): a mask whose rows turn out at run time to be runs of
        consecutive queries that see one range of keys each (causal, packed documents, padding:
        ``autosp.mask_runs``) takes torch's fused kernel, once per run (CPU for now); other masks
        the blocks. "blocks": every mask the blocks (``autosp.masked_attention``), to compare.
    """
    group: dist.ProcessGroup | None = None
    mesh: object | None = None
    sp_axis: str = "sp"
    seq_dim: int = 1
    padding: str = "pad"
    backend: str | Callable = "inductor"
    debug: bool = False
    sequence_inputs: tuple[str, ...] = SEQUENCE_INPUTS
    passes: tuple[str, ...] = field(default=None)
    checkpointing: str | None = None
    checkpoint_min_bytes: int = 0
    attention_block_elements: int = DEFAULT_BLOCK_ELEMENTS
    ulysses: int | None = None
    attention_output: str = "auto"
    attention_kernel: str = "auto"

    def __post_init__(self):
        from autosp.passes.registry import DEFAULT_PIPELINE, PASSES
        if self.passes is None:
            self.passes = DEFAULT_PIPELINE
        unknown = [p for p in self.passes if p not in PASSES]
        if unknown:
            raise AutoSPError(f"unknown passes {unknown}; known: {list(PASSES)}")
        if self.padding not in PADDING_POLICIES:
            raise AutoSPError(f"padding must be one of {PADDING_POLICIES}, got {self.padding!r}")
        if not isinstance(self.seq_dim, int) or self.seq_dim < 0:
            raise AutoSPError(f"seq_dim must be a non-negative int, got {self.seq_dim!r}")
        if self.group is not None and self.mesh is not None:
            raise AutoSPError("give either group or mesh, not both")
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise AutoSPError(f"group must be a torch.distributed.ProcessGroup, got {type(self.group).__name__}")
        if not (isinstance(self.backend, str) or callable(self.backend)):
            raise AutoSPError(f"backend must be a name or a callable, got {self.backend!r}")
        from autosp.checkpointing import CHECKPOINTING, SELECTIVE_BACKENDS
        if self.checkpointing not in CHECKPOINTING:
            raise AutoSPError(f"checkpointing must be one of {CHECKPOINTING}, got {self.checkpointing!r}")
        if self.checkpointing and self.backend not in SELECTIVE_BACKENDS:
            raise AutoSPError(f"checkpointing={self.checkpointing!r} needs an AOTAutograd backend "
                              f"{SELECTIVE_BACKENDS} (it sets the partitioner's recompute tags), got "
                              f"backend={self.backend!r}")
        if isinstance(self.checkpoint_min_bytes, bool) or not isinstance(self.checkpoint_min_bytes, int) \
                or self.checkpoint_min_bytes < 0:
            raise AutoSPError(f"checkpoint_min_bytes must be a non-negative int, got {self.checkpoint_min_bytes!r}")
        if isinstance(self.attention_block_elements, bool) or not isinstance(self.attention_block_elements, int) \
                or self.attention_block_elements < 0:
            raise AutoSPError(f"attention_block_elements must be a non-negative int, got {self.attention_block_elements!r}")

        if self.ulysses is not None and (isinstance(self.ulysses, bool) or not isinstance(self.ulysses, int)
                                         or self.ulysses < 1):
            raise AutoSPError(f"ulysses must be a positive int (the Ulysses degree), got {self.ulysses!r}")
        if self.attention_output not in ATTENTION_OUTPUT:
            raise AutoSPError(f"attention_output must be one of {ATTENTION_OUTPUT}, got {self.attention_output!r}")
        if self.attention_kernel not in ATTENTION_KERNEL:
            raise AutoSPError(f"attention_kernel must be one of {ATTENTION_KERNEL}, got {self.attention_kernel!r}")

    def resolve_group(self) -> dist.ProcessGroup:
        if not dist.is_initialized():
            raise AutoSPError("torch.distributed is not initialized: call init_process_group first")
        if self.mesh is not None:
            names = getattr(self.mesh, "mesh_dim_names", None) or ()
            if self.sp_axis not in names:
                raise AutoSPError(f"mesh has no axis {self.sp_axis!r} (axes: {names})")
            return self.mesh.get_group(self.sp_axis)
        return self.group or dist.group.WORLD
