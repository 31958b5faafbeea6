"""The memory program of one training step: every buffer the step allocates, with its size as a
sympy expression of the sequence length, its category, and the steps it is alive for.

Built from the captured forward and backward graphs (trace.py), in execution order, the way the
generated code runs them: a value is allocated when its node runs and freed after its last use;
a forward value the backward reads (a *saved* value) lives until the backward's last use of it;
views and aliases share their base's storage (the op schema's alias annotations say which
outputs alias which input; ``_unsafe_view`` too, which shares storage without saying so). The
backward starts by allocating its tangents: the loss's and zeros for every other differentiable
output (autograd materialises them: HF's ``logits`` cost a zero tensor of their size), and its
outputs, the parameters' gradients, live to the end of the step. Parameters, master weights and
optimizer states are not here: state.py counts them from the parameter shapes.

Categories (of a storage, first that applies): ``masks`` (two dims carry the sequence),
``gradients`` (a parameter's gradient), ``input_derived`` (no trainable parameter upstream: ids,
labels, positions, rotary tables, mask leaves, computed in full on every rank), ``saved``
(activations kept for the backward), ``temporaries`` (everything else, plus the working memory
of ops that allocate inside, see workspace.py).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from autosp_verify.scale.trace import Trace
from autosp_verify.scale.workspace import workspace_of

CATEGORIES = ("masks", "gradients", "input_derived", "saved", "temporaries")
END = 1 << 60  # death of buffers that outlive the backward (gradients, the caller's inputs)
_UNSAFE_ALIASES = {torch.ops.aten._unsafe_view.default}


@dataclass
class Buffer:
    name: str
    nbytes: object  # sympy expression (or int) of the sequence symbols
    category: str
    birth: int
    death: int
    shape: tuple = ()  # sympy expressions (for reports)


@dataclass
class Step:
    name: str
    phase: str  # "forward" | "backward"
    module: str  # the nn.Module path the node came from ("" when unknown)
    op: str = ""  # the node's target
    workspace: object = None  # callable(evaluate) -> bytes, see workspace.py


@dataclass
class Program:
    steps: list
    buffers: list
    symbols: frozenset
    guards: list
    meta: dict = field(default_factory=dict)
    local_lengths: dict = field(default_factory=dict)  # see Trace.local_lengths


def _expr(size):
    return size.node.expr if isinstance(size, torch.SymInt) else int(size)


def tensor_bytes(val):
    n = 1
    for s in val.shape:
        n = n * _expr(s)
    return n * val.element_size()


def _module_of(node) -> str:
    stack = node.meta.get("nn_module_stack") or node.meta.get("fwd_nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, tuple) else str(last)
    return path.split(".", 1)[1] if path.startswith("L[") and "." in path else path


def _alias_source(node):
    """The argument node whose storage ``node``'s output shares, or None (a new allocation)."""
    target = node.target
    if target is operator.getitem:
        return None  # handled by the caller: an element of a multi-output node
    if target in _UNSAFE_ALIASES:
        return node.args[0]
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns or schema.returns[0].alias_info is None:
        return None
    alias_set = schema.returns[0].alias_info.before_set
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is not None and arg.alias_info.before_set & alias_set:
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            return value if isinstance(value, fx.Node) else None
    return None


