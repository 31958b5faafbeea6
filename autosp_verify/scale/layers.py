"""Fewer layers traced, all of them simulated: the decoder stack is periodic.

Tracing costs about 1.5 s per decoder layer on 2 cores (symbolic shapes: every size of every op
is a sympy expression), so a 32-layer 8B model takes a minute per (SP degree, checkpointing).
The memory program of a stack of identical layers is periodic, though: trace the first
``traced_layers()`` = 5 (the first, the last, a middle one and its neighbours), then repeat the
middle layer's steps, and map every buffer's life onto its copy: a value made in layer i and
last used in layer i + d (d in -1..1: the residual stream, a value saved for the layer's own
backward) lives from copy c to copy c + d; one made outside the layers lives to the first or
the last layer as traced. Before extending it checks what it relies on: the layers' modules are
alike (``homogeneous``), the traced middle layers run the same ops and their values live alike,
and no value spans more layers than that; anything else raises ``NotPeriodic`` and the caller
traces every layer. The result equals a full trace (tests/scale/test_layers.py; at full size:
docs/scale.md).
"""
from __future__ import annotations

import re
from collections import defaultdict

from torch import nn

from autosp_verify.scale.program import END, Buffer, Program


class NotPeriodic(ValueError):
    """The traced layers cannot stand for the others: trace every layer instead."""


