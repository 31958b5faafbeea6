"""Only the Ulysses minimum is communicated: per attention layer, forward one all-to-all each for
q, k, v and the output, backward the matching four; plus one all-reduce for the loss. Counted at
run time per rank (each rank thread has its own counter) on the HF fixtures."""
import copy
import importlib.util
import os

import pytest
import torch

import autosp
from autosp_verify.simulators import get_simulator

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"fixture_{name}", os.path.join(FIXTURES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count(ctx, payload):
    model, batch = copy.deepcopy(payload["model"]), payload["batch"]
    step = autosp.compile(model, group=ctx.group, backend="aot_eager")
    autosp.reset_collective_counts()
    loss = step(**batch).loss
    forward = dict(autosp.collective_counts())
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    total = dict(autosp.collective_counts())
    return forward, total


def _run(fixture, world_size, seq_len):
    torch.manual_seed(0)
    model = fixture.model_fn()
    batch = fixture.inputs_fn(2, seq_len, torch.Generator().manual_seed(0))
    autosp.compile(copy.deepcopy(model), backend="aot_eager").warm_up(world_size, **batch)
    return get_simulator("threaded").run(world_size, _count, {"model": model, "batch": batch}, 120)


@pytest.mark.parametrize("name", ["hf_llama", "hf_qwen2", "hf_mistral"])
@pytest.mark.parametrize("world_size,seq_len", [pytest.param(2, 16, marks=pytest.mark.slow), (4, 13)])
def test_collectives_are_the_ulysses_minimum(name, world_size, seq_len):
    fixture = _load(name)
    layers = fixture.model_fn().config.num_hidden_layers
    for forward, total in _run(fixture, world_size, seq_len):
        assert (forward["all_to_all"], forward["all_reduce"]) == (4 * layers, 1)
        assert (total["all_to_all"], total["all_reduce"]) == (8 * layers, 1)


WITHOUT_LOSS_PASS = autosp.SPConfig(backend="aot_eager", passes=(
    "layout", "shard_inputs", "local_sizes", "attention", "outputs"))


def _count_without_loss_pass(ctx, payload):
    model = copy.deepcopy(payload["model"])
    step = autosp.compile(model, config=autosp.SPConfig(**{**vars(WITHOUT_LOSS_PASS), "group": ctx.group}))
    autosp.reset_collective_counts()
    step(**payload["batch"])
    return dict(autosp.collective_counts())


def test_a_rewrite_without_the_loss_pass_is_seen_in_the_count():
    """Negative control: the count is measured, not assumed. Without the loss pass each rank
    returns the mean over its own shard (DeepSpeed's behaviour) and no all-reduce runs."""
    fixture = _load("hf_llama")
    torch.manual_seed(0)
    model, batch = fixture.model_fn(), fixture.inputs_fn(2, 8, torch.Generator().manual_seed(0))
    counts = get_simulator("threaded").run(2, _count_without_loss_pass, {"model": model, "batch": batch}, 120)
    assert all(c.get("all_reduce", 0) == 0 and c["all_to_all"] == 8 for c in counts)


def _bytes(result):
    c = result.accounting["collectives"]
    return c["measured"]["bytes_handed"], c["minimum"]["bytes_handed"]


@pytest.mark.parametrize("name, world_size", [
    ("hf_qwen2", 2), pytest.param("hf_olmo2_padded", 2, marks=pytest.mark.slow), ("hf_qwen3_packed", 2),
    ("hf_qwen2", 8),
    pytest.param("hf_olmo2_padded", 8, marks=pytest.mark.slow), pytest.param("hf_qwen3_packed", 8, marks=pytest.mark.slow)])
def test_repeated_kv_heads_move_before_they_are_repeated(name, world_size):
    """HF repeats kv heads (repeat_kv) before SDPA whenever a mask is passed (always under
    torch.compile); the pass moves the distinct heads and lets attention group the query heads:
    the Ulysses minimum in bytes, exact."""
    from autosp_verify import verify_file
    result = verify_file(os.path.join(FIXTURES, f"{name}.py"), impl="autosp", world_size=world_size, seq_len=13,
                         steps=1)
    assert result.passed, (result.status, result.error, result.failures[:3])
    measured, minimum = _bytes(result)
    assert measured == minimum, (measured, minimum)


def test_a_tiled_kv_repeat_is_not_taken_for_grouped_heads():
    """Negative control: heads tiled (h0 h1 h0 h1) are not grouped query heads (h0 h0 h1 h1):
    moved as they are (4 heads), and exact; the grouped form of the same model moves 2."""
    from autosp_verify import verify
    from . import kv_repeat_models as m
    tiled = verify(m.tiled, m.inputs_fn, impl="autosp", world_size=2, seq_len=13, steps=1)
    grouped = verify(m.grouped, m.inputs_fn, impl="autosp", world_size=2, seq_len=13, steps=1)
    assert tiled.passed and grouped.passed, (tiled.error, tiled.failures[:3], grouped.error, grouped.failures[:3])
    assert _bytes(tiled)[0] > _bytes(grouped)[0] == _bytes(grouped)[1]
