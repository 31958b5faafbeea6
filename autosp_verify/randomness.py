"""Random numbers a model draws in its forward (dropout, noise): a case the verifier cannot judge.

One device draws one mask for the whole sequence; each of P ranks draws its own for its chunk, from
its own generator. With dropout on, the loss and every gradient differ whether the implementation
is right or wrong, so a verdict either way would be a guess (and every GPT-2- or BERT-style config
has dropout 0.1 by default). The verifier records the draws in one eager forward of its own copy
(``core.model_facts``) and refuses the case before any rank runs, naming the op, the model's line
and, for an HF model, the config fields to set to 0.
"""
from __future__ import annotations

import os
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
RANDOM_OPS = {getattr(_aten, name) for name in (
    "bernoulli", "bernoulli_", "native_dropout", "rand", "rand_like", "randn", "randn_like", "randint",
    "randint_like", "randperm", "multinomial", "normal", "normal_", "uniform", "uniform_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "random_", "rrelu_with_noise", "poisson", "binomial",
    "_standard_gamma", "_sample_dirichlet") if hasattr(_aten, name)}
_TORCH_DIR = os.path.dirname(torch.__file__)


def model_line() -> str:
    """The innermost caller outside torch and this package: the model's line that drew."""
    for frame in reversed(traceback.extract_stack()):
        if not frame.filename.startswith((_TORCH_DIR, os.path.dirname(__file__))):
            return f"{frame.filename}:{frame.lineno} ({(frame.line or '').strip()})"
    return "an unknown line"


class RandomRecorder(TorchDispatchMode):
    """While active: every random op run (``draws``: [(op, the model's line)], in order)."""

    def __init__(self):
        super().__init__()
        self.draws: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in RANDOM_OPS:
            self.draws.append((func.overloadpacket.__name__, model_line()))
        return func(*args, **(kwargs or {}))


def config_dropouts(model) -> dict:
    """An HF model's config fields naming a dropout probability that is not 0 ({} otherwise)."""
    config = getattr(model, "config", None)
    fields = config.to_dict() if hasattr(config, "to_dict") else {}
    return {k: v for k, v in fields.items() if "drop" in k and isinstance(v, float) and v > 0}


def refusal(draws: list, model) -> str:
    """The message refusing a case whose model drew ``draws`` (non-empty)."""
    op, line = draws[0]
    lines = {where for _, where in draws}
    more = f", and at {len(lines) - 1} more lines" if len(lines) > 1 else ""
    fields = config_dropouts(model)
    hint = (f"its config: {', '.join(f'{k}={v}' for k, v in fields.items())}" if fields
            else "dropout probabilities 0, or the model in eval() if nothing else changes with it")
    return (f"the model draws random numbers in its forward ({op} at {line}{more}): one device and the "
            f"ranks cannot draw the same ones, so no loss or gradient can be compared exactly. Build it "
            f"without them in model_fn ({hint}; set to 0); the sharding does not depend on them")
