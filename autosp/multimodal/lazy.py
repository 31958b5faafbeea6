"""A sharded layer's output that stays this rank's chunk until something reads the whole of it.

``LazyGathered`` is what a wrapped layer returns: a tensor of the full sequence's shape, dtype and
device that holds no data of its own, only this rank's chunk. The next wrapped layer takes the
chunk (no collective: the residual stream stays sharded from layer to layer). Anything else that
touches it (a final norm, a pooler, HF's output recorders read later, ``vision_feature_layer``,
user code: any torch function or tensor method) gets the full value, all-gathered once on first
read (backward: a reduce-scatter), so an unknown reader still sees exactly what one device
computes. Shape, dtype and the like are answered without gathering.
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map_only

from autosp import collectives
from autosp.errors import AutoSPError

_T = torch.Tensor
# Metadata only: answered from the full shape this tensor carries, without gathering.
_METADATA = {_T.size, _T.dim, _T.ndimension, _T.numel, _T.nelement, _T.element_size, _T.is_floating_point,
             _T.is_complex, _T.__len__, _T.__hash__, _T.shape.__get__, _T.ndim.__get__, _T.dtype.__get__,
             _T.device.__get__, _T.requires_grad.__get__, _T.layout.__get__, _T.is_cuda.__get__,
             _T.is_sparse.__get__, _T.is_quantized.__get__, _T.is_meta.__get__, _T.is_nested.__get__}


def gather_full(chunk, seq_dim, layout, group):
    """The whole sequence from every rank's chunk (a planted bug replaces this in the tests)."""
    return collectives.gather_chunks(chunk, seq_dim, layout, group)


class LazyGathered(torch.Tensor):
    """The full-sequence value of a layer output of which this rank holds ``chunk`` (see module doc)."""

    @staticmethod
    def __new__(cls, chunk: torch.Tensor, seq_dim: int, layout, group):
        shape = list(chunk.shape)
        shape[seq_dim] = layout.length
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=chunk.dtype, device=chunk.device,
                                                   requires_grad=chunk.requires_grad)
        self.chunk, self.seq_dim, self.chunk_layout, self.group = chunk, seq_dim, layout, group
        self._full, self._version_at_gather = None, None
        return self

    def full(self) -> torch.Tensor:
        """The gathered value (a plain tensor), gathered on the first call. With grad enabled even
        when the first reader runs under no_grad: a later reader may need its gradient."""
        if self._full is None:
            with torch.enable_grad():
                self._full = gather_full(self.chunk, self.seq_dim, self.chunk_layout, self.group)
            self._version_at_gather = self._full._version
        return self._full

    def local(self, seq_dim: int, layout, group) -> torch.Tensor | None:
        """This rank's chunk for a layer taking the value sharded along ``seq_dim`` with ``layout``
        over ``group``, or None: another layout, or the gathered value (or a view of it) was
        modified in place since, so the chunk no longer holds it."""
        same = seq_dim == self.seq_dim and layout == self.chunk_layout and group is self.group
        if not same or (self._full is not None and self._full._version != self._version_at_gather):
            return None
        return self.chunk

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        args, kwargs = tree_map_only(LazyGathered, LazyGathered.full, (args, kwargs))
        return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # only reached by code that bypasses torch functions (none known): say so rather than read no data
        raise AutoSPError(f"{func} reached a lazily gathered layer output below torch's function layer; "
                          "call .full() on it first (autosp.multimodal.lazy.LazyGathered)")

