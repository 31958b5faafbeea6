"""State shared by the passes of one graph: the sequence symbol, the group, counters, sizes."""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import sympy
from torch import fx

from autosp.errors import AutoSPError
from autosp.masked_attention import DEFAULT_BLOCK_ELEMENTS
from autosp.passes.layout import LAYOUT, SeqLayout, SeqSymbol, linear_coeffs


@dataclass
class PassContext:
    gm: fx.GraphModule
    seq: SeqSymbol
    world_size: int
    group: str  # key of the process group in autosp.collectives
    counters: Counter = field(default_factory=Counter)
    output_layouts: dict[int, SeqLayout] = field(default_factory=dict)
    block_elements: int = DEFAULT_BLOCK_ELEMENTS  # working memory of autosp::masked_attention
    ulysses: int | None = None  # Ulysses degree U fixed by the user (None: the attention pass picks)
    attention_output: str = "auto"  # held "once" or "twice" for the backward (SPConfig)
    attention_kernel: str = "auto"  # "blocks": no mask takes the fused kernel (SPConfig)
    mask_region: set = field(default_factory=set)  # [S, S] mask nodes replaced by O(S) leaves
    key_ranges: dict = field(default_factory=dict)  # (leaves, program) -> its mask_key_ranges node
    _sizes: dict = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def __post_init__(self):
        # Size nodes and shards of graph inputs go just before the first original op, in the
        # order they are made, so each comes after everything it reads.
        self.anchor = next(n for n in self.graph.nodes if n.op != "placeholder")

    def inserting_after(self, node: fx.Node):
        if node.op == "placeholder":
            return self.graph.inserting_before(self.anchor)
        return self.graph.inserting_after(node)

    def _emit(self, key, target, args) -> fx.Node:
        if key not in self._sizes:
            with self.graph.inserting_before(self.anchor):
                self._sizes[key] = self.graph.call_function(target, args)
        return self._sizes[key]

    def local_len(self) -> fx.Node:
        """Positions per rank: ceil(S / P), as a SymInt computed at run time from S."""
        padded = self._emit("S+P-1", operator.add, (self.seq.node, self.world_size - 1))
        return self._emit("Sl", operator.floordiv, (padded, self.world_size))

    def emitted_local_len(self) -> fx.Node | None:
        """The ceil(S/P) node if a pass asked for it (the backend gives it its own symbol)."""
        return self._sizes.get("Sl")

    def padded_len(self) -> fx.Node:
        return self._emit("Sl*P", operator.mul, (self.local_len(), self.world_size))

    def _linear(self, expr, base: fx.Node, tag: str):
        coeffs = linear_coeffs(sympy.sympify(expr), self.seq.symbol)
        if coeffs is None:
            raise AutoSPError(f"size {expr} is not linear in the sequence length")
        a, b = coeffs
        node = base if a == 1 else self._emit((tag, "mul", a), operator.mul, (base, a))
        return node if b == 0 else self._emit((tag, "add", a, b), operator.add, (node, b))

    def full_size(self, expr):
        """A SymInt node (or int) equal to ``expr`` for the full sequence length."""
        expr = sympy.sympify(expr)
        if self.seq.symbol not in expr.free_symbols:
            return int(expr)
        return self._linear(expr, self.seq.node, "full")

    def local_size(self, expr):
        """The size of a sharded dim whose full size is ``expr`` (a*S + b -> a * Sl)."""
        coeffs = linear_coeffs(sympy.sympify(expr), self.seq.symbol)
        if coeffs is None:
            raise AutoSPError(f"size {expr} is not linear in the sequence length")
        return self._linear(coeffs[0] * self.seq.symbol, self.local_len(), "local")

    def set_layout(self, node: fx.Node, layout) -> fx.Node:
        node.meta[LAYOUT] = layout
        return node
