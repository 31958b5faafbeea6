"""Parameters a model casts to a coarser dtype than its own (Gemma's and Cohere's norms compute in
float32 whatever the model's dtype: ``self.weight.float()``).

Such a parameter's gradient is a float32 sum over every position of the batch: one device sums
them in one order, P ranks each sum their own and the group adds the P sums. Both are right to
float32's precision, not to the case's: in a float64 case the verifier compares those gradients at
float32's tolerance (``compare._for_tensor``), and says so. Nothing else is loosened: the model's
other gradients, its loss and outputs keep the case's tolerance (or their own dtype's).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autosp_verify.compare import TOLERANCES

CASTS = (torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout)


def _coarser(to: torch.dtype, than: torch.dtype) -> bool:
    known = to in TOLERANCES and than in TOLERANCES
    return known and TOLERANCES[to].rtol > TOLERANCES[than].rtol


class CastRecorder(TorchDispatchMode):
    """While active: which of ``params`` ({name: parameter}) an op casts to a coarser dtype
    (``cast``: {name: that dtype}, the coarsest seen)."""

    def __init__(self, params: dict):
        super().__init__()
        self._by_storage = {p.untyped_storage().data_ptr(): (name, p.dtype) for name, p in params.items()}
        self.cast: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func in CASTS and isinstance(source, torch.Tensor) and isinstance(out, torch.Tensor) \
                and source.device.type != "meta":
            found = self._by_storage.get(source.untyped_storage().data_ptr())
            if found is not None and _coarser(out.dtype, found[1]):
                name, earlier = found[0], self.cast.get(found[0])
                if earlier is None or _coarser(out.dtype, earlier):
                    self.cast[name] = out.dtype
        return out
