"""Convolutions and zero pads along the sequence (LFM2's short conv, pad-then-conv, "same" convs,
RWKV's token shift): each rank reads its neighbours' edge positions (autosp::halo,
autosp/passes/halo.py). Exact against one device at the fewest bytes; the op itself against the
zero-padded sequence; what a halo cannot make positional refused with its line; ranks padding
their own chunks caught by the verifier."""
import functools
import os

import pytest
import torch
import torch.distributed as dist

import autosp
from autosp.collectives import group_key, halo
from autosp_verify import verify
from autosp_verify.model_file import load_model_file
from autosp_verify.simulators import get_simulator

from .conv_models import (CausalConv, ConvLM, LeftPadConv, LookAhead, PadReadPastTheEnd, ReflectPad, SameConv,
                          StridedConv, TokenShift, inputs_fn)


EAGER = "autosp-eager"


def _verify(mixer, world_size, impl=EAGER, **kwargs):
    return verify(functools.partial(ConvLM, mixer, **kwargs), inputs_fn, impl=impl, dtype=torch.float64,
                  world_size=world_size, seq_len=13)


@pytest.mark.parametrize("mixer, kwargs, world_size, impl", [
    (CausalConv, {}, 2, "autosp"),  # through AOTAutograd: the op's fake and autograd traced
    (CausalConv, {"kernel": 7}, 8, EAGER),  # chunks of 2: the halo reaches three ranks back
    (CausalConv, {"dilation": 2}, 4, EAGER),
    (SameConv, {}, 4, EAGER),  # reads after too, into the last rank's padding
    (LeftPadConv, {}, 4, "autosp"),
    (TokenShift, {"shift": 3}, 8, EAGER),
    (LookAhead, {}, 2, EAGER),
], ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_convolutions_and_shifts_along_the_sequence_are_exact_at_the_minimum_bytes(mixer, kwargs, world_size, impl):
    before = autosp.COUNTERS["halo"]
    result = _verify(mixer, world_size, impl, **kwargs)
    assert result.passed, (result.status, result.error, result.failures[:5])
    collectives = result.accounting["collectives"]
    assert collectives["at_minimum"], collectives  # each rank sends exactly the positions others read
    assert collectives["measured"]["halo"] == 4  # two layers, forward and backward
    assert autosp.COUNTERS["halo"] > before


@pytest.mark.parametrize("impl", ["autosp-eager", pytest.param("autosp", marks=pytest.mark.slow)])
def test_lfm2_as_loaded_is_exact(impl):
    """LFM2 (short convolutions and attention) with its config's defaults (lfm2_model.py): its
    convolution cache cannot be kept (the last positions), so autosp builds none, with a warning,
    and shards the rest. Through AOTAutograd under ``make test-all`` (the ConvLM cases above in
    the default run)."""
    lfm2 = load_model_file(os.path.join(os.path.dirname(__file__), "lfm2_model.py"))
    assert lfm2.model_fn().config.use_cache
    with pytest.warns(UserWarning, match="convolution states"):
        result = verify(lfm2.model_fn, lfm2.inputs_fn, impl=impl, dtype=torch.float64, world_size=4, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert result.accounting["collectives"]["measured"]["halo"] == 2  # one conv layer, forward and backward


@pytest.mark.parametrize("mixer, why", [
    (StridedConv, "a stride of 2"),
    (ReflectPad, "reflect"),
    (PadReadPastTheEnd, "past the sequence's end"),
])
def test_what_a_halo_cannot_make_positional_is_refused_with_its_line(mixer, why):
    result = _verify(mixer, 2)
    assert result.status == "unsupported", (result.status, result.error)
    assert why in result.error and "conv_models.py" in result.error, result.error


def test_negative_control_ranks_padding_their_own_chunks_fail_at_the_convolution(monkeypatch):
    """Each rank given zeros for its neighbours' positions (a convolution sharded as if each chunk
    were the sequence): the verifier fails it, and its first divergence is the convolution's value
    (compared on the positions the ranks hold: its last outputs, past the end, are cut off)."""
    def zeros(x, sent, received, group):
        return x.new_zeros((sum(received.values()), *x.shape[1:]))
    monkeypatch.setattr(halo, "_exchange", zeros)
    result = _verify(CausalConv, 2)
    assert result.status == "fail"
    first = result.first_divergence
    assert first["op"] == "conv1d" and "rel err" in first["message"], first


def test_a_later_error_is_not_blamed_on_a_causal_convolution():
    """The halos right and the loss left each rank's own mean (broken): the first divergence is the
    loss. 2 x 7 positions held of the convolution's 15 (its last 2 past the sequence, cut off by
    the model): the convolution itself matches."""
    result = _verify(CausalConv, 2, impl=f"{os.path.dirname(__file__)}/../verify/broken_autosp.py:per_rank_loss")
    assert result.status == "fail"
    assert result.first_divergence["op"] != "conv1d", result.first_divergence
    assert any(t["op"] == "conv1d" and t["rel_err"] == 0 for t in result.divergence_trace), result.divergence_trace


def _halo_rank(ctx, payload):
    P, rank = dist.get_world_size(), dist.get_rank()
    x, left, right, length = payload["x"], payload["left"], payload["right"], payload["length"]
    L = -(-x.shape[1] // P)
    chunk = torch.nn.functional.pad(x, (0, 0, 0, L * P - x.shape[1]))[:, rank * L:(rank + 1) * L]
    chunk = chunk.clone().requires_grad_()
    out = torch.ops.autosp.halo(chunk, 1, left, right, length, group_key(dist.group.WORLD), P)
    return out.detach(), torch.autograd.grad(out, chunk, payload["grads"][rank])[0]


@pytest.mark.parametrize("world_size, left, right", [(2, 2, 0), (3, 0, 3), (4, 1, 2), (4, 7, 5)])
def test_the_halo_op_is_the_zero_padded_sequence_forward_and_backward(world_size, left, right):
    """Every rank's window of positions [r*L - left, r*L + L + right) of the sequence, zeros outside
    its first ``length`` positions; the gradient of each position the sum of every window's."""
    S, length, P = 10, 9, world_size
    L = -(-S // P)
    x = torch.randn(2, S, 3, dtype=torch.float64)
    grads = [torch.randn(2, left + L + right, 3, dtype=torch.float64) for _ in range(P)]
    got = get_simulator("threaded").run(P, _halo_rank, dict(x=x, left=left, right=right, length=length,
                                                            grads=grads), 60)
    padded = torch.zeros(2, left + L * P + right, 3, dtype=torch.float64)
    padded[:, left:left + length] = x[:, :length]
    grad = torch.zeros_like(padded)
    for rank, (out, _) in enumerate(got):
        assert torch.equal(out, padded[:, rank * L:rank * L + left + L + right]), rank
        grad[:, rank * L:rank * L + left + L + right] += grads[rank]
    grad = grad[:, left:left + L * P]
    grad[:, length:] = 0
    for rank, (_, g) in enumerate(got):
        torch.testing.assert_close(g, grad[:, rank * L:(rank + 1) * L], rtol=0, atol=1e-12)
