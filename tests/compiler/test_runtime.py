"""One runtime, as a GPU runs it: groups found from any thread and never confused, one kv-head
policy for both paths, bad input named.

On CUDA the backward runs on autograd's device threads, not on the thread that ran the forward;
the tests here run it on a new thread in real gloo processes (every verifier simulator does the
same by default: autosp_verify/simulators/base.py ``RankContext.on_other_thread``)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import autosp
from autosp.collectives import kv_repeats
from autosp_verify import verify
from autosp_verify.compare import check_tensor, tolerance_for
from autosp_verify.simulators import get_simulator
from fixtures import hf_llama, llama_style

from . import runtime_ranks


def _case(dtype=torch.float64, seq_len=13, fixture=llama_style):
    torch.manual_seed(0)
    model = fixture.model_fn().to(dtype)
    batch = fixture.inputs_fn(2, seq_len, torch.Generator().manual_seed(0))
    return model, batch


def _reference(model, batch):
    model = copy.deepcopy(model)
    loss = runtime_ranks._loss(model(**batch))
    return torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def _assert_sum_is(reference, per_rank):
    """The ranks' gradients summed equal one device's, within the verifier's table."""
    for i, (ref, *ranks) in enumerate(zip(reference, *per_rank)):
        check = check_tensor(f"grad {i}", sum(ranks), ref, tolerance_for(ref.dtype))
        assert check.passed, check.describe()


@pytest.mark.multiproc
@pytest.mark.parametrize("backend,dtype", [("aot_eager", torch.float64),
                                           pytest.param("inductor", torch.float32, marks=pytest.mark.slow)])
def test_backward_on_another_thread_is_exact_in_real_processes(backend, dtype):
    """Used to fail: the group was registered for the forward's thread only. (Inductor in float32:
    its fused kernels round a float32 loss differently from eager, with or without SP.)"""
    model, batch = _case(dtype, fixture=hf_llama)
    payload = {"model": model, "batch": batch, "backend": backend}
    grads = get_simulator("gloo").run(2, runtime_ranks.backward_elsewhere, payload, 600)
    _assert_sum_is(_reference(model, batch), grads)


@pytest.mark.multiproc
def test_two_models_on_two_groups_never_share_one():
    """Used to be 1.8 relative off, silently: both models' ops looked up one fixed key."""
    model, batch = _case()
    results = get_simulator("gloo").run(4, runtime_ranks.two_models_two_groups, {"model": model, "batch": batch}, 600)
    reference = _reference(model, batch)
    _assert_sum_is(reference, [r["a"] for r in results])
    for pair in ((0, 1), (2, 3)):
        _assert_sum_is(reference, [results[r]["b"] for r in pair])


@pytest.mark.multiproc
def test_a_tensor_the_group_cannot_take_is_named():
    messages = get_simulator("gloo").run(1, runtime_ranks.collective_on_wrong_device, None, 120)
    assert messages == ["autosp::gather_sequence: a () tensor on meta handed to a process group whose backend "
                        "takes tensors on ['cpu', 'cuda'] (rank 0)"]


def test_a_group_that_is_not_a_process_group_is_refused():
    with pytest.raises(autosp.AutoSPError, match="group must be a torch.distributed.ProcessGroup, got str"):
        autosp.compile(nn.Linear(2, 2), group="world")
    with pytest.raises(autosp.AutoSPError, match="must be a torch.distributed.ProcessGroup, got list"):
        autosp.collectives.group_key([0, 1])


@pytest.mark.parametrize("q,kv,P,expect", [
    (8, 8, 4, (1, False)), (8, 2, 2, (1, True)), (8, 2, 4, (2, True)), (8, 1, 8, (8, True)),
    (8, 4, 8, (2, True)), (6, 2, 4, (3, False)), (12, 4, 8, (3, False))])
def test_one_kv_head_policy(q, kv, P, expect):
    assert kv_repeats(q, kv, P, kv != q) == expect


# --- the eager path moves the same kv bytes as the passes ------------------------------------------

class _Attention(nn.Module):
    autosp_attention = "language"

    def __init__(self):
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(16, 16), nn.Linear(16, 8), nn.Linear(16, 16)

    def forward(self, x):
        B, S, _ = x.shape
        q = self.q(x).view(B, S, 8, 2).transpose(1, 2)
        k, v = self.kv(x).view(B, S, 4, 2).transpose(1, 2).chunk(2, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(a.transpose(1, 2).reshape(B, S, 16))


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attention()

    def forward(self, x):
        return x + self.attn(x)


class _GQAModel(nn.Module):
    """8 query heads, 2 kv heads, GQA inside SDPA: both paths see the same attention call."""

    def __init__(self):
        super().__init__()
        self.embed, self.layers, self.head = nn.Embedding(32, 16), nn.ModuleList([_Layer()]), nn.Linear(16, 32)

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        logits = self.head(x)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def _inputs(batch, seq_len, generator):
    ids = torch.randint(0, 32, (batch, seq_len), generator=generator)
    return {"input_ids": ids, "labels": ids}


def _a2a_bytes(ctx, payload):
    """The all-to-all bytes this rank hands over in one training step, and its gradients."""
    from autosp.multimodal import auto_wrap_model_for_sp
    model, batch = copy.deepcopy(payload["model"]), payload["batch"]
    step = autosp.compile(model, group=ctx.group, backend="eager") if payload["path"] == "passes" \
        else auto_wrap_model_for_sp(model, ctx.group)
    autosp.reset_collective_counts()
    loss = step(**batch)["loss"]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return autosp.collective_counts()["all_to_all_bytes"], grads


def test_the_eager_path_moves_the_kv_heads_the_passes_move():
    """2 kv heads, 8 query heads, P = 4: each rank needs one kv head; both paths send 4 (the eager
    path used to repeat them to 8), and both are exact."""
    torch.manual_seed(0)
    model = _GQAModel().double()
    batch = _inputs(2, 16, torch.Generator().manual_seed(0))
    one = copy.deepcopy(model)
    reference = torch.autograd.grad(one(**batch)["loss"], list(one.parameters()))
    sent = {}
    for path in ("passes", "eager"):
        results = get_simulator("threaded").run(4, _a2a_bytes, {"model": model, "batch": batch, "path": path}, 120)
        sent[path] = {r[0] for r in results}
        _assert_sum_is(reference, [r[1] for r in results])
    B, S, P, D, itemsize = 2, 16, 4, 2, 8
    q_and_out = 2 * 8 * (S // P) * D * B * itemsize  # forward; the backward moves as much again
    k_and_v = 2 * 4 * (S // P) * D * B * itemsize    # 4 kv heads: each rank gets its one
    assert sent["passes"] == sent["eager"] == {2 * (q_and_out + k_and_v)}


def test_a_graph_compiled_for_p_ranks_refuses_another_group_size():
    """The world-group backend (``torch.compile(backend="autosp")``'s, here with aot_eager) compiles
    for the world it first sees; a world of another size later (destroyed and made again in the
    same process) is named, never run."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from autosp.backend import make_backend
    model, batch = _case()
    ids, labels = autosp.prepare_inputs(batch["input_ids"], batch["labels"])
    backend = make_backend(autosp.SPConfig(backend="aot_eager"))
    compiled = torch.compile(copy.deepcopy(model), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    try:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
        compiled(input_ids=ids, labels=labels)
        dist.destroy_process_group()
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
        with pytest.raises(autosp.AutoSPError, match="compiled for 2 ranks but the group has 4"):
            compiled(input_ids=ids, labels=labels)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
