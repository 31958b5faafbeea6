"""The pass pipeline: name -> pass, in the documented order (see README.md in this folder).

A pass is ``fn(ctx: PassContext) -> None``: it edits ``ctx.gm`` in place and counts its rewrites
in ``ctx.counters``. ``layout`` (the analysis) runs first and annotates; the others read it.
"""
from __future__ import annotations

import difflib
from collections import Counter
from typing import Callable

from torch import fx

from autosp.masked_attention import DEFAULT_BLOCK_ELEMENTS
from autosp.passes.attention import attention
from autosp.passes.checkpoints import inline_checkpoints, tag_checkpoints
from autosp.passes.context import PassContext
from autosp.passes.halo import halo
from autosp.passes.layout import SEQ_LEN, VALUE_OF, analyse, find_sequence
from autosp.passes.loss import loss
from autosp.passes.outputs import outputs
from autosp.passes.random_draws import random_draws
from autosp.passes.shard_inputs import shard_inputs
from autosp.passes.sizes import local_sizes
from autosp.passes.written_attention import written_attention


def layout(ctx: PassContext) -> None:
    analysis = analyse(ctx.gm, ctx.seq)
    ctx.counters["activations"] = len(analysis.activation)
    ctx.counters["token_wise_modules"] = analysis.token_wise_modules


PASSES: dict[str, Callable[[PassContext], None]] = {
    "inline_checkpoints": inline_checkpoints,
    "layout": layout,
    "random_draws": random_draws,
    "shard_inputs": shard_inputs,
    "local_sizes": local_sizes,
    "halo": halo,
    "attention": attention,
    "written_attention": written_attention,
    "loss": loss,
    "outputs": outputs,
    "tag_checkpoints": tag_checkpoints,
}
DEFAULT_PIPELINE = tuple(PASSES)
# Process-wide totals over every graph compiled, for tests and debugging (reset freely).
COUNTERS: Counter = Counter()


def run_passes(gm: fx.GraphModule, *, world_size: int, group: str, seq_dim: int = 1,
               pipeline=DEFAULT_PIPELINE, debug: bool = False,
               block_elements: int = DEFAULT_BLOCK_ELEMENTS, ulysses: int | None = None,
               attention_output: str = "auto", attention_kernel: str = "auto") -> PassContext:
    ctx = PassContext(gm, find_sequence(gm, seq_dim), world_size, group, block_elements=block_elements,
                      ulysses=ulysses, attention_output=attention_output, attention_kernel=attention_kernel)
    for node in gm.graph.nodes:
        node.meta.setdefault(VALUE_OF, node.name)
    ctx.seq.node.meta[SEQ_LEN] = True  # the placeholder holding S at run time, for the verifier
    for name in pipeline:
        before = gm.code if debug else None
        PASSES[name](ctx)
        gm.graph.lint()
        gm.recompile()
        if debug:
            diff = difflib.unified_diff(before.splitlines(), gm.code.splitlines(), name, name, lineterm="", n=1)
            print(f"--- autosp pass {name}: {dict(ctx.counters)}\n" + "\n".join(diff))
    COUNTERS.update(ctx.counters)
    COUNTERS["graphs"] += 1
    return ctx
