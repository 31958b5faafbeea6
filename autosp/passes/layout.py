"""The sequence-layout analysis: one walk over the Dynamo graph that every rewrite pass reads.

Each tensor value gets a :class:`SeqLayout` in ``node.meta["autosp_layout"]``:

- ``FULL``: the whole sequence, exactly as on one device (ids, labels, masks, positions and
  anything computed from them alone). Computed redundantly on every rank, which keeps label
  shifts, mask construction and token counts exact with no rule per op.
- ``SHARDED``: this rank's chunk of the sequence along ``dim``. Every *activation* (a value
  that depends on a parameter) with a sequence dim must be sharded; that is the point.
- ``REPLICATED``: no sequence dim; the same on every rank.
- ``HEADS``: inside attention written out (``written_attention.py``): this rank's heads over the
  whole sequence.

The sequence is found through the symbolic size Dynamo gives the marked dims of the inputs:
a dim carries the sequence when its size expression contains that symbol. A FULL value that
meets an activation op is sharded on that edge (the ``shard_inputs`` pass inserts the op). An activation op
must be positional along the sequence (see ``ops``) or have a dedicated rule (attention, loss,
sums over the sequence); anything else raises :class:`AutoSPError` naming the op and the
model's source line. The analysis only annotates; it never edits the graph.
"""
from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass

import sympy
import torch
from torch import fx

from autosp.errors import AutoSPError
from autosp.passes import ops, token_wise

FULL, SHARDED, REPLICATED, HEADS = "full", "sharded", "replicated", "heads"
LAYOUT, RULE = "autosp_layout", "autosp_rule"
# The single-device node whose value a node holds (in its own layout): every node of the traced
# graph names itself; a node a pass inserts in place of one names the node it replaces; other
# inserted nodes (partial sums, padding, repeats) have none. The verifier compares by it.
VALUE_OF = "autosp_value_of"
SEQ_LEN = "autosp_sequence_length"  # marks the placeholder that holds the full length S


def stands_for(new: fx.Node, old: fx.Node) -> fx.Node:
    new.meta[VALUE_OF] = old.meta.get(VALUE_OF, old.name)
    if "stack_trace" in old.meta:  # the model's line, for messages about the new node
        new.meta.setdefault("stack_trace", old.meta["stack_trace"])
    return new


@dataclass(frozen=True)
class SeqLayout:
    state: str
    dim: int | None = None  # the dim carrying the sequence (None: several or none)
    inner: int = 1  # elements of ``dim`` after each sequence position (flattened dims)
    length: sympy.Expr | None = None  # the sequence length this value covers (S, S - 1, ...)


REPLICATED_LAYOUT = SeqLayout(REPLICATED)


@dataclass
class SeqSymbol:
    symbol: sympy.Symbol
    node: fx.Node  # a placeholder holding the full sequence length at run time
    others: frozenset = frozenset()  # other inputs' symbols for the same length (see find_sequence)


def is_sharded(layout) -> bool:
    """True for a sharded layout, or a tuple of layouts (split, chunk...) holding one."""
    layouts = layout if isinstance(layout, tuple) else (layout,)
    return any(lay.state == SHARDED for lay in layouts)


def example_value(node):
    return node.meta.get("example_value", node.meta.get("val"))


