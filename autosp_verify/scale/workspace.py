"""Working memory of the ops that allocate inside themselves: what a graph node does not show.

A graph shows each op's outputs; an op implemented in Python (autosp's custom ops) allocates
more while it runs. Two ways to know how much, both from the code itself:

* **replay** (every ``autosp::`` op except attention): the op's own Python body runs on fake
  tensors of the evaluated shapes and strides, on a fake process group, under a dispatch mode
  that tracks every storage it allocates and frees; the working memory is its peak minus its
  outputs. Exact for the code as it is, whatever it becomes.
* **a model** (``autosp::masked_attention`` and its backward, ``autosp::mask_key_ranges``): their
  bodies branch on the mask's values (data-dependent, cannot run on meta), so the count is
  written out here from reading the code, or replays one block (see ``attention_memory.py``).
  Attention is counted as its blocks even where the mask's rows turn out to be runs at run time and
  torch's fused kernel runs instead, which needs less: an upper bound there.

Every other op is assumed to allocate only its outputs (true of the ATen ops AOTAutograd emits,
up to kernel scratch space, which is not modelled).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from autosp_verify.scale import attention_memory

_MODELLED = {"masked_attention": attention_memory.forward_workspace,
             "masked_attention_backward": attention_memory.backward_workspace,
             "mask_key_ranges": attention_memory.ranges_workspace}


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages the ops under it allocate (inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict = {}

    def ignore(self, values) -> "StorageTracker":
        """Storages that exist already (the inputs): views of them allocate nothing."""
        for t in tree_leaves(values):
            if isinstance(t, torch.Tensor):
                self._sizes.setdefault(t.untyped_storage()._cdata, 0)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage):
        key = storage._cdata
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.live -= self._sizes.pop(key, 0)


def _storage_bytes(values) -> int:
    seen, total = set(), 0
    for t in tree_leaves(values):
        if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in seen:
            seen.add(t.untyped_storage()._cdata)
            total += t.untyped_storage().nbytes()
    return total


@contextlib.contextmanager
def _fake_groups(world_size: int):
    """A fake process group of ``world_size`` ranks for autosp's ops to find by their ranks
    (rank 0); this rank's collective counters are left as they were."""
    from autosp import collectives
    from autosp_verify.scale.trace import fake_world
    with fake_world(world_size):
        counts = collectives.collective_counts().copy()
        try:
            yield
        finally:
            collectives.collective_counts().clear()
            collectives.collective_counts().update(counts)


def replay_peak(op, args: list, world_size: int, mode) -> int:
    """Bytes ``op``'s Python body holds at its peak beyond its outputs, run on ``args``, fake
    CPU tensors of ``mode`` (not meta: collectives check the group's backend takes the device)."""
    with _fake_groups(world_size), mode:
        tracker = StorageTracker().ignore(args)
        with tracker:
            out = op._init_fn(*args)
        extra = tracker.peak - _storage_bytes(out)
        del out
    return max(0, extra)


def _world_size(node, ev) -> int:
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "world_size":
            return int(ev.value(node.args[i] if i < len(node.args) else node.kwargs[arg.name]))
    return ev.world_size


def _replay(node):
    from torch._library.custom_ops import OPDEFS
    op_name = node.target._opname
    op = OPDEFS.get(f"{node.target.namespace}::{op_name}")  # the custom op's definition: its Python body
    if op is None or not hasattr(op, "_init_fn"):
        return None

    def workspace(ev) -> int:
        from torch._subclasses.fake_tensor import FakeTensorMode
        mode = FakeTensorMode()
        with mode:
            args = [ev.value(a, device="cpu") for a in node.args]
        key = ("replay", op_name, ev.key(args))
        if key not in ev.cache:
            ev.cache[key] = replay_peak(op, args, _world_size(node, ev), mode)
        return ev.cache[key]
    return workspace


def workspace_of(node):
    """A callable ``fn(ev) -> bytes`` of the node's working memory beyond its outputs, or None."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "autosp":
        return None
    name = target._opname
    if name in _MODELLED:
        model = _MODELLED[name]
        return lambda ev: model(node, ev)
    return _replay(node)
