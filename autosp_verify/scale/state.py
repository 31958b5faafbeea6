"""Memory that does not depend on the sequence: parameters, optimizer states, the optimizer step.

Mixed-precision training as DeepSpeed and most trainers run it: parameters and gradients in the
training dtype (bf16), a float32 master copy of the parameters and Adam's two float32 states.
ZeRO-1 shards the master copy and the states over the data-parallel x sequence-parallel ranks
(every rank of an SP group holds a different shard too); parameters and gradients stay whole on
every rank. The optimizer step holds, beside all that, this rank's shard of the gradients in
float32 and one float32 temporary of the shard's size (torch's foreach Adam: the denominator
``sqrt(v) + eps``; a fused Adam needs none), after the activations are gone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def dtype_of(name) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(_DTYPES)}")
    return _DTYPES[name]


def _size(dtype) -> int:
    return torch.empty((), dtype=dtype_of(dtype)).element_size()


@dataclass(frozen=True)
class Training:
    """How one rank trains: ``dtype`` of parameters, gradients and activations; ``master`` the
    dtype of the master copy (None: none); ``states`` optimizer states per parameter (Adam: 2)
    in ``state_dtype``; ``zero`` 0 (nothing sharded) or 1 (master and states sharded over
    ``shards`` ranks); ``step_temporaries``: shard-sized float32 buffers the step holds."""
    dtype: str = "bfloat16"
    master: str | None = "float32"
    states: int = 2
    state_dtype: str = "float32"
    zero: int = 1
    step_temporaries: int = 2

    def __post_init__(self):
        dtype_of(self.dtype), dtype_of(self.state_dtype)
        if self.master is not None:
            dtype_of(self.master)
        if self.zero not in (0, 1):
            raise ValueError(f"zero must be 0 or 1 (ZeRO-2/3 shard gradients or parameters: not modelled), "
                             f"got {self.zero}")
        if self.states < 0 or self.step_temporaries < 0:
            raise ValueError("states and step_temporaries must be >= 0")


@dataclass(frozen=True)
class State:
    parameters: int  # bytes of parameters and buffers, whole on every rank
    optimizer: int  # master copy and optimizer states, this rank's shard
    step_extra: int  # what the optimizer step adds while it runs (gradient shard, temporaries)


def state_of(sizes: dict, training: Training, shards: int) -> State:
    """Per-rank state bytes for a model of ``sizes`` (trace.state_size) trained over
    ``shards`` = DP x SP ranks."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    numel, trainable = sizes["param_numel"], sizes["trainable_numel"]
    parameters = numel * _size(training.dtype) + sizes["buffer_bytes"]
    shard = math.ceil(trainable / shards) if training.zero else trainable
    per_param = training.states * _size(training.state_dtype)
    if training.master is not None:
        per_param += _size(training.master)
    return State(parameters, shard * per_param, shard * 4 * training.step_temporaries)
