"""Sequence-aware selective activation checkpointing (SPConfig(checkpointing="selective")):
exact through the verifier, fewer bytes saved for the backward per rank (the accounting's
memory probe), attention outputs still saved, collectives never run twice, nothing global
patched. Negative controls: a threshold above every activation recomputes nothing; a policy
that recomputes the all-to-alls is seen in the collective count."""
import copy
import importlib.util
import os

import pytest
import torch
import torch._functorch.partitioners as partitioners
import torch._inductor.config
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.backends.debugging import boxed_nop
from torch.utils.checkpoint import CheckpointPolicy

import autosp
from autosp import checkpointing
from autosp_verify import verify_file
from autosp_verify.accounting import saved_activations
from autosp_verify.impls import autosp_impl
from autosp_verify.simulators import get_simulator

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")
SELECTIVE = {"checkpointing": "selective"}


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fixture_ckpt_{name}", os.path.join(FIXTURES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,world_size,seq_len", [pytest.param("hf_llama", 4, 13, marks=pytest.mark.slow),
                                                     ("llama_style", 2, 13),
                                                     ("llama_style", 4, 16)])
def test_selective_checkpointing_is_exact(name, world_size, seq_len):
    result = verify_file(os.path.join(FIXTURES, f"{name}.py"), impl=autosp_impl("aot_eager", **SELECTIVE),
                         world_size=world_size, seq_len=seq_len, dtype=torch.float64)
    assert result.status == "pass", (result.error, result.failures)
    measured = result.accounting["collectives"]["measured"]
    minimum = result.accounting["collectives"]["minimum"]
    assert (measured["all_to_all"], measured["all_reduce"]) == (minimum["all_to_all"], minimum["all_reduce"])


def _step(ctx, payload):
    """Per rank: bytes the autograd graph saves after the forward (the accounting's walk,
    parameters and inputs left out) and the collectives of forward + backward."""
    model, batch = copy.deepcopy(payload["model"]), payload["batch"]
    step = autosp.compile(model, config=autosp.SPConfig(group=ctx.group, **payload["config"]))
    autosp.reset_collective_counts()
    loss = step(**batch).loss
    exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *batch.values()]}
    saved = sum(b for _, b in saved_activations(loss, exclude)[0])
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return saved, dict(autosp.collective_counts())


def _measure(world_size, seq_len, **config):
    fixture = _load("hf_llama")
    torch.manual_seed(0)
    model = fixture.model_fn().double()
    batch = fixture.inputs_fn(2, seq_len, torch.Generator().manual_seed(0))
    checkpointing.LAST_PARTITIONS.clear()
    autosp.compile(copy.deepcopy(model), config=autosp.SPConfig(**config)).warm_up(world_size, **batch)
    partitions = list(checkpointing.LAST_PARTITIONS)
    ranks = get_simulator("threaded").run(world_size, _step, {"model": model, "batch": batch, "config": config}, 120)
    return ranks, partitions


def test_selective_checkpointing_saves_less_and_keeps_attention_outputs():
    before = dict(vars(partitioners))
    plain, _ = _measure(2, 16, backend="aot_eager")
    selective, partitions = _measure(2, 16, backend="aot_eager", **SELECTIVE)
    assert dict(vars(partitioners)) == before  # nothing global patched
    assert torch._inductor.config.custom_partitioner_fn is None
    layers = 2
    for (saved0, counts0), (saved1, counts1) in zip(plain, selective):
        assert saved1 < 0.6 * saved0, (saved0, saved1)
        assert counts1 == counts0 and counts1["all_to_all"] == 8 * layers  # no collective run twice
    (record,) = partitions
    assert record["recompute"] > 0
    # the attention outputs (SDPA's output and the all-to-all back to the sequence) are saved
    assert sum(attn for _, attn in record["saved"]) >= 2 * layers
    assert sum("head_to_seq" in op for op, _ in record["saved"]) == layers

    # Negative control: a threshold above every activation recomputes nothing and saves what
    # the plain partitioner saves.
    none, partitions = _measure(2, 16, backend="aot_eager", checkpoint_min_bytes=1 << 40, **SELECTIVE)
    assert partitions[0]["recompute"] == 0
    assert [s for s, _ in none] == [s for s, _ in plain]


