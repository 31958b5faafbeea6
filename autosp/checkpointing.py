"""Sequence-aware selective activation checkpointing (``SPConfig(checkpointing="selective")``).

The inner backend is AOTAutograd with our own ``partition_fn``: before torch's min-cut
partitioner splits the joint forward+backward graph, every forward node is tagged with one of
torch's selective-checkpoint policies (``node.meta["recompute"]``, the tags
``torch.utils.checkpoint`` itself leaves and ``min_cut_rematerialization_partition`` honours):

* attention outputs (the ATen scaled-dot-product-attention ops, ``autosp::masked_attention``,
  ``autosp::cpu_flash_attention``, their tuple items, and the ``autosp::head_to_seq`` /
  ``autosp::attention_to_seq`` all-to-all after them): ``MUST_SAVE``;
* every ``autosp::*`` op (the all-to-alls, the loss's group sum, the shards): ``MUST_SAVE``, a
  collective is never run twice (recomputing an all-to-all costs a second exchange);
* random ops: left to the partitioner (never forced into a recomputation);
* every other forward value that carries the sequence (a dim whose size contains the sequence
  symbol: the full length or the local chunk) of at least ``min_bytes`` bytes (sizes read with
  the symbol at its hint), except the forward's own outputs: ``PREFER_RECOMPUTE``.

Nothing global is patched: the tags live on this graph's nodes, the partition function is passed
to this backend's ``aot_autograd`` only.
"""
from __future__ import annotations

import operator

import torch
from torch.utils.checkpoint import CheckpointPolicy

from autosp import flash_attention, masked_attention  # noqa: F401  (registers their autosp:: ops)
from autosp.errors import AutoSPError

CHECKPOINTING = (None, "selective")
SELECTIVE_BACKENDS = ("aot_eager", "inductor")

_aten = torch.ops.aten
ATTENTION_OPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_attention_math.default,
    _aten.scaled_dot_product_attention.default,
    torch.ops.autosp.masked_attention.default,
    torch.ops.autosp.cpu_flash_attention.default,
}
ATTENTION_OUTPUT_OPS = ("autosp::head_to_seq", "autosp::attention_to_seq")


def _is_autosp(node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "autosp"


def _op_name(node) -> str:
    target = node.target
    return f"{target.namespace}::{target._opname}" if isinstance(target, torch._ops.OpOverload) else ""


def _hint(size) -> int:
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.hint is not None else 0
    return int(size)


def _seq_bytes(val, symbols) -> int | None:
    """Bytes of ``val`` when one of its dims carries the sequence (its size has one of ``symbols``:
    S, and the local length's own symbol, see autosp/local_symbol.py; None: any), else None."""
    if not isinstance(val, torch.Tensor):
        return None
    carries = any(isinstance(s, torch.SymInt) and (symbols is None or symbols & s.node.expr.free_symbols)
                  for s in val.shape)
    if not carries:
        return None
    numel = 1
    for s in val.shape:
        numel *= _hint(s)
    return numel * val.element_size()


def _forward_nodes(graph, num_fwd_outputs: int) -> tuple[set, set]:
    """The joint graph's forward nodes (none reads a tangent) and the forward's outputs."""
    backward = set()
    for node in graph.nodes:
        if (node.op == "placeholder" and node.name.startswith("tangents")) or \
                any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    outputs = {a for a in out.args[0][:num_fwd_outputs] if isinstance(a, torch.fx.Node)}
    return {n for n in graph.nodes if n.op == "call_function" and n not in backward}, outputs


_ALIASES = {_aten.detach.default, _aten.alias.default}


def tag_joint_graph(gm: torch.fx.GraphModule, num_fwd_outputs: int, symbols, min_bytes: int) -> dict:
    """Tag the forward nodes of a joint graph (see the module docstring); returns counts."""
    forward, outputs = _forward_nodes(gm.graph, num_fwd_outputs)
    counts = {"must_save": 0, "recompute": 0}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node not in forward:
            continue
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            parent = node.args[0]
            if parent.target in ATTENTION_OPS or _is_autosp(parent):
                node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                node.meta["autosp_attention_output"] = parent.target in ATTENTION_OPS and node.args[1] == 0
                counts["must_save"] += 1
                continue
        if node.target in ATTENTION_OPS or _is_autosp(node):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            node.meta["autosp_attention_output"] = (node.target in ATTENTION_OPS
                                                    or _op_name(node) in ATTENTION_OUTPUT_OPS)
            counts["must_save"] += 1
            continue
        if node.target in _ALIASES and node.args[0].meta.get("autosp_attention_output"):
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE  # what the attention backward reads
            node.meta["autosp_attention_output"] = True
            counts["must_save"] += 1
            continue
        if node in outputs or node.meta.get("recompute") is not None:
            continue
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            continue
        nbytes = _seq_bytes(node.meta.get("val"), symbols)
        if nbytes is not None and nbytes >= min_bytes:
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
            counts["recompute"] += 1
    return counts


def selective_partition(symbols, min_bytes: int, record: list | None = None):
    """A ``partition_fn`` for ``aot_autograd``: tag, then torch's min-cut partitioner."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    def partition(joint_module, joint_inputs, *, num_fwd_outputs, **kwargs):
        counts = tag_joint_graph(joint_module, num_fwd_outputs, symbols, min_bytes)
        fw, bw = min_cut_rematerialization_partition(joint_module, joint_inputs,
                                                     num_fwd_outputs=num_fwd_outputs, **kwargs)
        if record is not None:
            record.append({**counts, "saved": _saved_nodes(fw)})
        return fw, bw
    return partition


def _saved_nodes(fw) -> list:
    """(name of the op, whether it is an attention output) for each tensor the forward saves."""
    out = next(n for n in reversed(fw.graph.nodes) if n.op == "output")
    return [(str(a.target), bool(a.meta.get("autosp_attention_output"))) for a in out.args[0]
            if isinstance(a, torch.fx.Node)]


# The tag records of the last compiles (tests read them); bounded.
LAST_PARTITIONS: list = []


def selective_backend(inner: str, symbols, min_bytes: int):
    """The AOTAutograd backend for ``inner`` ("aot_eager" or "inductor") with the selective
    partition function."""
    from torch._dynamo.backends.common import aot_autograd
    del LAST_PARTITIONS[:-16]
    partition = selective_partition(symbols, min_bytes, LAST_PARTITIONS)
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import boxed_nop
        return aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=partition,
                            keep_inference_input_mutations=True)
    if inner == "inductor":
        from torch._inductor.compile_fx import compile_fx

        def inductor(gm, example_inputs):
            # compile_fx's own partition_fn runs Inductor's joint-graph passes and then the
            # partitioner; ours goes in through its scoped config (this compile only).
            return compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": _Partitioner(partition)})
        return inductor
    raise AutoSPError(f"checkpointing='selective' needs an AOTAutograd backend ('aot_eager' or 'inductor'), "
                      f"got {inner!r}")


def _Partitioner(fn):
    """Inductor's ``custom_partitioner_fn`` protocol around a partition function (uuid None:
    Inductor's caches are bypassed for these graphs rather than keyed wrongly)."""
    from torch._inductor.custom_graph_pass import CustomPartitionerFn

    class Partitioner(CustomPartitionerFn):
        def __call__(self, gm, joint_inputs, **kwargs):
            kwargs.pop("compiler", None)
            return fn(gm, joint_inputs, **kwargs)

        def uuid(self):
            return None
    return Partitioner()
