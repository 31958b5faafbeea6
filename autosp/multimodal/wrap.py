"""``auto_wrap_model_for_sp``: shard every attention layer of a model along the sequence, in place.

The unit is the *block* (the transformer layer holding a detected attention module). Its forward
(replaced on the instance: other hooks on the block still see the caller's arguments) takes this
rank's chunk of its hidden states and of every per-position tensor it is given (rotary cos/sin,
position ids; masks stay whole: attention sees the full sequence); the attention inside runs
Ulysses (``ulysses.py``); the block returns a ``LazyGathered`` (``lazy.py``): the chunk, all-gathered
only when something other than the next block reads it. So the residual stream stays sharded from
block to block, and everything outside the blocks (patch and token embeddings, class token,
position tables, masks, feature selection, projector, splicing visual tokens into the text,
pooling, heads, the loss) runs unchanged on the full sequence on every rank: exact by
construction.

The model's outputs are the same on every rank; their gradient counts once (rank 0), so a loss
computed from them by the model or by the caller gives the single-device gradients when the SP
group's gradients are summed (the DeepSpeed/verifier convention). No ``LazyGathered`` leaves the
model: outputs are plain tensors.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from autosp.api import check_sdpa
from autosp.errors import AutoSPError
from autosp import collectives
from autosp.collectives import ChunkLayout
from autosp.multimodal.detect import SPModelInfo, describe_unknown, detect_model_sp_info
from autosp.multimodal.fusion import adapter_for
from autosp.multimodal.lazy import LazyGathered
from autosp.multimodal.ulysses import BlockContext, UlyssesMode

BLOCK_ADAPTERS = {}  # block class name -> fn(kwargs, layout) -> [S] segment ids or None


def register_block_adapter(class_name: str):
    """Decorator: ``fn(kwargs, layout)`` rewrites a block's kwargs in place before it runs sharded
    and returns segment ids for the full sequence ([S] ints: a position attends only to positions
    of its own segment), or None. O(S): attention rebuilds the mask per block of query rows."""
    def register(fn):
        BLOCK_ADAPTERS[class_name] = fn
        return fn
    return register


@register_block_adapter("Qwen2VLVisionBlock")
def _qwen2_vl_vision(kwargs, layout):
    # Its attention splits q/k/v by the images' lengths (cu_seqlens) along the sequence; here the
    # chunk is one piece and each image is a segment (attention stays within an image).
    cu = kwargs.get("cu_seqlens")
    if cu is None:
        return None
    positions = torch.arange(layout.length, device=cu.device)
    image = torch.bucketize(positions, cu[1:].to(positions.dtype), right=True)
    kwargs["cu_seqlens"] = torch.tensor([0, layout.local_len], dtype=cu.dtype, device=cu.device)
    if "max_seqlen" in kwargs:
        kwargs["max_seqlen"] = layout.local_len
    return image


class _SPState:
    """Hooks and per-forward bookkeeping of one wrapped model."""

    def __init__(self, group, info: SPModelInfo):
        self.group, self.info = group, info
        self.handles: list = []
        self.keep_sharded: set = set()     # layers whose output stays a chunk (a fusion adapter's tail)
        self.tail_layout = None            # the layout of that chunk, for the adapter
        self.sharded_outputs: set = set()  # ids of outputs that are chunks or group sums: not counted once

    def __deepcopy__(self, memo):
        # the copy's hooks would still be this state's closures, talking to this model's layers
        raise AutoSPError("a model wrapped by auto_wrap_model_for_sp cannot be deep-copied: unwrap it "
                          "(unwrap_model_for_sp), copy, and wrap each copy")


WHOLE_HINTS = ("mask", "bias")  # attention sees the full sequence: pass these whole
POSITION_HINTS = ("position", "rotary", "rope", "cos", "sin", "freqs")  # one row per position


def _seq_dim_of(value: torch.Tensor, length: int, name: str | None) -> int | None:
    """The dim of a block argument that carries the sequence, or None to pass it whole. The name
    (keyword, or the forward's parameter name for a positional argument; a tuple's elements take
    their parent's) decides where the shape cannot: a rotary table [B, S, head_dim] is shaped like
    an [S, S] mask when the length equals head_dim."""
    hint = (name or "").lower()
    if any(h in hint for h in WHOLE_HINTS):
        return None
    square = value.dim() >= 2 and value.shape[-1] == length and value.shape[-2] == length
    if square and not any(h in hint for h in POSITION_HINTS):
        return None  # [.., S, S] of no per-position name: a mask or bias
    last = value.dim() - 1 if value.is_floating_point() else value.dim()  # a float's last dim is features
    for dim in reversed(range(last)):
        if value.shape[dim] == length:
            return dim
    return None


def _local(value: torch.Tensor, dim: int, layout, group) -> torch.Tensor:
    """This rank's chunk of ``value`` along ``dim``: a previous layer's own chunk when ``value`` is
    its output passed on unchanged (no collective), else cut from the full value."""
    if isinstance(value, LazyGathered):
        chunk = value.local(dim % value.dim(), layout, group)
        if chunk is not None:
            return chunk
        value = value.full()
    return collectives.shard_chunk(value, dim, layout, group)


def _shard_value(value, name, layout, group):
    if isinstance(value, torch.Tensor):
        dim = _seq_dim_of(value, layout.length, name)
        if dim is None:
            return value.full() if isinstance(value, LazyGathered) else value
        return _local(value, dim, layout, group)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(_shard_value(v, name, layout, group) for v in value)
    return value


def _positional_names(forward, count: int) -> list:
    """The forward's parameter names of the ``count`` positional arguments after hidden states."""
    try:
        params = list(inspect.signature(forward).parameters.values())[1:]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (names + [None] * count)[:count]


def _hidden_of(args, kwargs):
    if args and isinstance(args[0], torch.Tensor):
        return args[0], "arg"
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], "kwarg"
    raise AutoSPError("a sharded layer was called without hidden states as its first argument or "
                      "`hidden_states=`")