def layer_stack(model) -> nn.ModuleList | None:
    """The model's decoder layers: the ModuleList as long as ``config.num_hidden_layers``."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not count:
        return None
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    return stacks[0] if len(stacks) == 1 else None


def truncate_layers(model, layers: int) -> None:
    """Keep the first ``layers`` decoder layers (in place; the config says the new count)."""
    stack = layer_stack(model)
    if stack is None:
        raise ValueError("cannot find the model's decoder layers (an nn.ModuleList as long as "
                         "config.num_hidden_layers) to trace fewer of them")
    if not 1 <= layers <= len(stack):
        raise ValueError(f"cannot keep {layers} of the model's {len(stack)} layers")
    del stack[layers:]
    model.config.num_hidden_layers = layers


def stack_path(model) -> str | None:
    stack = layer_stack(model)
    return next((name for name, m in model.named_modules() if m is stack), None) if stack is not None else None


def homogeneous(model) -> str | None:
    """Why the decoder layers cannot stand for each other (None when they can): different
    structure, or a config giving layers different attention (``layer_types``)."""
    stack = layer_stack(model)
    if stack is None:
        return "no decoder layer stack found"
    if len({repr(layer) for layer in stack}) > 1:
        return "the decoder layers differ in structure"
    types = getattr(model.config, "layer_types", None)
    if types and len(set(types)) > 1:
        return f"the config gives the layers different types {sorted(set(types))}"
    return None


def traced_layers(reach: int = 1) -> int:
    """Layers to trace: the first and last ``reach`` layers, a middle one and its ``reach``
    neighbours on each side. ``reach``: how many layers a value may live across."""
    return 2 * reach + 3


def _raw_layer(module: str, path: str) -> int | None:
    if not module.startswith(path + "."):
        return None
    head = module[len(path) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def segments(program: Program, path: str) -> list[tuple]:
    """The segment of every step: ``(phase, run, layer)``, or ``(phase, "pre"|"post", None)``
    before a phase's first layer step and after its last. A run is a stretch of the phase that
    walks the layers one way (the forward up; the backward down, after a run up where the
    partitioner recomputes the residual stream first). Only steps that allocate say which
    layer they are in (a view keeps the module of the node it was first made for, another
    layer's once common subexpressions are merged), and only when next to the layer before:
    a value every layer shares (the causal mask, the rotary table) is tagged with the first
    layer that made it wherever it is recomputed. The others follow the step before them."""
    anchors = {b.birth for b in program.buffers} | {i for i, s in enumerate(program.steps) if s.workspace}
    out: list = [None] * len(program.steps)
    for phase in ("forward", "backward"):
        idx = [i for i, s in enumerate(program.steps) if s.phase == phase]
        raw = [_raw_layer(program.steps[i].module, path) if i in anchors else None for i in idx]
        tagged = [j for j, r in enumerate(raw) if r is not None]
        run, direction, layer = 0, 0, None
        for j, i in enumerate(idx):
            if not tagged or j < tagged[0] or j > tagged[-1]:
                out[i] = (phase, "pre" if not tagged or j < tagged[0] else "post", None)
                continue
            if raw[j] is not None and layer is not None and abs(raw[j] - layer) > 1:
                raw[j] = None  # a value all layers share, made where the first layer first needed it
            if raw[j] is not None and layer is not None and raw[j] != layer:
                change = raw[j] - layer
                if direction and change != direction:
                    run += 1
                direction = change
            layer = raw[j] if raw[j] is not None else layer
            out[i] = (phase, run, layer)
    return out


class _Layout:
    """Where each step of the traced program sits: its segment and its offset in it."""

    def __init__(self, program: Program, path: str, traced: int):
        self.seg = segments(program, path)
        self.traced = traced
        self.steps = defaultdict(list)  # segment -> old step indices in order
        self.offset = []
        for i, key in enumerate(self.seg):
            self.offset.append(len(self.steps[key]))
            self.steps[key].append(i)
        self.runs = defaultdict(dict)  # phase -> run -> (direction, layers)
        for phase, run, layer in self.steps:
            if layer is not None:
                layers = sorted(l for p, r, l in self.steps if p == phase and r == run and l is not None)
                first = next(l for p, r, l in self.seg if p == phase and r == run and l is not None)
                self.runs[phase][run] = (1 if first == layers[0] else -1, layers)
        found = sorted({layer for _, _, layer in self.seg if layer is not None})
        if found != list(range(traced)):
            raise NotPeriodic(f"found layers {found} in the traced graphs, expected 0..{traced - 1}")

    @staticmethod
    def layer(seg) -> int | None:
        return seg[2]

    def middle(self, layer: int) -> bool:
        return 0 < layer < self.traced - 1


def _source(c: int, layers: int, traced: int, reach: int) -> int:
    """The traced layer that expanded layer ``c`` copies."""
    if c <= reach:
        return c
    if c >= layers - 1 - reach:
        return traced - 1 - (layers - 1 - c)
    return reach + 1


def _ops(program: Program, lay: _Layout, layer: int) -> tuple:
    return tuple((key[:2], tuple(program.steps[i].op for i in steps))
                 for key, steps in sorted(lay.steps.items(), key=str) if key[2] == layer)


def _lives(program: Program, lay: _Layout, layer: int) -> dict:
    """The buffers born in ``layer``, grouped by how many layers later they die (None: outside
    the layers, or never)."""
    out = defaultdict(list)
    for b in program.buffers:
        if lay.seg[b.birth][2] != layer:
            continue
        death = lay.seg[b.death] if b.death < END else None
        delta = None if death is None or death[2] is None else death[2] - layer
        where = None if death is None else (death[:2], lay.offset[b.death])
        out[delta].append((lay.seg[b.birth][:2], lay.offset[b.birth], str(b.nbytes), b.category, where))
    return {k: sorted(v, key=str) for k, v in out.items()}


def _check_periodic(program: Program, lay: _Layout) -> None:
    """Middle layers run the same ops, and buffers born in them live alike wherever they die
    in a middle layer too (a death in the first or the last layer may differ: those copies are
    taken from the traced layer next to it)."""
    middle = range(1, lay.traced - 1)
    if len({_ops(program, lay, layer) for layer in middle}) > 1:
        raise NotPeriodic("the traced middle layers run different ops")
    lives = {layer: _lives(program, lay, layer) for layer in middle}
    for delta in {d for v in lives.values() for d in v}:
        alike = [layer for layer in middle if delta is None or lay.middle(layer + delta)]
        if len({repr(lives[layer].get(delta)) for layer in alike}) > 1:
            raise NotPeriodic(f"values of the traced middle layers dying {delta} layers later live "
                             "differently: cannot extrapolate from fewer layers")


def _expanded_steps(lay: _Layout, layers: int, reach: int):
    """The new program's steps (old indices, in order) and (old step, copy) -> new index."""
    order, index = [], {}
    for phase in ("forward", "backward"):
        parts = [(None, lay.steps[(phase, "pre", None)])]
        for run, (direction, traced_layers_) in sorted(lay.runs[phase].items()):
            copies = [c for c in range(layers) if _source(c, layers, lay.traced, reach) in traced_layers_]
            for c in (copies if direction > 0 else reversed(copies)):
                parts.append((c, lay.steps[(phase, run, _source(c, layers, lay.traced, reach))]))
        parts.append((None, lay.steps[(phase, "post", None)]))
        for c, old in parts:
            for i in old:
                index[(i, c)] = len(order)
                order.append(i)
    return order, index


def _death(b: Buffer, born_layer, c, lay: _Layout, layers: int, reach: int, index: dict) -> int:
    if b.death >= END:
        return b.death
    phase, run, layer = lay.seg[b.death]
    if layer is None:
        return index[(b.death, None)]
    near = born_layer is not None and abs(layer - born_layer) <= reach
    if near:
        target = c + layer - born_layer
    elif born_layer is None or not lay.middle(born_layer):  # one copy: its death is unique too
        if lay.middle(layer):
            raise NotPeriodic(f"{b.name}, made outside the middle layers, is last used in middle layer "
                             f"{layer}: cannot extrapolate")
        target = 0 if layer == 0 else layers - 1
    else:
        raise NotPeriodic(f"{b.name} lives from layer {born_layer} to layer {layer}, more than {reach} "
                         "apart: cannot extrapolate")
    source = _source(target, layers, lay.traced, reach)
    if source != layer and not (lay.middle(source) and lay.middle(layer)):
        raise NotPeriodic(f"{b.name}: traced layer {layer} cannot stand for layer {target} of {layers}")
    return index[(lay.steps[(phase, run, source)][lay.offset[b.death]], target)]


def extend(program: Program, path: str, traced: int, layers: int, reach: int = 1) -> Program:
    """The program of the model with ``layers`` decoder layers, from the program of its first
    ``traced`` ones (``traced_layers(reach)``): middle layers repeated, every buffer's life
    mapped onto its copy's steps. Checks that the traced middle layers are alike; raises
    ValueError where the stack is not periodic."""
    if traced != traced_layers(reach):
        raise ValueError(f"traced {traced} layers, extending needs {traced_layers(reach)}")
    if layers <= traced:
        raise ValueError(f"nothing to extrapolate: {layers} layers, {traced} traced")
    lay = _Layout(program, path, traced)
    _check_periodic(program, lay)
    order, index = _expanded_steps(lay, layers, reach)
    buffers = []
    for b in program.buffers:
        born_layer = lay.seg[b.birth][2]
        copies = [None] if born_layer is None else \
            [c for c in range(layers) if _source(c, layers, traced, reach) == born_layer]
        for c in copies:
            death = _death(b, born_layer, c, lay, layers, reach, index)
            buffers.append(Buffer(b.name, b.nbytes, b.category, index[(b.birth, c)], death, b.shape))
    meta = {k: v for k, v in program.meta.items() if not k.startswith("_")}
    meta.update(layers_traced=traced, layers=layers)
    return Program([program.steps[i] for i in order], buffers, program.symbols, program.guards, meta,
                   program.local_lengths)
