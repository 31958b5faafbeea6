"""The comparison rules, on hand-made tensors: metric, tolerance table, replicated/sharded outputs."""
import math

import pytest
import torch

from autosp_verify.compare import (TOLERANCES, check_grad, check_loss, check_output, check_tensor,
                                   tolerance_for)
from autosp_verify.outputs import OutputError, split_output

F64 = TOLERANCES[torch.float64]


def test_tolerance_table_is_the_documented_one():
    assert {d: t.rtol for d, t in TOLERANCES.items()} == {
        torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    assert all(0 < t.atol < t.rtol for t in TOLERANCES.values())
    assert tolerance_for(torch.float32, rtol=0.5).rtol == 0.5
    with pytest.raises(ValueError, match="no tolerance"):
        tolerance_for(torch.int64)


def test_metric_definitions():
    ref = torch.tensor([1.0, -4.0], dtype=torch.float64)
    c = check_tensor("t", ref + torch.tensor([0.0, 4e-10], dtype=torch.float64), ref, F64)
    assert c.abs_err == pytest.approx(4e-10) and c.rel_err == pytest.approx(1e-10) and c.passed
    assert not check_tensor("t", ref + 5e-10, ref, F64).passed
    zero = torch.zeros(3, dtype=torch.float64)
    assert check_tensor("z", zero, zero, F64).rel_err == 0.0
    off = check_tensor("z", zero + 1, zero, F64)
    assert off.rel_err == math.inf and not off.passed


def test_nan_in_impl_is_named():
    ref = torch.ones(3, dtype=torch.float64)
    c = check_tensor("t", torch.tensor([1.0, float("nan"), 1.0], dtype=torch.float64), ref, F64)
    assert not c.passed and "NaN/Inf" in c.problem


def test_replicated_and_sharded_outputs():
    ref = torch.arange(24.0, dtype=torch.float64).view(2, 6, 2)
    assert check_output("x", ref, {0: ref, 1: ref}, F64).passed
    bad = ref.clone()
    bad[0, 0, 0] += 1
    assert not check_output("x", ref, {0: ref, 1: bad}, F64).passed  # every replica must match
    shards = {0: ref[:, :4], 1: ref[:, 4:], 2: ref[:, 6:]}  # uneven, with an empty shard
    assert check_output("x", ref, shards, F64).passed
    swapped = check_output("x", ref, {0: ref[:, 3:], 1: ref[:, :3]}, F64)
    assert not swapped.passed and swapped.abs_err > 0


def test_shape_failures_are_named_not_raised():
    ref = torch.zeros(2, 6, 4)
    assert "more than one dim" in check_output("x", ref, {0: torch.zeros(2, 3, 2), 1: torch.zeros(2, 3, 2)},
                                               F64).problem
    assert "concatenate to" in check_output("x", ref, {0: torch.zeros(2, 4, 4), 1: torch.zeros(2, 4, 4)},
                                            F64).problem
    assert "missing" in check_output("x", ref, {0: ref, 1: None}, F64).problem


def test_loss_must_agree_across_ranks():
    ref = torch.tensor(2.0, dtype=torch.float64)
    assert check_loss(ref, {0: ref.clone(), 1: ref.clone()}, F64).passed
    c = check_loss(ref, {0: ref + 0.1, 1: ref - 0.1}, F64)
    assert not c.passed and "differs across ranks" in c.problem and "rank 1" in c.problem


def test_grads_are_summed_over_ranks():
    ref = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert check_grad("w", ref, {0: ref * 0.25, 1: ref * 0.75}, F64).passed
    assert not check_grad("w", ref, {0: ref, 1: ref}, F64).passed


def test_split_output_forms():
    loss, logits = torch.tensor(1.0), torch.zeros(2, 3)
    assert split_output({"loss": loss, "logits": logits})[1] == {"logits": logits}
    assert list(split_output((loss, logits, (logits, None)))[1]) == ["output[1]", "output[2][0]"]

    class Out:
        def __init__(self):
            self.loss, self.logits = loss, logits
    assert list(split_output(Out())[1]) == ["logits"]
    with pytest.raises(OutputError, match="no loss"):
        split_output({"logits": logits})


def test_split_output_hf_model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    loss, logits = torch.tensor(1.0), torch.zeros(2, 3)
    got = split_output(outputs.CausalLMOutputWithPast(loss=loss, logits=logits))
    assert got[0] is loss and list(got[1]) == ["logits"]


def test_a_float32_tensor_in_a_float64_case_is_held_to_float32_precision():
    tol = tolerance_for(torch.float64)
    ref32 = torch.tensor([4.0], dtype=torch.float32)
    assert check_tensor("loss", ref32 + 4e-7, ref32, tol).passed  # one float32 ulp of 4.0 is 4.8e-7
    assert not check_tensor("loss", ref32 + 1e-3, ref32, tol).passed


def test_a_float64_tensor_keeps_float64_precision_next_to_float32_ones():
    """Negative control for the rule above: float64 tensors are not held to the float32 entry."""
    tol = tolerance_for(torch.float64)
    ref = torch.tensor([4.0], dtype=torch.float64)
    assert check_tensor("grad w", ref + 1e-12, ref, tol).passed
    assert not check_tensor("grad w", ref + 1e-8, ref, tol).passed


def test_an_explicit_tolerance_applies_to_every_tensor_as_given():
    tol = tolerance_for(torch.float64, rtol=1e-12)
    ref32 = torch.tensor([4.0], dtype=torch.float32)
    assert not check_tensor("loss", ref32 + 4.8e-7, ref32, tol).passed