def _shard_inputs(state: _SPState, block, forward, args, kwargs):
    """(args, kwargs, layout, seq_dim, hidden's ndim) with this rank's chunk of everything per-position."""
    hidden, where = _hidden_of(args, kwargs)
    seq_dim = hidden.dim() - 2
    layout = ChunkLayout.of(hidden.shape[seq_dim], state.group)
    chunk = _local(hidden, seq_dim, layout, state.group)
    kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states" or where != "kwarg"}
    adapter = BLOCK_ADAPTERS.get(type(block).__name__)
    segments = adapter(kwargs, layout) if adapter else None
    kwargs = {k: _shard_value(v, k, layout, state.group) for k, v in kwargs.items()}
    if where == "arg":
        names = _positional_names(forward, len(args) - 1)
        args = (chunk, *(_shard_value(v, n, layout, state.group) for v, n in zip(args[1:], names)))
    else:
        kwargs["hidden_states"] = chunk
    return args, kwargs, layout, segments, seq_dim, hidden.dim()


def _sharded_forward(state: _SPState, name: str, causal: bool, block: nn.Module):
    """The block's forward, run on this rank's chunk. It replaces ``forward`` on the instance rather
    than hooking it, so that other hooks on the block (HF's output recorders read the layer's
    input) see the arguments the caller passed, not the chunk."""
    forward = block.forward

    def sharded(*args, **kwargs):
        args, kwargs, layout, segments, seq_dim, ndim = _shard_inputs(state, block, forward, args, kwargs)
        context = BlockContext(name, layout, state.group, causal_hint=causal, segments=segments,
                               seq_dim=seq_dim, hidden_ndim=ndim)
        with UlyssesMode(context), _recompute_in_mode(block, context):
            output = forward(*args, **kwargs)
        if context.sdpa_calls == 0:
            raise AutoSPError(f"layer {name!r} ran no scaled_dot_product_attention while sharded: its "
                              "attention would see only this rank's positions. Use an SDPA attention "
                              "implementation (HF: attn_implementation='sdpa')")
        if name in state.keep_sharded:
            state.tail_layout = layout
            return output
        chunk = output[0] if isinstance(output, (tuple, list)) else output
        # the chunk stays the value until something other than the next layer reads it
        full = LazyGathered(chunk, seq_dim, layout, state.group)
        return (full, *output[1:]) if isinstance(output, (tuple, list)) else full
    return sharded


@contextlib.contextmanager
def _recompute_in_mode(block: nn.Module, context: BlockContext):
    """A checkpointed HF layer (``GradientCheckpointingLayer``) hands its forward to
    ``block._gradient_checkpointing_func``, whose recompute runs in the backward, outside
    ``UlyssesMode`` (torch's checkpoint re-enters only device contexts): its attention would see
    this rank's chunk alone. While the block runs, the function handed over runs under the mode
    whenever it runs."""
    checkpoint = block.__dict__.get("_gradient_checkpointing_func")
    if checkpoint is None:
        yield
        return

    def checkpoint_in_mode(function, *args, **kwargs):
        return checkpoint(functools.partial(_in_mode, context, function), *args, **kwargs)
    block._gradient_checkpointing_func = checkpoint_in_mode
    try:
        yield
    finally:
        block._gradient_checkpointing_func = checkpoint


