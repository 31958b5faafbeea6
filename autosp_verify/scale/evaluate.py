"""Evaluate a memory program at one sequence length: sizes, liveness, the peak and what it holds.

Nothing is computed on tensors: every size is the program's sympy expression with the sequence
symbol replaced by S, so 1M tokens costs what 1k does. The ops whose working memory is replayed
(workspace.py) run on meta tensors once per distinct shape.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy
import torch
from torch import fx

from autosp_verify.scale.program import CATEGORIES, END, Program, _expr

WORKSPACE = "temporaries"  # the category op working memory is counted in


class Evaluator:
    """Values of a program's symbolic sizes at sequence length ``length``."""

    def __init__(self, symbols, length: int, world_size: int, cache: dict, local_lengths=None):
        self.env = length_env(symbols, length, local_lengths)
        self.length, self.world_size, self.cache = length, world_size, cache
        self._ints: dict = {}

    def int(self, expr) -> int:
        if isinstance(expr, int):
            return expr
        if expr not in self._ints:
            value = expr.xreplace(self.env)
            if not value.is_number:
                raise ValueError(f"size {expr} does not evaluate to a number at S={self.length}")
            self._ints[expr] = int(value)
        return self._ints[expr]

    def value(self, x, device="meta"):
        """A graph argument at this length: a tensor becomes an empty one on ``device`` with the
        evaluated shape and strides, a SymInt an int; lists map; constants pass through."""
        if isinstance(x, fx.Node):
            x = x.meta.get("val")
        if isinstance(x, torch.SymInt):
            return self.int(x.node.expr)
        if isinstance(x, torch.Tensor):
            shape = [self.int(_expr(s)) for s in x.shape]
            stride = [self.int(_expr(s)) for s in x.stride()]
            return torch.empty_strided(shape, stride, dtype=x.dtype, device=device)
        if isinstance(x, (list, tuple)):
            return type(x)(self.value(a, device) for a in x)
        return x

    @staticmethod
    def key(values) -> tuple:
        """A hashable description of evaluated arguments (tensors by shape, strides, dtype)."""
        def one(v):
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), tuple(v.stride()), str(v.dtype))
            if isinstance(v, (list, tuple)):
                return tuple(one(a) for a in v)
            return repr(v)
        return one(values)


def length_env(symbols, length: int, local_lengths=None) -> dict:
    """Each sequence symbol's value at length ``length``: S, or for autosp's local-length
    symbol (``local_lengths``: {symbol: expression in S}) that expression's value."""
    local_lengths = local_lengths or {}
    env = {s: sympy.Integer(length) for s in symbols if s not in local_lengths}
    env.update({s: sympy.Integer(int(e.xreplace(env))) for s, e in local_lengths.items()})
    return env


def check_guards(program: Program, length: int) -> None:
    """The graphs hold only where the trace's guards do (e.g. a lower bound on S)."""
    env = length_env(program.symbols, length, program.local_lengths)
    for guard in program.guards:
        if guard.xreplace(env) is sympy.false:
            raise ValueError(f"S={length} is outside what the traced graph covers (guard {guard})")


@dataclass
class Peak:
    """The largest live total of a step's graphs, where it happens and what is live there."""
    total: int
    by_category: dict
    step: str
    phase: str
    module: str
    end_live: dict  # what is live after the backward, by category (gradients, inputs)


def _arrays(program: Program):
    if "_arrays" not in program.meta:
        births = np.array([b.birth for b in program.buffers], dtype=np.int64)
        deaths = np.array([min(b.death, len(program.steps) - 1) for b in program.buffers], dtype=np.int64)
        cats = np.array([CATEGORIES.index(b.category) for b in program.buffers], dtype=np.int64)
        workspaces = [(i, s.workspace) for i, s in enumerate(program.steps) if s.workspace is not None]
        program.meta["_arrays"] = (births, deaths, cats, workspaces)
    return program.meta["_arrays"]


def evaluate(program: Program, length: int, *, exclude: tuple = (), workspace: bool = True) -> Peak:
    """The peak of ``program`` at sequence length ``length``. ``exclude`` (categories) and
    ``workspace=False`` leave parts out: the negative controls of the validation use them."""
    if length < 2:
        raise ValueError(f"sequence length must be at least 2, got {length}")
    check_guards(program, length)
    cache = program.meta.setdefault("_cache", {})
    ev = Evaluator(program.symbols, length, program.meta.get("world_size", 1), cache, program.local_lengths)
    births, deaths, cats, workspaces = _arrays(program)
    sizes = np.array([ev.int(b.nbytes) for b in program.buffers], dtype=np.int64)
    for name in exclude:
        sizes[cats == CATEGORIES.index(name)] = 0
    n = len(program.steps)
    diff = np.zeros(n + 1, dtype=np.int64)
    np.add.at(diff, births, sizes)
    np.add.at(diff, deaths + 1, -sizes)
    live = np.cumsum(diff[:n])
    ws = np.zeros(n, dtype=np.int64)
    if workspace:
        for i, fn in workspaces:
            ws[i] = fn(ev)
    total = live + ws
    t = int(np.argmax(total))
    alive = (births <= t) & (deaths >= t)
    by_category = {c: int(sizes[alive & (cats == i)].sum()) for i, c in enumerate(CATEGORIES)}
    by_category[WORKSPACE] += int(ws[t])
    ended = np.array([b.death >= END for b in program.buffers])
    end_live = {c: int(sizes[ended & (cats == i)].sum()) for i, c in enumerate(CATEGORIES)}
    step = program.steps[t]
    return Peak(int(total[t]), by_category, step.name, step.phase, step.module, end_live)
