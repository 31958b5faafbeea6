"""Attention masks as O(S) data: factor an [.., S, S] mask into leaves and a pointwise program.

A model builds its attention mask from values that each carry the sequence once (positions,
document ids, a key-padding vector) and combines them by broadcasting: ``kv <= q``,
``doc[q] == doc[kv]``, ``& pad[kv]``. Every value on the way that carries the sequence twice is
made by a pointwise op from such values. ``factor`` finds that region of the graph above the mask
an attention reads, checks each of its ops is one ``autosp.masked_attention`` can replay, and
works out, from the broadcasting, which dim of each leaf runs along the queries and which along
the keys. ``autosp::masked_attention`` then rebuilds the mask one block of query rows at a time:
no rank ever holds an [S, S] tensor, and the [S, S] nodes of the graph become dead.

A value that carries the sequence twice and cannot be replayed (an [S, S] mask the caller
passes, a view that merges its dims, an op with no entry here) becomes a leaf itself: held whole
on every rank, and reported with the reason (``FactoredMask.whole``); the op still slices it per
block, so no padded or float copy of it is ever made.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from autosp.masked_attention import CAUSAL_PROGRAM, ProgramBuilder, program_of
from autosp.passes.layout import example_value, seq_dims, size_expr

Q, K = "q", "k"

# FX target -> program op (see autosp.masked_attention.OPS). Broadcasting pointwise ops.
_FUNCTIONS = {
    operator.and_: "and", operator.or_: "or", operator.xor: "xor", operator.invert: "invert",
    operator.eq: "eq", operator.ne: "ne", operator.lt: "lt", operator.le: "le", operator.gt: "gt",
    operator.ge: "ge", operator.add: "add", operator.sub: "sub", operator.mul: "mul",
    operator.truediv: "truediv", operator.floordiv: "floordiv", operator.mod: "mod",
    operator.neg: "neg", operator.abs: "abs", torch.where: "where",
    torch.eq: "eq", torch.ne: "ne", torch.lt: "lt", torch.le: "le", torch.gt: "gt", torch.ge: "ge",
    torch.bitwise_and: "and", torch.bitwise_or: "or", torch.bitwise_xor: "xor",
    torch.bitwise_not: "invert", torch.logical_and: "logical_and", torch.logical_or: "logical_or",
    torch.logical_not: "logical_not", torch.logical_xor: "logical_xor",
    torch.maximum: "maximum", torch.minimum: "minimum", torch.neg: "neg", torch.abs: "abs",
}
_METHODS = {
    "__and__": "and", "__or__": "or", "__xor__": "xor", "__invert__": "invert", "eq": "eq",
    "ne": "ne", "lt": "lt", "le": "le", "gt": "gt", "ge": "ge", "logical_and": "logical_and",
    "logical_or": "logical_or", "logical_not": "logical_not", "logical_xor": "logical_xor",
    "bitwise_and": "and", "bitwise_or": "or", "bitwise_not": "invert", "neg": "neg", "abs": "abs",
    "maximum": "maximum", "minimum": "minimum", "masked_fill": "where",
}
_CASTS = {"bool": torch.bool, "float": torch.float32, "double": torch.float64, "half": torch.float16,
          "bfloat16": torch.bfloat16, "int": torch.int32, "long": torch.int64}
_IDENTITY_METHODS = {"expand", "expand_as", "contiguous", "clone"}
_IDENTITY_FUNCTIONS = {torch.clone}
# Made from sizes alone: a constant (broadcast by the block), or the identity pattern.
_CONSTANTS = {torch.ones: 1, torch.zeros: 0, torch.full: None}
_TRIANGLES = {torch.tril: "tril", torch.triu: "triu", "tril": "tril", "triu": "triu"}


@dataclass
class FactoredMask:
    leaves: list  # graph values that carry the sequence once at most
    program: str  # JSON, see autosp.masked_attention: each leaf's query dim, the ops
    region: list  # the [S, S] nodes the mask was built with, in graph order
    whole: dict = field(default_factory=dict)  # leaves that carry the sequence twice -> why


NO_MASK = FactoredMask([], program_of([], []), [])


def causal() -> FactoredMask:
    """``is_causal`` as a program: query position >= key position (for queries that do not start
    at position 0, where torch's ``is_causal`` would align the wrong corner)."""
    return FactoredMask([], CAUSAL_PROGRAM, [])


class NotFactorable(Exception):
    pass


def _two_seq(node, symbol) -> bool:
    return isinstance(node, fx.Node) and len(seq_dims(example_value(node), symbol)) >= 2


def _tensor_inputs(node):
    return [a for a in node.all_input_nodes if isinstance(example_value(a), torch.Tensor)]


def _index_items(node):
    """getitem's index with Ellipsis expanded, when it only inserts dims and keeps whole dims."""
    index = node.args[1]
    items = list(index) if isinstance(index, tuple) else [index]
    nd = example_value(node.args[0]).dim()
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    expanded = []
    for it in items:
        if it is Ellipsis:
            expanded += [slice(None)] * (nd - consumed)
        elif it is None or it == slice(None):
            expanded.append(it)
        else:
            raise NotFactorable(f"{node.name} indexes the mask with {it!r}")
    return expanded + [slice(None)] * (nd - (len(expanded) - expanded.count(None)))


def _kind(node) -> str:
    """How ``node`` maps its inputs' dims: 'broadcast', 'identity', 'unsqueeze' or 'index'."""
    if node.op == "call_function":
        if node.target in _FUNCTIONS:
            return "broadcast"
        if node.target in _CONSTANTS or node.target is torch.eye:
            return "factory"
        if node.target in _TRIANGLES:
            return "triangle"
        if node.target in _IDENTITY_FUNCTIONS:
            return "identity"
        if node.target is torch.unsqueeze:
            return "unsqueeze"
        if node.target is operator.getitem:
            _index_items(node)
            return "index"
    elif node.op == "call_method":
        if node.target in _METHODS or node.target in _CASTS or node.target == "to":
            return "broadcast"
        if node.target in _IDENTITY_METHODS:
            return "identity"
        if node.target in _TRIANGLES:
            return "triangle"
        if node.target == "unsqueeze":
            return "unsqueeze"
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", node.target)
    raise NotFactorable(f"{node.name} ({name}) is not an op the mask can be rebuilt with")


def _input_roles(node, roles, inp) -> tuple:
    """The role of each dim of input ``inp`` of ``node``, given the roles of ``node``'s dims."""
    kind, in_nd = _kind(node), example_value(inp).dim()
    if kind in ("broadcast", "identity", "triangle"):
        if in_nd > len(roles):
            raise NotFactorable(f"{node.name} broadcasts {inp.name} to fewer dims")
        return roles[len(roles) - in_nd:]
    if kind == "unsqueeze":
        d = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
        d %= len(roles)
        return roles[:d] + roles[d + 1:]
    items = _index_items(node)
    return tuple(role for item, role in zip(items, roles) if item is not None)


def _encode(arg, refs):
    if isinstance(arg, fx.Node):
        if arg not in refs:
            raise NotFactorable(f"the mask reads {arg.name}, a value that is neither a tensor nor constant")
        return {"ref": refs[arg]}
    if isinstance(arg, (list, tuple)):
        return {"tuple": [_encode(a, refs) for a in arg]}
    if isinstance(arg, torch.dtype):
        return {"dtype": str(arg).removeprefix("torch.")}
    if isinstance(arg, slice):
        return {"slice": [arg.start, arg.stop, arg.step]}
    if arg is Ellipsis:
        return {"ellipsis": True}
    if isinstance(arg, float) and not math.isfinite(arg):
        return {"float": repr(arg)}
    if arg is None or isinstance(arg, (bool, int, float)):
        return arg
    raise NotFactorable(f"the mask is built with a constant {arg!r} of type {type(arg).__name__}")


def _dtype_of(node) -> torch.dtype | None:
    """The dtype ``x.to(...)`` converts to (None for a device move alone)."""
    for a in (*node.args[1:], *node.kwargs.values()):
        if isinstance(a, torch.dtype):
            return a
        if isinstance(a, fx.Node) and isinstance(example_value(a), torch.Tensor):
            return example_value(a).dtype  # x.to(other)
    return None


class _Program(ProgramBuilder):
    """A program replaying graph nodes; ``refs`` maps each node added to its value's index."""

    def __init__(self, leaves, q_dims):
        super().__init__(q_dims)
        self.refs = {leaf: i for i, leaf in enumerate(leaves)}

    def encode(self, arg):
        return _encode(arg, self.refs)

    def add(self, node, roles) -> None:
        """Replay ``node`` (its inputs already added)."""
        self.refs[node] = self._replay(node, roles)["ref"]

    def _replay(self, node, roles) -> dict:
        kind, x = _kind(node), (node.args[0] if node.args else None)
        enc = self.encode
        if kind == "identity" or (node.op == "call_method" and node.target == "to" and _dtype_of(node) is None):
            return enc(x)  # a device move, an expand, a copy: the same values here
        if kind in ("factory", "triangle") and tuple(roles[-2:]) != (Q, K):
            raise NotFactorable(f"{node.name} makes a pattern over its last two dims, which are not "
                                "the mask's queries and keys in that order")
        if kind == "factory":
            if node.target is torch.eye:
                return self.emit("eq", [self.positions("rows"), self.positions("cols")])
            value = _CONSTANTS[node.target]
            if value is None:
                value = node.args[1] if len(node.args) > 1 else node.kwargs["fill_value"]
            return self.emit("full", [enc(value), enc(example_value(node).dtype)])
        if kind == "triangle":
            diagonal = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
            return self.emit(_TRIANGLES[node.target], [enc(x), self.positions("rows"),
                                                       self.positions("cols"), enc(diagonal)])
        if node.op == "call_method" and node.target in _CASTS:
            return self.emit("to_dtype", [enc(x), enc(_CASTS[node.target])])
        if node.op == "call_method" and node.target == "to":
            return self.emit("to_dtype", [enc(x), enc(_dtype_of(node))])
        if kind == "unsqueeze":
            return self.emit("unsqueeze", [enc(a) for a in node.args])
        if kind == "index":
            return self.emit("index", [enc(x), enc(tuple(_index_items(node)))])
        if node.op == "call_method" and node.target == "masked_fill":
            _, fill_mask, value = node.args
            return self.emit("where", [enc(fill_mask), enc(value), enc(x)])
        name = _FUNCTIONS[node.target] if node.op == "call_function" else _METHODS[node.target]
        return self.emit(name, [enc(a) for a in node.args], {k: enc(v) for k, v in node.kwargs.items()})


def _region(mask: fx.Node, symbol) -> tuple[list, dict]:
    """The nodes above ``mask`` that carry the sequence twice and can be replayed, in graph
    order; and those that cannot (an input, an op with no entry here), with the reason: they
    become leaves, computed whole."""
    region, whole, stack = set(), {}, [mask]
    while stack:
        node = stack.pop()
        if node in region or node in whole:
            continue
        try:
            if node.op not in ("call_function", "call_method"):
                raise NotFactorable(f"the mask comes whole from {node.name} (an input with two sequence dims)")
            _kind(node)
        except NotFactorable as e:
            whole[node] = str(e)
            continue
        region.add(node)
        stack += [a for a in _tensor_inputs(node) if _two_seq(a, symbol)]
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(region, key=order.__getitem__), whole


def _roles(mask, region) -> dict:
    """The role (Q, K or None) of every dim of every region node and leaf, from the mask down."""
    nd = example_value(mask).dim()
    roles = {mask: (None,) * (nd - 2) + (Q, K)}
    for node in reversed(region):
        for inp in _tensor_inputs(node):
            got = _input_roles(node, roles[node], inp)
            if roles.setdefault(inp, got) != got:
                raise NotFactorable(f"{inp.name} is broadcast along the queries and the keys both")
    return roles


def _check_dims(node, roles, symbol) -> int:
    """The query dim of ``node`` to slice per block (-1: none); every sequence dim is Q or K."""
    value, q_dim = example_value(node), -1
    for d in seq_dims(value, symbol):
        if roles[d] not in (Q, K) or size_expr(value.shape[d]) != symbol:
            raise NotFactorable(f"{node.name} {tuple(value.shape)} carries the sequence on a dim that is "
                                "neither the mask's queries nor its keys")
        if roles[d] == Q:
            q_dim = d
    return q_dim


def factor(mask: fx.Node, symbol) -> FactoredMask:
    """Factor the mask ``mask`` (an attention's ``attn_mask``). What carries the sequence twice
    and cannot be replayed becomes a leaf, held whole (``FactoredMask.whole`` says which and
    why); at worst the mask itself."""
    try:
        return _factor(mask, symbol)
    except NotFactorable as e:
        return _whole(mask, symbol, str(e))


def _whole(mask, symbol, why: str) -> FactoredMask:
    nd = example_value(mask).dim()
    roles = (None,) * (nd - 2) + (Q, K) if nd >= 2 else (K,) * nd
    whole = {mask: why} if _two_seq(mask, symbol) else {}
    return FactoredMask([mask], program_of([_check_dims(mask, roles, symbol)], []), [], whole)


def _factor(mask, symbol) -> FactoredMask:
    region, whole = _region(mask, symbol) if _two_seq(mask, symbol) else ([], {})
    if not region:  # the mask is its own leaf
        return _whole(mask, symbol, "; ".join(whole.values()))
    roles = _roles(mask, region)
    leaves = [n for n in roles if n not in region]
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    leaves.sort(key=order.__getitem__)
    q_dims = [_check_dims(leaf, roles[leaf], symbol) for leaf in leaves]
    for node in region:
        _check_dims(node, roles[node], symbol)
    program = _Program(leaves, q_dims)
    for node in region:
        program.add(node, roles[node])
    return FactoredMask(leaves, program.program({"ref": program.refs[mask]}), region, whole)
