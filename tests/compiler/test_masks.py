"""Masks as O(S) data: the mask a model builds is factored into leaves that carry the sequence once
and a pointwise program, ``autosp::masked_attention`` rebuilds it one block of query rows at a
time, and no rank holds an [S, S] tensor.

Two levels: the factoring and the op against torch's SDPA with the dense mask (forward and
backward, float64, block sizes from one row to the whole sequence), and whole HF models through
the verifier (causal, right/left-padded, packed documents) with blocks of one row."""
import importlib
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import autosp
from autosp.masked_attention import masked_attention, parse, program_of
from autosp.passes import masks
from autosp.passes.layout import example_value, find_sequence, seq_dims
from autosp_verify import verify, verify_file
from autosp_verify.impls import autosp_impl

from tests.verify import square_mask_model
from .test_collective_counts import FIXTURES

S, B, H, D = 11, 2, 3, 4


def _capture(fn, *inputs):
    """fn's Dynamo graph (every dim of size S dynamic: one symbol), its mask node, every node's
    value, and the dense mask."""
    captured = {}

    def backend(gm, example_inputs):
        values = {}
        interp = torch.fx.Interpreter(gm)
        run_node = interp.run_node
        interp.run_node = lambda n: values.setdefault(n, run_node(n))
        real = [S if isinstance(example_value(p), torch.SymInt) else p.meta["grapharg"].example
                for p in gm.graph.find_nodes(op="placeholder")]  # every input is S long
        captured.update(gm=gm, values=values, dense=interp.run(*real)[0])
        return gm.forward
    torch._dynamo.reset()
    inputs = [t.view(t.shape) for t in inputs]
    for t in inputs:
        for d in range(t.dim()):
            (torch._dynamo.mark_dynamic if t.shape[d] == S else torch._dynamo.mark_static)(t, d)
    torch.compile(fn, backend=backend, fullgraph=True)(*inputs)
    gm = captured["gm"]
    mask = next(n for n in gm.graph.nodes if n.op == "output").args[0][0]
    symbol = example_value(mask).shape[-1].node.expr  # the keys: S
    return gm, symbol, mask, captured["values"], captured["dense"]


def _attention(q, k, v, factored, values, block_elements, length=S):
    leaves = [values[leaf] for leaf in factored.leaves]
    return masked_attention(q, k, v, leaves, factored.program, length,
                            D ** -0.5, q.shape[1] != k.shape[1], block_elements, "", 0, None)[0]


def _qkv(kv_heads=H, rows=S):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, h, rows, D, generator=g, dtype=torch.float64, requires_grad=True)
            for h in (H, kv_heads, kv_heads)]


# Mask builders as models write them: each takes [B, S] int tensors, returns a mask.
def causal_and_documents(ids, positions):
    q, k = positions[:, None, :, None], positions[:, None, None, :]
    docs = (torch.diff(positions, prepend=positions[:, :1] - 1) != 1).cumsum(-1)
    return ((k <= q) & (docs[:, None, :, None] == docs[:, None, None, :])).expand(B, 1, -1, -1),


def causal_and_key_padding(ids, positions):
    q, k = positions[:, None, :, None], positions[:, None, None, :]
    return (k <= q) & (ids != 0)[:, None, None, :],


def key_padding_bidirectional(ids, positions):
    return (ids != 0)[:, None, None, :].expand(B, 1, ids.shape[1], ids.shape[1]),


def sliding_window_additive(ids, positions):
    i = torch.arange(ids.shape[1])
    allowed = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 3)
    return torch.zeros(ids.shape[1], ids.shape[1], dtype=torch.float64).masked_fill(~allowed, float("-inf")),


def tril_and_eye(ids, positions):
    n = ids.shape[1]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool)) & (ids != 0)[:, None, None, :]
    return keep | torch.eye(n, dtype=torch.bool),


def float_bias_from_bool(ids, positions):
    n = ids.shape[1]
    causal = torch.ones(n, n).triu(1).bool()
    return torch.where(causal, torch.finfo(torch.float32).min, 0.0).to(torch.float64)[None, None],


BUILDERS = [causal_and_documents, causal_and_key_padding, key_padding_bidirectional, sliding_window_additive,
            tril_and_eye, float_bias_from_bool]


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 9, (B, S), generator=g)
    ids[0, -3:] = 0  # padding
    positions = torch.cat([torch.arange(4), torch.arange(S - 4)]).expand(B, S).clone()
    return ids, positions


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("block_elements", [1, B * H * S * 3, 0])
def test_factored_mask_attention_equals_sdpa_with_the_dense_mask(builder, block_elements):
    gm, symbol, mask, values, dense = _capture(builder, *_batch())
    factored = masks.factor(mask, symbol)
    assert all(len(seq_dims(example_value(leaf), symbol)) <= 1 for leaf in factored.leaves)
    q, k, v = _qkv()
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    out = _attention(q, k, v, factored, values, block_elements)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), grad),
                               torch.autograd.grad(ref, (q, k, v), grad), rtol=1e-12, atol=1e-12)


