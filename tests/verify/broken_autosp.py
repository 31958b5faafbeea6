"""Deliberately broken autosp pipelines: the op-level negative controls of the first divergence.

Each is an impl built with ``autosp_verify.impls.autosp_impl`` (so the verifier records the
rewritten graph op by op) whose pipeline drops or corrupts one rewrite, the way a bug in a pass
would. Loaded by path: the broken passes register themselves on import.
"""


import operator

from autosp.passes.attention import A2S, GATHER_KV, H2S, MASKED, S2H
from autosp.passes.layout import example_value
from autosp.passes.registry import DEFAULT_PIPELINE, PASSES
from autosp_verify.impls import autosp_impl


def _detach_attention_inputs(ctx):
    """The bug: the all-to-all before attention without autograd (its input detached)."""
    for node in list(ctx.graph.nodes):
        if node.target is S2H:
            with ctx.graph.inserting_before(node):
                node.replace_input_with(node.args[0], ctx.graph.call_method("detach", (node.args[0],)))


def _all_to_all_on_head_size(ctx):
    """The bug: the all-to-alls split and gather the head size (last dim) instead of the heads."""
    for node in list(ctx.graph.nodes):
        if node.target is S2H:
            x, seq_dim, _, group, world = node.args
            node.args = (x, seq_dim, example_value(x).dim() - 1, group, world)
        elif node.target is H2S:
            x, seq_dim, _, _, group, world = node.args
            query = example_value(x.args[0].args[0])  # attention(seq_to_head(q), ...): q as traced
            node.args = (x, seq_dim, query.dim() - 1, int(query.shape[-1]), group, world)


def _rows_from_zero(ctx):
    """The bug (past the head count): the blockwise attention told nothing of where this rank's
    queries start, so every block's queries are masked as if they were the first positions."""
    for node in list(ctx.graph.nodes):
        if node.target is MASKED and node.args[9]:
            node.args = node.args[:9] + ("", 0) + node.args[11:]


def _kv_gather_without_grad(ctx):
    """The bug (past the head count): keys and values gathered without autograd, so no gradient
    flows back to the other blocks' keys and values."""
    for node in list(ctx.graph.nodes):
        if node.target is GATHER_KV:
            with ctx.graph.inserting_before(node):
                node.replace_input_with(node.args[0], ctx.graph.call_method("detach", (node.args[0],)))


def _delta_halved(ctx):
    """The bug (attention output held once): the all-to-all after attention hands back half of
    rowsum(dO * O), so the attention's backward subtracts the wrong softmax term."""
    for node in list(ctx.graph.nodes):
        if node.target is A2S:
            with ctx.graph.inserting_before(node):
                node.replace_input_with(node.args[1], ctx.graph.call_function(operator.mul, (node.args[1], 0.5)))


PASSES["broken_delta_halved"] = _delta_halved
PASSES["broken_detach_a2a"] = _detach_attention_inputs
PASSES["broken_rows_from_zero"] = _rows_from_zero
PASSES["broken_kv_gather_grad"] = _kv_gather_without_grad
PASSES["broken_a2a_dims"] = _all_to_all_on_head_size


def _pipeline(extra=None, drop=None):
    return tuple(p for p in DEFAULT_PIPELINE if p != drop) + ((extra,) if extra else ())


per_rank_loss = autosp_impl("eager", passes=_pipeline(drop="loss"))  # the loss stays each rank's own mean
detached_all_to_all = autosp_impl("eager", passes=_pipeline(extra="broken_detach_a2a"))
head_size_all_to_all = autosp_impl("eager", passes=_pipeline(extra="broken_a2a_dims"))
rows_from_zero = autosp_impl("eager", passes=_pipeline(extra="broken_rows_from_zero"))
kv_gather_without_grad = autosp_impl("eager", passes=_pipeline(extra="broken_kv_gather_grad"))
delta_halved = autosp_impl("eager", passes=_pipeline(extra="broken_delta_halved"))
correct = autosp_impl("eager")
