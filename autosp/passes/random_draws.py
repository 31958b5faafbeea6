"""Pass ``random_draws``: say where the model draws random numbers (dropout) under SP.

Each rank draws the mask of its own chunk (attention dropout: of its own heads) from its own
generator. Ranks seeded alike (the usual ``set_seed(seed)`` on every rank, which also makes their
initial weights agree) then draw alike masks for their chunks: positions i and i + S/P dropped
together, which one device never does. Not an error (each mask is still a fair dropout mask), but
training is no longer the one-device model's in distribution, so the pass warns once per graph,
naming the line, and counts ``random_draws``. Seeding each rank apart after the model is built
(``torch.manual_seed(seed + rank)``) makes the masks independent. Nothing is edited.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from autosp.passes import ops
from autosp.passes.layout import call_arg, source_line

DROPOUTS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
            torch.dropout}
DRAWS = {torch.bernoulli, torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
         torch.randint_like, torch.normal, torch.multinomial, torch.poisson, torch.randperm}
DRAW_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "exponential_", "random_", "geometric_",
                "cauchy_", "log_normal_"}


def _draws(node) -> bool:
    if node.op == "call_method":
        return node.target in DRAW_METHODS
    if node.op != "call_function":
        return False
    if node.target in DROPOUTS:
        return call_arg(node, 1, "p", 0.5) != 0 and call_arg(node, 2, "training", True) is not False
    if node.target in ops.SDPA:
        return call_arg(node, 4, "dropout_p", 0.0) != 0
    return node.target in DRAWS


def random_draws(ctx) -> None:
    drawing = [node for node in ctx.graph.nodes if _draws(node)]
    ctx.counters["random_draws"] += len(drawing)
    if drawing:
        more = f" and {len(drawing) - 1} more" if len(drawing) > 1 else ""
        warnings.warn(f"autosp: the model draws random numbers ({drawing[0].name}{more}): each rank draws them for "
                      f"its own chunk of the sequence from its own generator, so ranks seeded alike drop alike "
                      f"positions of their chunks; seed each rank apart after the model is built "
                      f"(torch.manual_seed(seed + rank)) for independent masks\n  at {source_line(drawing[0])}",
                      stacklevel=4)
