"""Split a model's output into (loss, named tensors), whatever form it comes in.

Accepted: an HF ModelOutput or any mapping with "loss"; a tuple/list whose first item is the
loss; an object with a ``.loss`` attribute. Other tensors are named by key (``logits``), by
position (``output[1]``), or by path for nested tuples (``hidden_states[0]``); non-tensor leaves
(caches, None) are skipped.
"""
from collections.abc import Mapping

import torch


class OutputError(ValueError):
    """The output has no usable loss."""


def _leaves(name, value, out):
    if isinstance(value, torch.Tensor):
        out[name] = value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            _leaves(f"{name}[{i}]", item, out)


def split_output(output):
    """Return (loss, {name: tensor}) for the non-loss tensors of ``output``."""
    if isinstance(output, Mapping):
        items = dict(output)
        loss = items.pop("loss", None)
    elif isinstance(output, (tuple, list)):
        loss, items = (output[0] if output else None), {f"output[{i}]": v for i, v in enumerate(output) if i}
    elif hasattr(output, "loss"):
        items = {k: v for k, v in vars(output).items() if k != "loss" and not k.startswith("_")}
        loss = output.loss
    else:
        raise OutputError(f"output of type {type(output).__name__} has no loss (expected .loss, a dict with "
                          "'loss', or a tuple whose first item is the loss)")
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        what = "no loss" if loss is None else f"a loss that is not a scalar tensor ({type(loss).__name__})"
        raise OutputError(f"output has {what}")
    tensors = {}
    for name, value in items.items():
        _leaves(name, value, tensors)
    return loss, tensors
