"""torch.utils.checkpoint regions (HF's activation checkpointing): inlined first, tagged last.

Dynamo compiles a checkpointed region (``torch.utils.checkpoint.checkpoint``, as every HF layer
calls it after ``model.activation_checkpointing_enable()``) into one
``tag_activation_checkpoint`` node whose body is a subgraph the other passes would not enter.
``inline_checkpoints`` copies each body into the graph in its place, marking the copies with the
region, so the layout analysis and the rewrites see the region's ops like any others.
``tag_checkpoints`` then does what AOTAutograd does with a region it traces: the region's nodes
carry torch's selective-checkpoint tags (``PREFER_RECOMPUTE`` with the region's
``ac_graph_id``), which AOTAutograd copies onto the ops it traces from them and the min-cut
partitioner honours, so the backward recomputes them. The nodes the passes added from a region's
values (its all-to-alls, the attention) join it: the backward runs the region's collectives again,
as checkpointing under DeepSpeed's or Megatron's sequence parallelism does (saving their outputs
would keep ~4/P of the layer's width per position, where the region keeps its input's 1/P).

A region with a policy of its own (``context_fn``: selective checkpointing) is refused; use
``SPConfig(checkpointing="selective")``.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
from torch.utils.checkpoint import CheckpointPolicy

from autosp.errors import AutoSPError
from autosp.passes.context import PassContext
from autosp.passes.layout import VALUE_OF, source_line

CHECKPOINT = getattr(torch.ops.higher_order, "tag_activation_checkpoint", None)
REGION = "autosp_checkpoint_region"  # node meta: the region (its number) a node was inlined from
TRACED = "autosp_traced"  # node meta: a node Dynamo made (not one the passes added), where regions exist


def inline_checkpoints(ctx: PassContext) -> None:
    g = ctx.graph
    checkpoints = [n for n in g.nodes if n.target is CHECKPOINT]
    for node in g.nodes if checkpoints else ():
        node.meta[TRACED] = True
    for region, node in enumerate(checkpoints):
        body_node, *operands = node.args
        body = getattr(ctx.gm, body_node.target)
        if body.meta.get("_checkpoint_context_fn") is not None:  # where Dynamo keeps it
            raise AutoSPError(f"{node.name}: a torch.utils.checkpoint region with a context_fn (a selective "
                              "checkpoint policy of its own) is not supported; checkpoint without one, or use "
                              f"SPConfig(checkpointing='selective')\n  at {source_line(node)}")
        if any(n.target is CHECKPOINT for n in body.graph.nodes):
            raise AutoSPError(f"{node.name}: a torch.utils.checkpoint region inside another is not supported"
                              f"\n  at {source_line(node)}")
        env = dict(zip([n for n in body.graph.nodes if n.op == "placeholder"], operands))
        with g.inserting_before(node):
            for inner in body.graph.nodes:
                if inner.op == "output":
                    results = fx.map_arg(inner.args[0], env.__getitem__)
                elif inner.op != "placeholder":
                    copy = g.node_copy(inner, env.__getitem__)
                    copy.meta[REGION], copy.meta[TRACED] = region, True
                    copy.meta.setdefault(VALUE_OF, copy.name)
                    env[inner] = copy
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise AutoSPError(f"{node.name}: a checkpoint region's output read other than by item "
                                  f"({user.format_node()})")
            user.replace_all_uses_with(results[user.args[1]])
            g.erase_node(user)
        g.erase_node(node)
        if not body_node.users:
            g.erase_node(body_node)
            delattr(ctx.gm, body_node.target)
        ctx.counters["checkpoint_regions"] += 1


def tag_checkpoints(ctx: PassContext) -> None:
    if not ctx.counters["checkpoint_regions"]:
        return
    for node in ctx.graph.nodes:  # in order: a node the passes added takes its inputs' region
        if REGION not in node.meta and not node.meta.get(TRACED) and node.op == "call_function":
            regions = {i.meta.get(REGION) for i in node.all_input_nodes} - {None}
            if len(regions) == 1:
                node.meta[REGION] = regions.pop()
        if REGION in node.meta and node.op in ("call_function", "call_method"):
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            node.meta["ac_graph_id"] = node.meta[REGION]
            ctx.counters["checkpoint_recompute"] += 1
