"""The working memory of autosp's collective ops, replayed (their own Python body on fake
tensors of the evaluated shapes and strides, on a fake group), against the op's real peak on
CPU tensors on the same fake group. Cases where layout decides: a batch of 2 (the all-to-all's
input is not contiguous: one more copy), query heads P does not divide (zero heads padded in),
a shard with padding. Negative control: these ops do hold working memory worth counting (zero
would be off by far more than the tolerance)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from autosp_verify.peak import PeakMemory
from autosp_verify.scale.trace import fake_world
from autosp_verify.scale.workspace import replay_peak

TOLERANCE = 0.10
WORLD = 4


def _group_key():
    import autosp.collectives as c
    return c.group_key(torch.distributed.group.WORLD) if hasattr(c, "group_key") else "world"


def _opdef(name):
    from torch._library.custom_ops import OPDEFS
    return OPDEFS[f"autosp::{name}"]


def _cases():
    # (op, args builder(key) -> args): x is [B, H, S/P, D] for seq_to_head, [B, H/P, S, D] for head_to_seq
    return [
        ("seq_to_head", lambda key: [torch.randn(1, 8, 256, 16), 2, 1, key, WORLD]),
        ("seq_to_head", lambda key: [torch.randn(2, 8, 256, 16), 2, 1, key, WORLD]),
        ("seq_to_head", lambda key: [torch.randn(2, 6, 256, 16), 2, 1, key, WORLD]),
        ("head_to_seq", lambda key: [torch.randn(2, 2, 1024, 16), 2, 1, 8, key, WORLD]),
        ("shard", lambda key: [torch.randn(2, 1021, 64), 1, 1, 1021, 256, 0.0, key, WORLD]),
    ]


@pytest.mark.parametrize("index", range(len(_cases())), ids=lambda i: f"{_cases()[i][0]}-{i}")
def test_replayed_working_memory_matches_the_op(index):
    name, build = _cases()[index]
    op = _opdef(name)
    with fake_world(WORLD):
        key = _group_key()
        args = build(key)
        with PeakMemory() as peak:
            out = op(*args)
        measured = peak.bytes - out.numel() * out.element_size()
        mode = FakeTensorMode()
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    replayed = replay_peak(op, fake_args, WORLD, mode)
    assert measured > TOLERANCE * out.numel() * out.element_size()  # negative control: not nothing
    assert abs(replayed / measured - 1) < TOLERANCE, (replayed, measured)
