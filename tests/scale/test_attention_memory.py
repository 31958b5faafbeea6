"""The working memory counted for ``autosp::masked_attention`` (attention_memory.py) against the
op's real peak on CPU tensors, forward and backward, float32 and bfloat16, GQA, several blocks.
The count reads the code, so the real op is the check; negative control: without the previous
block's tensors (Python keeps a loop's locals until they are rebound) it falls short."""
import pytest
import torch

import autosp.masked_attention as ma
from autosp_verify.peak import PeakMemory
from autosp_verify.scale import attention_memory as am
from autosp_verify.scale.validate import one_thread

TOLERANCE = 0.10
# batch, query heads, kv heads, S, head dim, dtype, block elements (0: as many as q), GQA
CASES = [
    (1, 4, 4, 2048, 32, torch.float32, 0, False),
    (1, 4, 4, 2048, 32, torch.bfloat16, 0, False),
    (2, 8, 2, 1024, 16, torch.float32, 0, True),
    (2, 8, 2, 1024, 16, torch.bfloat16, 1 << 17, True),
    (1, 4, 4, 2048, 16, torch.float32, 1 << 19, False),  # blocks of 64 rows: the blocks dominate
]


def _causal(seq_len):
    pos = torch.arange(seq_len)
    program = ma.program_of([2, -1], [["le", [{"ref": 1}, {"ref": 0}], {}]])  # key <= query
    return [pos.view(1, 1, seq_len, 1), pos.view(1, 1, 1, seq_len)], program


def _bytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def _meta(args: dict) -> dict:
    def meta(v):
        return v.to("meta") if isinstance(v, torch.Tensor) else [x.to("meta") for x in v] if isinstance(v, list) else v
    return {k: meta(v) for k, v in args.items()}


def _run(batch, heads, kv_heads, seq_len, head_dim, dtype, block, gqa):
    """(forward, backward) measured working memory and the arguments, by name."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, seq_len, head_dim, generator=g).to(dtype) for h in (heads, kv_heads, kv_heads))
    leaves, program = _causal(seq_len)
    args = dict(q=q, k=k, v=v, leaves=leaves, program=program, length=seq_len, scale=head_dim ** -0.5,
                enable_gqa=gqa, block_elements=block)
    with one_thread(), PeakMemory() as peak:
        out, lse = torch.ops.autosp.masked_attention(q, k, v, leaves, program, seq_len, head_dim ** -0.5, gqa, block, "", 0, None)
    forward = peak.bytes - _bytes(out, lse)
    grad = torch.randn_like(out)
    delta = (grad.to(lse.dtype) * out.to(lse.dtype)).sum(-1)  # rowsum(dO * O), made by the autograd formula
    with one_thread(), PeakMemory() as peak:
        grads = torch.ops.autosp.masked_attention_backward(grad, q, k, v, delta, lse, leaves, program, seq_len,
                                                           head_dim ** -0.5, gqa, block, "", 0, None)
    backward = peak.bytes - _bytes(*grads)
    return forward, backward, _meta({**args, "grad": grad, "delta": delta, "lse": lse})


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}H{c[1]}KV{c[2]}S{c[3]}-{str(c[5])[6:]}-blk{c[6]}")
def test_counted_working_memory_matches_the_op(case):
    forward, backward, args = _run(*case)
    assert am.block_geometry(args["q"], args["k"], case[3], case[6])[2] >= 8  # several blocks
    assert abs(am.forward_bytes(args, {}) / forward - 1) < TOLERANCE, (am.forward_bytes(args, {}), forward)
    assert abs(am.backward_bytes(args, {}) / backward - 1) < TOLERANCE, (am.backward_bytes(args, {}), backward)


def test_without_the_previous_block_the_count_falls_short(monkeypatch):
    forward, backward, args = _run(*CASES[-1])
    init = am._Sizes.__init__

    def forgetful(self, *a, **kw):
        init(self, *a, **kw)
        self.pairs = [(0, rows) for _, rows in self.pairs]
    monkeypatch.setattr(am._Sizes, "__init__", forgetful)
    assert am.backward_bytes(args, {}) < (1 - TOLERANCE) * backward
    assert am.forward_bytes(args, {}) < (1 - TOLERANCE) * forward


def test_a_single_block_holds_no_previous_block():
    """With a budget that fits all rows at once there is one block and nothing held over: the
    count is then that of one block (and still matches the op)."""
    case = (1, 4, 4, 256, 32, torch.float32, 1 << 22, False)
    forward, backward, args = _run(*case)
    assert am.block_geometry(args["q"], args["k"], 256, 1 << 22)[2] == 1
    assert abs(am.backward_bytes(args, {}) / backward - 1) < TOLERANCE