def call_arg(node, index: int, name: str, default=None):
    """An argument of a call node, given by keyword or position."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def layout_of(node) -> SeqLayout:
    return node.meta.get(LAYOUT, REPLICATED_LAYOUT) if isinstance(node, fx.Node) else REPLICATED_LAYOUT


_TORCH_DIR = os.path.dirname(torch.__file__)


def source_line(node) -> str:
    """The model's own source line for a node: the last frame of its stack trace outside torch
    (an ``nn.Conv1d``'s op is called in torch's conv.py, from the model's line)."""
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [i for i, line in enumerate(trace) if line.strip().startswith("File ")]
    if not frames:
        return "<unknown source>"
    own = [i for i in frames if _TORCH_DIR not in trace[i]]
    i = (own or frames)[-1]
    code = trace[i + 1].strip() if i + 1 < len(trace) else ""
    return f"{trace[i].strip()}: {code}"


def refuse(node, why: str) -> AutoSPError:
    return AutoSPError(f"cannot shard {ops.op_name(node)} ({node.name}): {why}\n  at {source_line(node)}")


def size_expr(size) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def seq_dims(value, symbol) -> list[int]:
    if not isinstance(value, torch.Tensor):
        return []
    return [i for i, s in enumerate(value.shape) if symbol in size_expr(s).free_symbols]


def linear_coeffs(expr: sympy.Expr, symbol) -> tuple[int, int] | None:
    """(a, b) with expr == a*S + b, or None when the size is not linear in S."""
    expr = sympy.expand(expr)
    a, b = expr.coeff(symbol, 1), expr.subs(symbol, 0)
    if sympy.expand(a * symbol + b - expr) != 0 or not (a.is_Integer and b.is_Integer):
        return None
    return int(a), int(b)


def find_sequence(gm: fx.GraphModule, seq_dim: int) -> SeqSymbol:
    """The symbol for the sequence length, from the dynamic ``seq_dim`` of the inputs.

    Inputs of the same length (autosp.compile checks it at every call) may still get symbols of
    their own when nothing in the graph relates their sizes (HF reads a 2-D attention mask by
    fancy indexing when a KV cache exists): the first input's is the sequence, and the others are
    allowed only where no activation carries them (``Analysis`` checks, refusing otherwise)."""
    symbols, holders = [], {}
    for node in gm.graph.find_nodes(op="placeholder"):
        value = example_value(node)
        if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
            holders.setdefault(value.node.expr, node)
        elif isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
            if value.dim() > seq_dim and isinstance(value.shape[seq_dim], torch.SymInt):
                symbols += [s for s in size_expr(value.shape[seq_dim]).free_symbols if s not in symbols]
    if not symbols:
        raise AutoSPError(
            f"no input has a dynamic sequence dim {seq_dim}: call the model through autosp.compile, "
            "or mark the sequence inputs with autosp.prepare_inputs(...) before torch.compile")
    symbol = symbols[0]
    if symbol not in holders:
        raise AutoSPError(f"the sequence length {symbol} is not a graph input; cannot read it at run time")
    return SeqSymbol(symbol, holders[symbol], frozenset(symbols[1:]))


def _is_parameter_source(node) -> bool:
    value = example_value(node)
    grapharg = node.meta.get("grapharg")
    real = getattr(grapharg, "example", None)
    return isinstance(value, torch.nn.Parameter) or isinstance(real, torch.nn.Parameter)


class Analysis:
    def __init__(self, gm: fx.GraphModule, seq: SeqSymbol):
        self.gm, self.seq = gm, seq
        self.S = seq.symbol
        self.activation: set[fx.Node] = set()
        self.token_wise_modules = 0  # calls of token-wise modules (token_wise.py), after ``run``

    # -- helpers ----------------------------------------------------------------------------
    def dims(self, node) -> list[int]:
        return seq_dims(example_value(node), self.S)

    def own_layout(self, node, state: str) -> SeqLayout:
        """Layout of a value from its own shape (inner from the view chain when known)."""
        dims = self.dims(node)
        if len(dims) != 1:
            return SeqLayout(state, None, 1, None)
        dim = dims[0]
        coeffs = linear_coeffs(size_expr(example_value(node).shape[dim]), self.S)
        inner = self.mapped_inner(node, dim) or 1
        length = None
        if coeffs is not None and coeffs[0] % inner == 0:
            outer = coeffs[0] // inner
            if coeffs[1] % (outer * inner) == 0:
                length = self.S + coeffs[1] // (outer * inner)
        return SeqLayout(state, dim, inner, length)

    def whole_layout(self, node) -> SeqLayout:
        """A value every rank computes whole: FULL where it carries the sequence, else REPLICATED."""
        return self.own_layout(node, FULL) if self.dims(node) else REPLICATED_LAYOUT

    def mapped_inner(self, node, out_dim) -> int | None:
        """``inner`` of a view's output from its input's layout (contiguous reshape semantics)."""
        if not ops.is_view(node) or not node.args:
            return None
        src = node.args[0]
        src_layout = layout_of(src)
        if not isinstance(src, fx.Node) or src_layout.dim is None:
            return None
        src_shape = example_value(src).shape
        out_shape = example_value(node).shape
        try:
            stride = src_layout.inner * math.prod(int(s) for s in src_shape[src_layout.dim + 1:])
            after = math.prod(int(s) for s in out_shape[out_dim + 1:])
        except TypeError:  # another symbolic dim after the sequence: no flat mapping
            return None
        if after == 0 or stride % after:
            return None
        return stride // after

    # -- the walk ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                if _is_parameter_source(node):
                    self.activation.add(node)
                node.meta[LAYOUT] = self.whole_layout(node)
            elif node.op in ("call_function", "call_method", "call_module"):
                self.visit(node)

    def visit(self, node) -> None:
        inputs = node.all_input_nodes
        if any(i in self.activation for i in inputs):
            self.activation.add(node)
        sharded = [i for i in inputs if is_sharded(layout_of(i))]
        value = example_value(node)
        from autosp.passes import written_attention  # imports this module
        if written_attention.REGION in node.meta:
            node.meta[LAYOUT] = written_attention.visit(self, node, sharded)
            return
        side = written_attention.side_layout(self, node, sharded)
        if side is not None:
            node.meta[LAYOUT] = side
            return
        region = token_wise.region_of(node)
        if region is not None:  # no per-op rules inside: this rank's tokens, sizes made local
            node.meta[LAYOUT] = self.region_layout(value)
            if not isinstance(value, torch.SymInt):
                node.meta[RULE], node.meta[token_wise.REGION] = token_wise.RULE, region
            return
        if node.op == "call_function" and node.target is operator.getitem and isinstance(
                example_value(node.args[0]), (tuple, list)):
            node.meta[LAYOUT] = self.element_layout(node)
            return
        if node not in self.activation and not sharded:
            node.meta[LAYOUT] = self.whole_layout(node)
            return
        if isinstance(value, torch.SymInt):
            if self.S in value.node.expr.free_symbols and sharded:
                node.meta[RULE] = "full_size"  # a size read off a chunk means the full size
            node.meta[LAYOUT] = REPLICATED_LAYOUT
            return
        if value is None or node.target in ops.SIDE_EFFECTS:
            node.meta[LAYOUT] = REPLICATED_LAYOUT
            return
        from autosp.passes import rules  # the per-op rules; imported here to keep this file short
        node.meta[LAYOUT] = rules.apply(self, node, sharded)

    def region_layout(self, value):
        """Inside a token-wise module: sharded wherever the sequence is (tuples element by element)."""
        if isinstance(value, (tuple, list)):
            return tuple(self.region_layout(v) for v in value)
        dims = seq_dims(value, self.S)
        return SeqLayout(SHARDED, dims[0]) if dims else REPLICATED_LAYOUT

    def element_layout(self, node) -> SeqLayout:
        """Layout of ``tuple_value[i]`` for ops with several outputs (split, chunk, topk...)."""
        parent, index = node.args
        parent_layouts = layout_of(parent)
        if isinstance(parent_layouts, tuple):
            return parent_layouts[index]
        return self.whole_layout(node)


def analyse(gm: fx.GraphModule, seq: SeqSymbol) -> Analysis:
    from autosp.passes import written_attention
    analysis = Analysis(gm, seq)
    written_attention.find(gm.graph, seq.symbol)
    analysis.run()
    analysis.token_wise_modules = token_wise.check_exits(gm.graph.nodes, analysis.dims)
    _check_other_symbols(analysis)
    return analysis


def _check_other_symbols(an: Analysis) -> None:
    """An activation whose size holds another input's length symbol would be treated as not
    carrying the sequence, and run whole: refused."""
    for node in an.activation:
        value = example_value(node)
        shape = value.shape if isinstance(value, torch.Tensor) else ()
        stray = {s for size in shape for s in size_expr(size).free_symbols} & an.seq.others
        if stray:
            raise AutoSPError(f"cannot shard {ops.op_name(node)} ({node.name}): its size {tuple(shape)} holds "
                              f"{sorted(map(str, stray))}, the length of another sequence input that nothing in "
                              f"the model relates to the sequence {an.S}\n  at {source_line(node)}")