def test_the_accounting_shows_the_memory_effect():
    result = verify_file(os.path.join(FIXTURES, "hf_llama.py"), impl=autosp_impl("aot_eager", **SELECTIVE),
                         world_size=2, seq_len=16, dtype=torch.float64, memory=True)
    assert result.status == "pass", (result.error, result.failures)
    memory = result.accounting["memory"]
    # Sequence-long bytes per rank over one device's: plain Ulysses is at best 1/P (0.54 for
    # this case: padding-free, but some [S, S]-free FULL values stay whole); selective below it.
    assert memory["ratio"] is not None and memory["ratio"] < 1 / 2


def _recompute_collectives(joint, inputs, *, num_fwd_outputs, **kwargs):
    """A wrong policy: the all-to-alls before attention tagged for recomputation."""
    checkpointing.tag_joint_graph(joint, num_fwd_outputs, None, 0)
    for node in joint.graph.nodes:
        if "seq_to_head" in str(node.target):
            node.meta["recompute"] = CheckpointPolicy.PREFER_RECOMPUTE
    return partitioners.min_cut_rematerialization_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)


def test_a_policy_that_recomputes_collectives_is_seen_in_the_count():
    """Negative control: the count is measured; recomputing seq_to_head runs it again in the
    backward, which is why the selective policy saves every collective's output."""
    wrong = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=_recompute_collectives,
                         keep_inference_input_mutations=True)
    ranks, _ = _measure(2, 16, backend=wrong)
    assert all(counts["all_to_all"] > 16 for _, counts in ranks)


def test_checkpointing_config_is_validated():
    with pytest.raises(autosp.AutoSPError, match="checkpointing must be one of"):
        autosp.SPConfig(checkpointing="full")
    with pytest.raises(autosp.AutoSPError, match="AOTAutograd backend"):
        autosp.SPConfig(backend="eager", checkpointing="selective")
    with pytest.raises(autosp.AutoSPError, match="checkpoint_min_bytes"):
        autosp.SPConfig(checkpointing="selective", checkpoint_min_bytes=-1)
    assert autosp.SPConfig(checkpointing="selective").checkpoint_min_bytes == 0


CHECKPOINTED_LLAMA = os.path.join(os.path.dirname(__file__), "checkpointed_llama.py")


def _hf_checkpointed(world_size, seq_len):
    """(the checkpointed model's run, regions compiled, all-to-alls, their minimum, memory ratio and
    its ideal: a rank's saved bytes over one device's, that device checkpointing as HF does)."""
    from autosp.passes.registry import COUNTERS
    torch._dynamo.reset()
    before = COUNTERS["checkpoint_regions"]
    run = verify_file(CHECKPOINTED_LLAMA, impl="autosp", world_size=world_size, seq_len=seq_len, memory=True,
                      steps=1)
    assert run.status == "pass", (run.error, run.failures[:3])
    coll, memory = run.accounting["collectives"], run.accounting["memory"]
    return (COUNTERS["checkpoint_regions"] - before, coll["measured"]["all_to_all"], coll["minimum"]["all_to_all"],
            memory["ratio"], memory["ideal_padded"])


@pytest.mark.parametrize("world_size,seq_len", [pytest.param(2, 16, marks=pytest.mark.slow), (4, 13)])
def test_hf_activation_checkpointing_is_exact_and_recomputes_each_layer(world_size, seq_len):
    """HF's activation_checkpointing_enable(): each layer's torch.utils.checkpoint region is inlined
    and tagged, so the backward recomputes it, its all-to-alls included (as DeepSpeed's and
    Megatron's recompute does): exact, a rank saves 1/P of what one device checkpointing the same
    way saves, and 4 more all-to-alls per layer (q, k, v and the output, again)."""
    from tests.compiler.checkpointed_llama import LAYERS
    regions, a2a, minimum, ratio, ideal = _hf_checkpointed(world_size, seq_len)
    assert regions == LAYERS
    assert a2a == minimum + 4 * LAYERS, (a2a, minimum)
    assert ratio <= 1.1 * ideal, (ratio, ideal)


def test_checkpoint_regions_not_tagged_keep_every_activation(monkeypatch):
    """Negative control: regions inlined but not tagged: exact, but nothing is recomputed, and a
    rank saves more than one device that checkpoints."""
    from autosp.passes import registry
    monkeypatch.setitem(registry.PASSES, "tag_checkpoints", lambda ctx: None)
    _, a2a, minimum, ratio, _ = _hf_checkpointed(4, 13)
    assert a2a == minimum and ratio > 1, (a2a, minimum, ratio)
