"""Impls for the accounting tests (negative controls): each computes the right numbers and wastes
something the accounting must see.

``twice``: autosp's compiled step run twice per training step (every collective doubled).
``replicated``: no sequence parallelism at all: every rank runs the whole model on the whole
batch; rank 0's loss carries the gradient, the others return its value without one.
"""
import torch.distributed as dist

import autosp
from autosp.api import CompiledSP


class _Twice(CompiledSP):
    def __call__(self, *args, **kwargs):
        super().__call__(*args, **kwargs)
        return super().__call__(*args, **kwargs)


def twice(model, group):
    return _Twice(model, autosp.SPConfig(group=group, backend="eager"), {})


def replicated(model, group):
    def step(**batch):
        out = dict(model(**batch))
        if dist.get_rank(group) != 0:
            out["loss"] = out["loss"].detach() + 0 * out["loss"]
        return out
    return step
