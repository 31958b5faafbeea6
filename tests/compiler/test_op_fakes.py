"""The fake (shape-only) implementations of autosp's collectives and of its attention backward make
what the op makes: the same shapes, strides and dtypes (the compile plans memory and views from
the fakes; head_to_seq's sequence-major output is made in one op there). Run on a fake process
group: the values are meaningless, the layouts are the op's."""
import pytest
import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.testing._internal.distributed.fake_pg import FakeStore

from autosp import collectives as C
from autosp import flash_attention
from autosp.collectives import ops

P = 4
# (x's shape, seq_dim, head_dim, heads after head_to_seq, ulysses, kv repeats)
LAYOUTS = [((2, 8, 16, 4), 2, 1, 8, 0, 1),     # [B, H, S, D]
           ((2, 6, 16, 4), 2, 1, 6, 0, 1),     # heads padded to a multiple of P
           ((2, 2, 16, 4), 2, 1, 8, 0, 4),     # 2 kv heads repeated for 4 ranks... as 8 heads
           ((16, 2, 8, 4), 0, 2, 8, 0, 1),     # the sequence before the heads
           ((2, 16, 8, 4), 1, 2, 8, 0, 1),     # [B, S, H, D]
           ((2, 2, 16, 4), 2, 1, 2, 2, 1)]     # Ulysses over blocks of 2 ranks


@pytest.fixture()
def group():
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=P)
    try:
        yield C.group_key(dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _same_layout(op, *args):
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    layouts = [[(tuple(t.shape), t.stride(), t.dtype) for t in (v if isinstance(v, tuple) else (v,))]
               for v in (fake, real)]
    assert layouts[0] == layouts[1], op
    return real


@pytest.mark.parametrize("shape,seq_dim,head_dim,heads,ulysses,repeats", LAYOUTS)
def test_each_fake_makes_the_real_layout(group, shape, seq_dim, head_dim, heads, ulysses, repeats):
    x = torch.randn(shape)
    by_head = _same_layout(C.seq_to_head, x, seq_dim, head_dim, group, P, ulysses, repeats)
    out = _same_layout(C.head_to_seq, by_head, seq_dim, head_dim, heads, group, P, ulysses)
    assert out.shape[seq_dim] == shape[seq_dim] and out.shape[head_dim] == heads
    if repeats > 1:  # the runs of repeated heads summed back into one each: seq_to_head's gradient
        back = _same_layout(C.head_to_seq, by_head, seq_dim, head_dim, shape[head_dim], group, P, ulysses, repeats)
        assert back.shape == x.shape
    lse = torch.randn([n for d, n in enumerate(by_head.shape) if d != by_head.dim() - 1])
    _same_layout(C.attention_to_seq, by_head, lse, seq_dim, head_dim, heads, group, P, ulysses)
    _same_layout(ops.attention_to_seq_backward, out, torch.randn(out.shape), torch.float32, seq_dim, head_dim,
                 group, P, ulysses)
    _same_layout(ops.attention_to_seq_backward, out.bfloat16(), out.bfloat16(), torch.float32, seq_dim, head_dim,
                 group, P, ulysses)


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("is_causal", [True, False])
def test_the_flash_backward_fake_makes_the_real_layout(kv_heads, is_causal):
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, kv_heads, 16, 8), torch.randn(2, kv_heads, 16, 8)
    out, lse = flash_attention.cpu_flash_attention(q, k, v, is_causal, None)
    grad = torch.randn(out.shape)
    delta = (grad * out).sum(-1)
    _same_layout(flash_attention.cpu_flash_attention_backward, grad, q, k, v, lse, delta, is_causal, None)


def test_negative_control_a_contiguous_output_is_told_apart(group):
    """head_to_seq returns the sequence before the heads in memory; a fake that made a contiguous
    tensor of the right shape would fail the comparison above."""
    by_head = C.seq_to_head(torch.randn(2, 8, 16, 4), 2, 1, group, P)
    real = C.head_to_seq(by_head, 2, 1, 8, group, P)
    assert real.stride() != torch.empty(real.shape).stride()
