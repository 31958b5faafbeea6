"""Saved tensors: what the autograd graph of a loss holds for the backward, the single-device
baseline run the way the ranks run, and which tensors are sequence-long (see the package doc)."""
from __future__ import annotations

import copy

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from autosp_verify.core import lifted_recompile_limit
from autosp_verify.outputs import split_output


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


class _Recomputing(Exception):
    """An op ran while a saved tensor was read: the read recomputes a checkpointed region."""


class _NoRecompute(TorchDispatchMode):
    """Active while the walk reads saved tensors. A tensor that torch.utils.checkpoint holds is not
    in memory: reading it runs the checkpointed forward again (its collectives included, outside
    any backward), under saved-tensor hooks of the recompute's own. An op dispatched under hooks
    other than the walk's is that recompute: it is stopped before it runs, and the tensor is not
    counted (the checkpoint's inputs, which it does hold, are)."""

    def __init__(self):
        super().__init__()
        self.hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch._C._autograd._top_saved_tensors_default_hooks(True) != self.hooks:
            raise _Recomputing(str(func))
        return func(*args, **(kwargs or {}))


def _node_tensors(node) -> list:
    found = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                value = getattr(node, attr)
            except (RuntimeError, _Recomputing):  # already freed (a backward ran); held by a checkpoint
                value = None
            values = value if isinstance(value, (tuple, list)) else (value,)
            found += [v for v in values if isinstance(v, torch.Tensor)]
    try:
        found += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    except (AttributeError, RuntimeError, _Recomputing):  # builtin nodes have none; or already freed
        pass
    return found


def saved_activations(loss, exclude: set = frozenset()) -> tuple[list, bool]:
    """([(shape, bytes)] of the storages the graph of ``loss`` saves for the backward, in a fixed
    walk order, storages in ``exclude`` left out; whether an AOTAutograd node was met)."""
    seen, out, visited, compiled = set(), [], set(), False
    stack = [loss.grad_fn]
    with _NoRecompute():  # the reads in _node_tensors
        while stack:
            node = stack.pop()
            if node is None or node in visited:
                continue
            visited.add(node)
            compiled |= type(node).__name__ == "CompiledFunctionBackward"
            for t in _node_tensors(node):
                storage = t.untyped_storage()
                if storage.data_ptr() in exclude or storage.data_ptr() in seen:
                    continue
                seen.add(storage.data_ptr())
                out.append((tuple(t.shape), storage.nbytes()))
            stack += [n for n, _ in reversed(node.next_functions)]
    return out, compiled


def _mark_sequence(batch: dict, seq_len: int) -> dict:
    """New aliases of the batch with the sequence dim (dim 1 of size seq_len) dynamic, as autosp
    marks it, and every other dim static."""
    from autosp import prepare_inputs
    if seq_len < 2:
        return batch  # a length-1 dim is never symbolic (prepare_inputs refuses it)
    return {key: prepare_inputs(t)[0] if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == seq_len
            else t for key, t in batch.items()}


def baseline_saved(base, batch: dict, seq_len: int, seed: int, backend: str | None) -> list:
    """The single-device saved tensors: ``base`` eager (backend None) or compiled with ``backend``."""
    model = copy.deepcopy(base)
    exclude = _storages([*model.parameters(), *model.buffers(), *batch.values()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backend is None:
            loss, _ = split_output(model(**batch))
        else:
            from autosp.api import hf_warnings_ignored
            with lifted_recompile_limit(), hf_warnings_ignored():  # as autosp.compile traces
                compiled = torch.compile(model, backend=backend, fullgraph=True)
                loss, _ = split_output(compiled(**_mark_sequence(batch, seq_len)))
    return saved_activations(loss, exclude)[0]


def classify(at_s: list, at_s2: list) -> dict | None:
    """Bytes at S by how many dims change when the sequence grows (the same walk at S and S2)."""
    if len(at_s) != len(at_s2) or any(len(a) != len(b) for (a, _), (b, _) in zip(at_s, at_s2)):
        return None
    sums = {"seq": 0, "seq2": 0, "other": 0, "total": 0}
    for (shape, nbytes), (shape2, _) in zip(at_s, at_s2):
        changed = sum(a != b for a, b in zip(shape, shape2))
        sums["seq" if changed == 1 else "seq2" if changed >= 2 else "other"] += nbytes
        sums["total"] += nbytes
    return sums
