"""Sequence parallelism past the head count: P = U x R, Ulysses over blocks of U ranks, keys and
values gathered over the R blocks (queries stay local), exact against one device in float64, with
the collectives of that layout and no more."""
import os
import warnings

import pytest
import torch

import autosp
from autosp.collectives import sp_degrees
from autosp_verify import verify, verify_file

from .test_collective_counts import _load

HERE = os.path.dirname(__file__)
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")
FEW_HEADS = os.path.join(FIXTURES, "hf_qwen3_few_heads.py")  # 4 query heads, 2 kv heads
BROKEN = os.path.join(HERE, "..", "verify", "broken_autosp.py")
wide64_model = _load(os.path.join("..", "tests", "verify", "wide64_model"))  # 32 or 64 query heads


def test_the_compiler_keeps_ulysses_while_the_heads_allow_then_sends_the_fewest_bytes():
    assert sp_degrees(32, 8) == sp_degrees(32, 8, kv_heads=2) == (8, 1)
    assert sp_degrees(4, 8) == (4, 2) and sp_degrees(32, 64) == (32, 2)  # MHA: the widest Ulysses
    # Llama-3-8B heads at P=64: a 32-wide Ulysses replicates the 8 kv heads 4 times; gathering
    # them over 8 blocks of 8 sends less (head-vectors per position held: 364 against 376)
    assert sp_degrees(32, 64, kv_heads=8) == (8, 8)
    assert sp_degrees(4, 8, kv_heads=2) == (2, 4) and sp_degrees(3, 8, kv_heads=1) == (1, 8)
    assert sp_degrees(8, 8, ulysses=2) == (2, 4)
    with pytest.raises(ValueError, match="must divide the group size 8"):
        sp_degrees(8, 8, ulysses=3)


# P=16 (R = 4) under `make test-all`; P=8 here is R = 2 (the property test draws P up to 8 over 1-16 heads)
@pytest.mark.parametrize("world_size,seq_len", [(8, 16), (8, 13), pytest.param(16, 32, marks=pytest.mark.slow),
                                                pytest.param(16, 29, marks=pytest.mark.slow)])
def test_four_heads_are_exact_past_the_head_count(world_size, seq_len):
    from autosp.masked_attention import KERNELS
    KERNELS.clear()
    r = verify_file(FEW_HEADS, world_size=world_size, seq_len=seq_len, steps=1)
    assert r.status == "pass", (r.error, r.failures)
    # each rank's block of queries: torch's kernel, twice where the causal run began on an earlier block
    assert KERNELS["fused"] > 0 and KERNELS["blocks"] == 0, dict(KERNELS)
    collectives = r.accounting["collectives"]
    assert collectives["at_minimum"], collectives
    layers = 2
    assert collectives["measured"]["all_gather"] == 2 * layers  # k and v, each layer
    assert collectives["measured"]["all_to_all"] == 8 * layers  # Ulysses within the blocks


@pytest.mark.slow  # in CI the property test draws masked and bidirectional models past the head count
@pytest.mark.parametrize("fixture", ["hf_qwen3_packed.py", "hf_olmo2_padded.py", "hf_bert_mlm.py"])
def test_masks_pass_the_gathered_keys_as_o_s_data(fixture):
    """Packed documents, padding, bidirectional attention: 8 (BERT: 4) query heads over 16 ranks."""
    r = verify_file(os.path.join(FIXTURES, fixture), world_size=16, seq_len=29, steps=1)
    assert r.status == "pass", (r.error, r.failures)


def test_a_fixed_ulysses_degree_is_exact_and_a_wrong_one_refused():
    r = verify(wide64_model.heads32_model_fn, wide64_model.inputs_fn, impl=autosp_impl_with(ulysses=2),
               world_size=4, seq_len=11, steps=1)
    assert r.status == "pass", (r.error, r.failures)
    r = verify(wide64_model.heads32_model_fn, wide64_model.inputs_fn, impl=autosp_impl_with(ulysses=3),
               world_size=4, seq_len=11, steps=1)
    assert r.status == "unsupported" and "ulysses=3 must divide the group size 4" in r.error


def autosp_impl_with(**config):
    from autosp_verify.impls import autosp_impl
    return autosp_impl("eager", **config)


def test_the_layout_chosen_is_said_once_per_graph():
    torch._dynamo.reset()
    model = wide64_model.heads32_model_fn()
    batch = wide64_model.inputs_fn(2, 70, torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autosp.compile(model, backend="eager").warm_up(64, **batch)
    said = [str(w.message) for w in caught if "query heads for 64 ranks" in str(w.message)]
    assert len(said) == 1 and "Ulysses over blocks of 8 ranks, keys and values gathered over 8 blocks" in said[0]


def test_p64_on_32_heads_is_structural_with_the_hybrid_collectives():
    r = verify(wide64_model.heads32_model_fn, wide64_model.inputs_fn, impl="autosp-eager", simulator="fake",
               world_size=64, seq_len=100)
    assert r.status == "structural", (r.error, r.failures)
    for counts in r.structural_collectives.values():
        kinds = {k: v for k, v in counts.items() if not k.endswith("bytes")}
        assert kinds == {"all_to_all": 8, "all_gather": 2, "reduce_scatter": 2, "all_reduce": 1}
    assert r.accounting["collectives"]["at_minimum"]


@pytest.mark.parametrize("broken", ["rows_from_zero", "kv_gather_without_grad"])
def test_negative_controls_past_the_head_count_fail(broken):
    """Queries masked as if they started at position 0; keys and values gathered without autograd."""
    r = verify_file(FEW_HEADS, impl=f"{BROKEN}:{broken}", world_size=8, seq_len=16, steps=1, diagnose=False)
    assert r.status == "fail", (r.error, r.failures)