def test_grouped_query_heads_and_padded_queries_and_keys():
    """kv heads shared by groups of query heads; rows past ``length`` are padding: zeros out,
    zero grads, and keys past it never attended."""
    gm, symbol, mask, values, dense = _capture(causal_and_documents, *_batch())
    factored = masks.factor(mask, symbol)
    q, k, v = _qkv(kv_heads=1, rows=S + 3)
    with torch.no_grad():
        k[:, :, S:] = 1e3  # padded keys that would dominate if attended
    out = _attention(q, k, v, factored, values, 5)
    ref = F.scaled_dot_product_attention(q[:, :, :S], k[:, :, :S], v[:, :, :S], attn_mask=dense, enable_gqa=True)
    torch.testing.assert_close(out[:, :, :S], ref, rtol=1e-12, atol=1e-12)
    assert out[:, :, S:].eq(0).all()
    dq, dk, _ = torch.autograd.grad(out.sum(), (q, k, v))
    assert dq[:, :, S:].eq(0).all() and dk[:, :, S:].eq(0).all()


def test_a_swapped_query_and_key_dim_is_caught():
    """Negative control for the check above: blocks that slice each leaf along its key dim."""
    gm, symbol, mask, values, dense = _capture(causal_and_documents, *_batch())
    factored = masks.factor(mask, symbol)
    q_dims, ops = parse(factored.program)
    seq = [next((d for d, n in enumerate(values[leaf].shape) if n == S), -1) for leaf in factored.leaves]
    swapped = program_of([-1 if q >= 0 else d for q, d in zip(q_dims, seq)], ops)
    assert swapped != factored.program
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="does not broadcast to the scores"):
        _attention(q, k, v, masks.FactoredMask(factored.leaves, swapped, []), values, 1)


# --- runs: masks torch's fused kernel can apply, found at run time (autosp/mask_runs.py) ---------

def _one_document(last_key_padded=False):
    ids = torch.randint(1, 9, (B, S), generator=torch.Generator().manual_seed(1))
    if last_key_padded:  # one entry from causal: the last query of row 1 does not see itself
        ids[1, -1] = 0
    return ids, torch.arange(S).expand(B, S).clone()


def _kernel_mask(calls, batches, offset=0):
    """The mask the fused kernel applies call by call to the rows from ``offset``: a causal call's
    query j sees its keys up to the j-th (torch's is_causal aligns the top-left corner), a flipped
    call is a causal one on rows and keys in reverse order (the j-th of R rows sees the keys from
    the (K - R + j)-th on), any other call all of its keys; calls over the same rows add up."""
    from autosp.mask_runs import CAUSAL, FLIPPED
    visible = torch.zeros(batches, S, S, dtype=torch.bool)
    for b, r0, r1, k0, k1, kind, merge in calls:
        keys = torch.zeros(r1 - r0, S, dtype=torch.bool)
        keys[:, k0:k1] = True
        key, row = torch.arange(S)[None, :] - k0, torch.arange(r1 - r0)[:, None]
        if kind == CAUSAL:
            keys &= key <= row
        elif kind == FLIPPED:  # reversed: key K-1-m is visible to row R-1-j iff K-1-m <= R-1-j
            keys &= (k1 - k0 - 1) - key <= (r1 - r0 - 1) - row
        visible[slice(None) if b < 0 else slice(b, b + 1), offset + r0:offset + r1] |= keys
    return visible


FUSED = {("one_document", "causal_and_documents"), ("one_document", "causal_and_key_padding"),
         ("one_document", "key_padding_bidirectional"), ("one_document", "tril_and_eye"),
         ("last_key_padded", "causal_and_documents"), ("last_key_padded", "causal_and_key_padding"),
         ("last_key_padded", "key_padding_bidirectional"), ("last_key_padded", "tril_and_eye"),
         ("padded_and_packed", "causal_and_documents"), ("padded_and_packed", "key_padding_bidirectional"),
         ("one_document", "sliding_window_additive"), ("last_key_padded", "sliding_window_additive"),
         ("padded_and_packed", "sliding_window_additive")}


