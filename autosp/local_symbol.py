"""The local length ceil(S/P) as a symbol of its own while AOTAutograd and the backend compile.

Why: after the passes every sharded size is ``(S + P - 1) // P`` (times a constant). Dynamo's
ShapeEnv keeps it as a sympy ``FloorDiv`` tree, and AOTAutograd's capture, the partitioner and
the backend touch such sizes hundreds of thousands of times (``SymNode.expr`` asks sympy
``is_number`` on every read, ``free_symbols``, the printing of the graphs AOTAutograd logs for its
cache): the sharded graph compiled about 1.4x as long as the plain one although the passes
themselves take ~0.05 s. With a plain symbol ``L`` for the local length the same work costs what
it costs on one device.

How (a torch-internals workaround, see autosp/passes/README.md): the backend turns the graph's
``ceil(S/P)`` node into a SymInt placeholder appended to the graph's inputs, and hands the inner
backend a fresh backed symbol ``L`` (hint: ceil of S's hint over P) for it; the runner passes
ceil(S/P) there at every call. Dynamo can only guard on symbols its inputs bind, and ``L`` is
bound by none, so once the inner backend returns, every guard recorded meanwhile is rewritten
with ``L := (S + P - 1) // P`` (exactly what the runner passes). The compiled graphs do not
change, only the symbol their sizes are written in.

Not done (the graph keeps ``FloorDiv``) where S is not a plain symbol or the local length is 0
or 1 (the ShapeEnv would specialise it). A ShapeEnv replacement that, after compiling, defines
another symbol through ``L`` cannot be rewritten into a guard on S: ``rewrite_guards`` raises
(never seen on the fixtures).
"""
from __future__ import annotations

import copy
import itertools
import operator
import weakref

import sympy
import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import DimDynamic
from torch.utils._sympy.functions import FloorDiv
from torch.utils._sympy.value_ranges import bound_sympy

from autosp.errors import AutoSPError
from autosp.passes.layout import example_value

_NAMES = itertools.count()
LOCAL_LEN = "autosp_local_length"  # marks the placeholder added for ceil(S/P)
# ShapeEnv -> {L: ceil(S/P) in S}: what each local-length symbol stands for (the scale
# simulator reads it to evaluate sizes written in L).
_STANDS_FOR: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class OwnSymbol:
    """The state of one graph's local-length symbol, between the graph edit and the guard rewrite."""

    def __init__(self, shape_env, symbol: sympy.Symbol, full: sympy.Expr, guards_before: int):
        self.shape_env, self.symbol, self.full, self.guards_before = shape_env, symbol, full, guards_before

    def rewrite_guards(self) -> None:
        """Guards recorded while compiling that mention L, written in S instead."""
        env, sub = self.shape_env, {self.symbol: self.full}
        for i in range(self.guards_before, len(env.guards)):
            guard = env.guards[i]
            if self.symbol in guard.expr.free_symbols:
                env.guards[i] = guard._replace(expr=guard.expr.xreplace(sub))
        for key, value in env.replacements.items():
            if key != self.symbol and self.symbol in getattr(value, "free_symbols", ()):
                raise AutoSPError(f"compiling related {key} to the local length ({key} = {value}); "
                                  "cannot guard on it")


def stands_for(shape_env) -> dict:
    """{L: its expression in S} for the local-length symbols made in ``shape_env``."""
    return dict(_STANDS_FOR.get(shape_env, {}))


def own_symbol(ctx, example_inputs: list):
    """Give ceil(S/P) its own symbol (see the module doc): (graph module, example inputs) to
    compile and the state for the guard rewrite (None: nothing changed, the graph is ctx.gm)."""
    node = ctx.emitted_local_len()
    full = example_value(ctx.seq.node)
    if node is None or not isinstance(full, torch.SymInt) or not isinstance(full.node.expr, sympy.Symbol):
        return ctx.gm, example_inputs, None
    env, P = full.node.shape_env, ctx.world_size
    hint = -(-int(full.node.hint) // P)
    if hint < 2:
        return ctx.gm, example_inputs, None
    from torch._dynamo.source import ConstantSource
    source = ConstantSource(f"__autosp_local_len_{next(_NAMES)}")  # named, never read
    symbol = env.create_symbol(hint, source, dynamic_dim=DimDynamic.DYNAMIC, positive=True)
    if not isinstance(symbol, sympy.Symbol):
        return ctx.gm, example_inputs, None
    value = FloorDiv(full.node.expr + P - 1, P)
    # A new size symbol gets [2, oo] (sizes 0 and 1 specialise); L is 1 wherever S <= P and no
    # guard says otherwise, so it gets the range its value has.
    env.var_to_range[symbol] = bound_sympy(value, env.var_to_range)
    local = env.create_symintnode(symbol, hint=hint, source=source)
    graph = _copy(ctx.gm.graph)
    placeholder = _replace_with_input(graph, next(n for n in graph.nodes if n.name == node.name))
    placeholder.meta.update(example_value=local, val=local)
    gm = _module(ctx.gm, graph)
    _STANDS_FOR.setdefault(env, {})[symbol] = value
    return gm, [*example_inputs, local], OwnSymbol(env, symbol, value, len(env.guards))


# What Dynamo leaves on its graph module for AOTAutograd (output_graph.py): kept on the copy.
_DYNAMO_ATTRS = ("_param_name_to_source", "_source_to_user_stacks", "compile_subgraph_reason", "_backend_id")


def _copy(graph: fx.Graph) -> fx.Graph:
    """A copy of Dynamo's graph to add an input to: Dynamo reads the placeholders of its own
    graph again after the backend returns (each must be one of its graph arguments)."""
    out = copy.deepcopy(graph)
    for old, new in zip(graph.find_nodes(op="placeholder"), out.find_nodes(op="placeholder")):
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return out


def _module(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    """``graph`` in a module like Dynamo's ``gm``, with what AOTAutograd reads off it."""
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta.update(gm.meta)
    for name in _DYNAMO_ATTRS:
        if hasattr(gm, name):
            setattr(out, name, getattr(gm, name))
    return out


def _replace_with_input(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """A last SymInt input in place of ``node`` (ceil(S/P)); its now unused ``S + P - 1`` goes too."""
    last = list(graph.find_nodes(op="placeholder"))[-1]
    with graph.inserting_after(last):
        placeholder = graph.placeholder("autosp_local_len")
    placeholder.meta[LOCAL_LEN] = True
    placeholder._dynamo_source = None  # AOTAutograd reads every input's; None: no user-code source
    node.replace_all_uses_with(placeholder)
    padded = node.args[0]
    graph.erase_node(node)
    if isinstance(padded, fx.Node) and padded.target is operator.add and not padded.users:
        graph.erase_node(padded)
    graph.lint()
    return placeholder