class _Builder:
    """Walks the forward then the backward graph, giving each storage a birth and its refs."""

    def __init__(self, trace: Trace):
        self.trace, self.symbols = trace, trace.symbols
        self.steps: list[Step] = []
        self.storages: list[dict] = []
        self.sid: dict = {}  # node -> storage id | list of ids (multi-output) | None (no storage of ours)
        self.dep: dict = {}  # node -> has a trainable parameter (or a tangent) upstream
        self.extra_end: dict = {}  # storage id -> step its life reaches beyond its refs' uses
        self.at: dict = {}  # node -> its step

    def step(self, name, phase, module="", workspace=None, op="") -> int:
        self.steps.append(Step(name, phase, module, op or name, workspace))
        return len(self.steps) - 1

    def new_storage(self, node, val, birth: int) -> int:
        seq_dims = sum(1 for s in val.shape if isinstance(s, torch.SymInt)
                       and s.node.expr.free_symbols & self.symbols)
        self.storages.append({"name": node.name, "nbytes": tensor_bytes(val), "birth": birth, "refs": [node],
                              "mask": seq_dims >= 2, "dep": self.dep.get(node, True),
                              "shape": tuple(_expr(s) for s in val.shape)})
        return len(self.storages) - 1

    def ref(self, node, sid):
        self.sid[node] = sid
        if isinstance(sid, int):
            self.storages[sid]["refs"].append(node)

    def call(self, node, step: int):
        """The storage(s) of a call_function node's value: new, or shared with an input."""
        self.dep[node] = any(self.dep.get(a, False) for a in node.all_input_nodes)
        val = node.meta.get("val")
        if node.target is operator.getitem and isinstance(self.sid.get(node.args[0]), list):
            self.ref(node, self.sid[node.args[0]][node.args[1]])
        elif isinstance(val, torch.Tensor):
            source = _alias_source(node)
            if source is not None:
                self.ref(node, self.sid.get(source))
            else:
                self.sid[node] = self.new_storage(node, val, step)
        elif isinstance(val, (tuple, list)):
            source = _alias_source(node)  # a list of views (split, unbind) shares its input's storage
            ids = []
            for v in val:
                if not isinstance(v, torch.Tensor):
                    ids.append(None)
                elif source is not None:
                    ids.append(self.sid.get(source))
                else:
                    ids.append(self.new_storage(node, v, step))
            self.sid[node] = ids
            for i in ids:
                if isinstance(i, int) and node not in self.storages[i]["refs"]:
                    self.storages[i]["refs"].append(node)

    def forward(self, fw, trainable: set) -> int:
        start = self.step("inputs", "forward")
        for i, node in enumerate(n for n in fw.graph.nodes if n.op == "placeholder"):
            val = node.meta.get("val")
            self.dep[node] = i in trainable
            carries = isinstance(val, torch.Tensor) and any(
                isinstance(s, torch.SymInt) and s.node.expr.free_symbols & self.symbols for s in val.shape)
            if carries and i not in trainable:  # the caller's inputs: held for the whole step
                self.sid[node] = self.new_storage(node, val, start)
                self.extra_end[self.sid[node]] = END
            else:
                self.sid[node] = None  # parameters and buffers: state.py
        for node in fw.graph.nodes:
            if node.op == "call_function":
                self.run(node, "forward")
        return self.step("forward end", "forward")

    def run(self, node, phase: str) -> None:
        self.at[node] = self.step(node.name, phase, _module_of(node), workspace_of(node), str(node.target))
        self.call(node, self.at[node])

    def backward(self, bw, fw_nodes: dict) -> int:
        """Returns the step the backward starts at (saved values live at least until then)."""
        start = self.step("backward start", "backward")
        for node in bw.graph.nodes:
            if node.op == "placeholder":
                if node.name in fw_nodes:  # a saved value (or a primal) from the forward
                    fw_node = fw_nodes[node.name]
                    self.dep[node] = self.dep.get(fw_node, False)
                    self.ref(node, self.sid.get(fw_node))
                elif isinstance(node.meta.get("val"), torch.Tensor):  # a tangent
                    self.dep[node] = True
                    self.sid[node] = self.new_storage(node, node.meta["val"], start)
            elif node.op == "call_function":
                self.run(node, "backward")
        self.step("backward end", "backward")
        return start


def _output_args(gm) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def _trainable(fw, bw) -> set:
    """Indices of the forward's placeholders that get a gradient (the backward's outputs line up
    with them: one per primal, None for the rest)."""
    placeholders = [n for n in fw.graph.nodes if n.op == "placeholder"]
    grads = _output_args(bw)
    if len(grads) != len(placeholders):
        raise RuntimeError(f"backward returns {len(grads)} values for {len(placeholders)} forward inputs")
    return {i for i, g in enumerate(grads) if g is not None}


def _death(b: _Builder, st: dict, sid: int, ends: tuple, user_outputs: set, saved: set,
           bw_graph) -> tuple[int, bool]:
    """(last step the storage is alive, whether it is a parameter's gradient). ``ends``: the
    forward's last step and the backward's first."""
    fw_end, bw_start = ends
    death, grad = max(st["birth"], b.extra_end.get(sid, 0)), False
    for ref in st["refs"]:
        if ref in saved:  # autograd holds it until the backward takes it
            death = max(death, bw_start)
        for user in ref.users:
            if user.op == "call_function":
                death = max(death, b.at[user])
            elif user.op == "output" and ref in user_outputs:
                death = max(death, fw_end)  # the caller drops the outputs after the forward
            elif user.op == "output" and user.graph is bw_graph:
                death, grad = END, True  # a backward output: a gradient, alive into the optimizer step
    return death, grad


def _category(st: dict, grad: bool, saved: bool) -> str:
    if st["mask"]:
        return "masks"
    if grad:
        return "gradients"
    if not st["dep"]:
        return "input_derived"
    return "saved" if saved else "temporaries"


def build_program(trace: Trace) -> Program:
    """The memory program of ``trace`` (see the module docstring)."""
    fw, bw, n_user = trace.graphs.fw, trace.graphs.bw, trace.graphs.num_fwd_outputs
    b = _Builder(trace)
    fw_end = b.forward(fw, _trainable(fw, bw))
    bw_start = b.backward(bw, {n.name: n for n in fw.graph.nodes})
    user_outputs, saved = set(_output_args(fw)[:n_user]) - {None}, set(_output_args(fw)[n_user:])
    buffers = []
    for sid, st in enumerate(b.storages):
        death, grad = _death(b, st, sid, (fw_end, bw_start), user_outputs, saved, bw.graph)
        category = _category(st, grad, any(r in saved for r in st["refs"]))
        buffers.append(Buffer(st["name"], st["nbytes"], category, st["birth"], death, st["shape"]))
    return Program(b.steps, buffers, trace.symbols, trace.guards,
                   {"impl": trace.impl, "world_size": trace.world_size, "checkpointing": trace.checkpointing,
                    **trace.meta}, trace.local_lengths)