def _in_mode(context: BlockContext, function, *args, **kwargs):
    """``function`` under ``UlyssesMode(context)``, entered unless already active (the forward)."""
    active = any(isinstance(m, UlyssesMode) and m.context is context
                 for m in torch.overrides._get_current_function_mode_stack())
    with contextlib.nullcontext() if active else UlyssesMode(context):
        return function(*args, **kwargs)


class _ForwardHandle:
    """Undoes a replaced ``forward`` (the class's method shows through again), like a hook handle."""

    def __init__(self, module: nn.Module, forward):
        self.module = module
        module.forward = forward

    def remove(self):
        self.module.__dict__.pop("forward", None)


def _count_outputs_once(value, state: _SPState):
    if isinstance(value, LazyGathered):  # no lazy value leaves the model: the caller gets plain tensors
        value = value.full()
    if isinstance(value, torch.Tensor):
        if not value.requires_grad or id(value) in state.sharded_outputs:
            return value
        return collectives.count_once(value, state.group)
    if isinstance(value, dict):  # HF ModelOutput too: item assignment updates the attribute
        for key in list(value.keys()):
            value[key] = _count_outputs_once(value[key], state)
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_count_outputs_once(v, state) for v in value)
    return value


def _new_forward(state: _SPState):
    def hook(module, args):
        state.sharded_outputs.clear()
        state.tail_layout = None
    return hook


def auto_wrap_model_for_sp(model: nn.Module, process_group=None, fusion: bool = True) -> nn.Module:
    """Make ``model`` sequence parallel over ``process_group`` (default: the world), in place.

    Every layer holding a detected vision or language attention module gets a forward that shards
    its hidden states along the sequence and runs its attention as Ulysses; parameters, module names
    and the state dict do not change. Returns ``model``. Raises :class:`AutoSPError` when there is
    nothing to wrap, when the model is already wrapped, or when an attention module does not use
    SDPA. Undo with :func:`unwrap_model_for_sp`.

    ``fusion``: for a vision-language architecture with a fusion adapter (``fusion.py``: HF LLaVA,
    Qwen2-VL, InternVL), also keep the language tail sharded: ``logits`` come back as this rank's
    chunk of the sequence and the loss is reduced over the group.
    """
    if getattr(model, "_autosp_sp_state", None) is not None:
        raise AutoSPError(f"{type(model).__name__} is already wrapped for sequence parallelism")
    group = process_group if process_group is not None else dist.group.WORLD
    info = detect_model_sp_info(model)
    if not info.blocks:
        raise AutoSPError(describe_unknown(model))
    check_sdpa(info.vit_attn_modules + info.llm_attn_modules, "AutoSP's module-level wrapping")
    for name, (block, _, _) in info.blocks.items():
        if "forward" in block.__dict__:
            raise AutoSPError(f"layer {name!r} ({type(block).__name__}) has a forward set on the instance; "
                              "AutoSP replaces the forward there and would lose it")
    state = _SPState(group, info)
    for name, (block, side, attention_names) in info.blocks.items():
        causal = any(getattr(model.get_submodule(a), "is_causal", False) for a in attention_names)
        state.handles.append(_ForwardHandle(block, _sharded_forward(state, name, causal, block)))
    state.handles.append(model.register_forward_pre_hook(_new_forward(state), prepend=True))
    state.handles.append(model.register_forward_hook(lambda m, a, out: _count_outputs_once(out, state)))
    model._autosp_sp_state = state
    adapter = adapter_for(model) if fusion else None
    if adapter is not None:
        adapter(model, group)
    return model


def unwrap_model_for_sp(model: nn.Module) -> nn.Module:
    """Remove what :func:`auto_wrap_model_for_sp` added; the model runs on one device again."""
    state = getattr(model, "_autosp_sp_state", None)
    if state is None:
        raise AutoSPError(f"{type(model).__name__} is not wrapped for sequence parallelism")
    for handle in state.handles:
        handle.remove()
    del model._autosp_sp_state
    return model


def sp_info(model: nn.Module) -> SPModelInfo:
    """What a wrapped model's wrapping found (blocks, attention modules, projector)."""
    state = getattr(model, "_autosp_sp_state", None)
    if state is None:
        raise AutoSPError(f"{type(model).__name__} is not wrapped for sequence parallelism")
    return state.info