@pytest.mark.parametrize("builder", BUILDERS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("batch", ["one_document", "last_key_padded", "padded_and_packed"])
@pytest.mark.parametrize("check_elements", [2 * S, 1 << 22])  # two rows a block, one block
def test_runs_give_the_kernel_exactly_the_mask(builder, batch, check_elements, monkeypatch):
    """Where the rows are runs, the fused kernel call by call applies exactly the model's mask, to
    every row (offset 0) and to a rank's block of rows past the head count (offset 5: documents
    begun before it); a finite bias (float32's lowest in a float64 mask: only -inf and the
    dtype's own lowest hide a key) and positions out of order are not runs."""
    from autosp import mask_runs
    monkeypatch.setattr(mask_runs, "CHECK_ELEMENTS", check_elements)
    inputs = _batch() if batch == "padded_and_packed" else _one_document(batch == "last_key_padded")
    gm, symbol, mask, values, dense = _capture(builder, *inputs)
    factored = masks.factor(mask, symbol)
    batches = dense.shape[0] if dense.dim() == 4 else 1
    ranges = mask_runs.key_ranges([values[leaf] for leaf in factored.leaves], factored.program, S, batches)
    found = mask_runs.runs(ranges, S)
    assert (found is not None) == ((batch, builder.__name__) in FUSED), found
    if found is not None:
        visible = (dense.eq(0) if dense.is_floating_point() else dense).reshape(-1, S, S).expand(batches, S, S)
        assert torch.equal(_kernel_mask(mask_runs.pieces(found, 0, S), batches), visible)
        block = _kernel_mask(mask_runs.pieces(found, 5, 4), batches, offset=5)
        assert torch.equal(block[:, 5:9], visible[:, 5:9]) and not block[:, :5].any() and not block[:, 9:].any()


def test_negative_control_causal_runs_begun_before_the_block_taken_whole_are_caught():
    """Without the split, a causal run begun before a block's rows would be one is_causal call
    from its first key: the block's first query would see one key, not all before it."""
    from autosp import mask_runs
    gm, symbol, mask, values, dense = _capture(causal_and_documents, *_one_document())
    factored = masks.factor(mask, symbol)
    found = mask_runs.runs(mask_runs.key_ranges([values[leaf] for leaf in factored.leaves], factored.program, S, B), S)
    unsplit = [(b, max(r0, 5) - 5, min(r1, 9) - 5, k0, min(r1, 9), causal, False)
               for b, r0, r1, k0, k1, causal in found]
    want = dense.reshape(-1, S, S)[:, 5:9]
    assert not torch.equal(_kernel_mask(unsplit, B, offset=5)[:, 5:9], want)
    assert torch.equal(_kernel_mask(mask_runs.pieces(found, 5, 4), B, offset=5)[:, 5:9], want)


def test_negative_control_a_window_taken_causally_throughout_is_caught():
    """Without the flip a window's earlier keys would be causal from their first: the first row of
    each block of rows would see one of them, not all that the window holds."""
    from autosp import mask_runs
    gm, symbol, mask, values, dense = _capture(sliding_window_additive, *_one_document())
    factored = masks.factor(mask, symbol)
    found = mask_runs.runs(mask_runs.key_ranges([values[leaf] for leaf in factored.leaves], factored.program, S, 1), S)
    calls = mask_runs.pieces(found, 0, S)
    assert any(call[5] == mask_runs.FLIPPED for call in calls)
    unflipped = [(*call[:5], mask_runs.CAUSAL if call[5] == mask_runs.FLIPPED else call[5], call[6]) for call in calls]
    want = dense.eq(0).reshape(1, S, S)
    assert not torch.equal(_kernel_mask(unflipped, 1), want)
    assert torch.equal(_kernel_mask(calls, 1), want)


def _kernels(fixture, world_size, seq_len, verify_kwargs=(), **config):
    from autosp import masked_attention as ma
    ma.KERNELS.clear()
    path = f"{FIXTURES}/{fixture}.py" if "/" not in fixture else fixture
    result = verify_file(path, impl=autosp_impl("aot_eager", **config), world_size=world_size, seq_len=seq_len,
                         **dict(verify_kwargs))
    return result, dict(ma.KERNELS)


CHECKPOINTED_LLAMA = os.path.join(os.path.dirname(__file__), "checkpointed_llama.py")
TOKENIZED_LLAMA = os.path.join(os.path.dirname(__file__), "tokenized_llama.py")


@pytest.mark.parametrize("fixture,world_size,seq_len", [
    ("hf_qwen2", 3, 13), (CHECKPOINTED_LLAMA, 2, 16), (TOKENIZED_LLAMA, 2, 13), ("hf_qwen3_packed", 3, 13),
    ("hf_olmo2_padded", 2, 11)],
    ids=["hf_qwen2-causal", "hf_llama-checkpointed", "hf_llama-mask-of-ones", "hf_qwen3-packed",
         "hf_olmo2-left-and-right-padded"])
def test_hf_masks_take_the_fused_kernel_run_by_run_and_are_exact(fixture, world_size, seq_len):
    """HF builds a mask whenever it cannot prove under torch.compile that it needs none
    (use_cache=False, set by the user or by its activation checkpointing; a tokenizer's mask of
    ones; packed documents; padding); at run time its rows are runs, and torch's kernel runs once
    per run."""
    result, kernels = _kernels(fixture, world_size, seq_len)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert kernels.get("fused", 0) > 0 and kernels.get("blocks", 0) == 0, kernels


def test_negative_control_one_run_over_packed_documents_is_caught(monkeypatch):
    """Runs that ignore the documents (one causal run over the whole row): the verifier fails it."""
    from autosp import mask_runs
    monkeypatch.setattr(mask_runs, "runs", lambda ranges, length: [(-1, 0, length, 0, length, True)])
    result, kernels = _kernels("hf_qwen3_packed", 3, 13, {"diagnose": False, "steps": 1})
    assert kernels.get("fused", 0) > 0
    assert result.status == "fail", (result.status, result.error)


# --- whole models through the verifier ----------------------------------------------------------

ONE_ROW = autosp_impl("aot_eager", attention_block_elements=1, attention_kernel="blocks")


class _GraphAfterPasses:
    """An inner backend that keeps the graph autosp hands it (after the passes)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward


@pytest.mark.parametrize("name", ["hf_qwen2", "hf_olmo2_padded", "hf_qwen3_packed"])
def test_hf_masks_leave_no_sequence_squared_value_in_the_graph(name):
    fixture = importlib.import_module(f"fixtures.{name}")
    torch.manual_seed(0)
    model = fixture.model_fn()
    batch = fixture.inputs_fn(2, 13, torch.Generator().manual_seed(0))
    keep = _GraphAfterPasses()
    autosp.COUNTERS.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask kept whole warns
        autosp.compile(model, config=autosp.SPConfig(backend=keep)).warm_up(4, **batch)
    layers = model.config.num_hidden_layers
    assert autosp.COUNTERS["masked_attention"] == layers and autosp.COUNTERS["dense_mask"] == 0
    assert autosp.COUNTERS["mask_key_ranges"] == 1  # one mask, its runs found once for every layer
    (gm,) = keep.graphs
    symbol = find_sequence(gm, 1).symbol
    squared = [n.name for n in gm.graph.nodes if len(seq_dims(example_value(n), symbol)) > 1]
    assert squared == []


@pytest.mark.parametrize("name", ["hf_olmo2_padded", "hf_qwen3_packed"])
@pytest.mark.parametrize("world_size,seq_len", [pytest.param(2, 16, marks=pytest.mark.slow), (3, 13),
                                                pytest.param(4, 11, marks=pytest.mark.slow)])
def test_padded_and_packed_hf_models_are_exact_with_one_row_blocks(name, world_size, seq_len):
    """SPConfig(attention_kernel="blocks"): the blocks, though these masks' rows are runs."""
    from autosp.masked_attention import KERNELS
    KERNELS.clear()
    result = verify_file(f"{FIXTURES}/{name}.py", impl=ONE_ROW, world_size=world_size, seq_len=seq_len)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert KERNELS["blocks"] > 0 and KERNELS["fused"] == 0, dict(KERNELS)


def test_a_mask_the_model_is_given_whole_is_exact_and_said():
    autosp.COUNTERS.clear()
    with pytest.warns(UserWarning, match=r"holds an \[S, S\] mask whole on every rank \(cdist .* is not an op the mask can "
                                         r"be rebuilt with; the mask comes whole from l_attention_mask_"):
        result = verify(square_mask_model.model_fn, square_mask_model.inputs_fn, impl="autosp", world_size=2,
                        seq_len=9)
    assert result.passed, (result.status, result.error, result.failures[:5])
    assert autosp.COUNTERS["dense_mask"] >= 1


def test_a_scale_dynamo_made_symbolic_is_applied():
    """Two Qwen2 widths in one process: HF's attention passes ``scaling`` (head_dim ** -0.5) as a
    Python float; after seeing two values Dynamo makes it a symbolic input of the graph, which
    the masked attention takes through q (it crashed in the backend: float() of a graph node)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from fixtures import hf_qwen2

    def model_fn(heads):
        return lambda: Qwen2ForCausalLM(Qwen2Config(
            vocab_size=hf_qwen2.VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=heads,
            num_key_value_heads=2, intermediate_size=64, attn_implementation="sdpa")).train()

    def padded(batch, seq_len, generator):
        inputs = hf_qwen2.inputs_fn(batch, seq_len, generator)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["attention_mask"][0, -3:] = 0  # a padding mask: the masked attention, not is_causal
        return inputs

    torch._dynamo.reset()
    for heads in (8, 4, 2):  # head_dim 4, 8, 16: three scales
        result = verify(model_fn(heads), padded, impl="autosp-eager", world_size=2, seq_len=13)
        assert result.passed, (heads, result.status, result.error, result.failures[:3])
