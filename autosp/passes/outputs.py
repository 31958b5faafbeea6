"""Pass ``outputs``: record which graph outputs are sequence chunks.

The backend strips the padding from those at run time (see ``autosp.backend``), so each rank
returns exactly its own positions of, e.g., the logits; ``autosp.gather_sequence`` reassembles.
"""
from __future__ import annotations

from torch import fx

from autosp.passes.layout import is_sharded, layout_of


def outputs(ctx) -> None:
    out = next(n for n in ctx.graph.nodes if n.op == "output")
    values = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    for i, value in enumerate(values):
        if isinstance(value, fx.Node) and not isinstance(layout_of(value), tuple) and is_sharded(layout_of(value)):
            ctx.output_layouts[i] = layout_of(value)
            ctx.counters["sharded_output"] += 1
