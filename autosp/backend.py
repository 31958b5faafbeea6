"""The "autosp" torch.compile backend: Dynamo graph -> passes -> inner backend.

``torch.compile(model, backend="autosp")`` uses the world group and the defaults of SPConfig
(the sequence inputs must be marked with ``autosp.prepare_inputs``); ``autosp.compile`` builds a
backend for its own config. Nothing here runs a collective: compiling never waits on other ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from autosp import collectives
from autosp.checkpointing import selective_backend
from autosp.config import SPConfig
from autosp.errors import AutoSPError
from autosp.local_symbol import own_symbol
from autosp.passes.registry import run_passes


def _inner_backend(backend):
    return torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend


_BACKENDS: dict = {}


def backend_for(config: SPConfig, world_size: int | None = None, group_key: str = collectives.WORLD):
    """The backend for this config and group, made once: Dynamo reuses a compiled graph only with
    the same backend object, and then across ranks, threads and model instances of the same
    architecture. The group (its key: its ranks) is part of the key because the graph names it."""
    key = (config.seq_dim, config.padding, config.backend, config.passes, config.debug,
           config.checkpointing, config.checkpoint_min_bytes, config.attention_block_elements, config.ulysses,
           config.attention_output, config.attention_kernel, world_size, group_key)
    if key not in _BACKENDS:
        _BACKENDS[key] = make_backend(config, group_key)
    return _BACKENDS[key]


def make_backend(config: SPConfig, group_key: str = collectives.WORLD):
    def autosp_backend(gm: torch.fx.GraphModule, example_inputs):
        group = collectives.resolve_group(group_key)
        ctx = run_passes(gm, world_size=dist.get_world_size(group), group=group_key,
                         seq_dim=config.seq_dim, pipeline=config.passes, debug=config.debug,
                         block_elements=config.attention_block_elements, ulysses=config.ulysses,
                         attention_output=config.attention_output, attention_kernel=config.attention_kernel)
        to_compile, example_inputs, own = own_symbol(ctx, example_inputs)
        if config.checkpointing == "selective":
            symbols = {ctx.seq.symbol} | ({own.symbol} if own is not None else set())
            inner = selective_backend(config.backend, symbols, config.checkpoint_min_bytes)
        else:
            inner = _inner_backend(config.backend)
        compiled = inner(to_compile, example_inputs)
        if own is not None:
            own.rewrite_guards()
        return _runner(compiled, ctx, group_key, local_input=own is not None)
    return autosp_backend


def _runner(compiled, ctx, group_key, local_input: bool = False):
    """Wrap the compiled graph: check the group still has the size the graph was made for, pass
    the local length ceil(S/P) as the last input where the graph takes it (local_symbol.py), and
    return sharded outputs without their padding."""
    placeholders = [n for n in ctx.gm.graph.nodes if n.op == "placeholder"]
    seq_index = placeholders.index(ctx.seq.node)
    symbol, world_size, layouts = ctx.seq.symbol, ctx.world_size, dict(ctx.output_layouts)

    def run(*args):
        size = dist.get_world_size(collectives.resolve_group(group_key))
        if size != world_size:
            raise AutoSPError(f"this graph was compiled for {world_size} ranks but the group has "
                              f"{size}: compile once per group size")
        full_len = int(args[seq_index])
        local_len = -(-full_len // world_size)
        outs = list(compiled(*args, local_len) if local_input else compiled(*args))  # Dynamo calls backends unboxed
        if not layouts:
            return outs
        for i, lay in layouts.items():
            length = int(lay.length.subs(symbol, full_len))
            outs[i] = collectives.strip_padding(outs[i], lay.dim, lay.inner, length, local_len, group_key)
        return outs

    return run


autosp_backend = make_backend(SPConfig(backend="inductor"))  # the "autosp" entry point
