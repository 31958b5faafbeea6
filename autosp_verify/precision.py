"""The precision a model computes in, when coarser than the case's: a float64 case of a model that
computes in float32 somewhere (Gemma's norms: ``hidden_states.float()``, Gemma 4's q/k norms; HF's
RMSNorm: ``.to(torch.float32)``) agrees with one device to float32's precision only.

One device and P ranks run those float32 ops on other shapes and memory layouts (a rank's chunk,
the all-to-all's head-sharded tensors), and the kernels may sum in another order there: a norm
weight's gradient summed over every position, a norm's backward summed over a row whose layout
the all-to-all changed. So a tensor that fails at the case's tolerance is compared once more at
the tolerance of the coarsest dtype the model casts its values down to, and passes there only if
the model does compute in it; the report names each such tensor and the model's line
(``compare.compare``, ``report``). Nothing else is loosened, and a model that never casts down
keeps the case's tolerance throughout.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autosp_verify.compare import TOLERANCES
from autosp_verify.randomness import model_line

CASTS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout)


def _coarser(to: torch.dtype, than: torch.dtype) -> bool:
    known = to in TOLERANCES and than in TOLERANCES
    return known and TOLERANCES[to].rtol > TOLERANCES[than].rtol


class CastRecorder(TorchDispatchMode):
    """While active: the coarsest floating dtype an op casts a finer floating tensor down to
    (``computes_in``, None when none) and the model's line that first does (``where``)."""

    def __init__(self):
        super().__init__()
        self.computes_in: torch.dtype | None = None
        self.where = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func in CASTS and isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) \
                and _coarser(out.dtype, source.dtype) \
                and (self.computes_in is None or _coarser(out.dtype, self.computes_in)):
            self.computes_in, self.where = out.dtype, model_line()
        return out
