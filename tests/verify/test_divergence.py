"""First divergence: a failing case names the first op (or module) that parts from one device.

Negative controls: every broken impl below fails, and the reported first divergence names the
op where the bug is; a correct impl, recorded the same way, has no divergent value at all (so
the instrument does not point at innocent ops, e.g. padded shards or partial sums).
"""
import json

import pytest
import torch

from autosp_verify.cli import main
from autosp_verify.compare import tolerance_for
from autosp_verify.core import CaseSpec, build_case, model_functions
from autosp_verify.run import Case, _diagnose, verify_file
from autosp_verify.simulators import get_simulator

from .conftest import HERE, TINY, ulysses

LLAMA_STYLE = f"{HERE}/../../fixtures/llama_style.py"
BROKEN_AUTOSP = f"{HERE}/broken_autosp.py"

# Module level (hand-written impls, forward hooks on named modules), one per bug kind.
MODULE_CASES = [
    ("wrong_gather_dim", "forward", "blocks.0.attn.out (input)", "Attention.forward of blocks.0.attn"),
    ("skip_output_a2a", "forward", "blocks.0.attn.out (input)", "Attention.forward of blocks.0.attn"),
    ("per_rank_mean", "forward", "(step loss)", "the loss the step returns"),
    ("shard_then_shift", "forward", "(step loss)", "the loss the step returns"),
    ("local_positions", "forward", "pos", "Embedding.forward"),
    ("no_grad_all_to_all", "forward", "blocks.0.attn.out (input)", "no gradient can flow back"),
]


@pytest.mark.parametrize("impl,phase,name,where", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_level_first_divergence_names_the_module(impl, phase, name, where):
    result = verify_file(TINY, impl=ulysses(impl), world_size=2, seq_len=16)
    assert result.status == "fail"
    first = result.first_divergence
    assert (first["phase"], first["name"]) == (phase, name), first["message"]
    assert where in first["message"]
    assert result.divergence_trace and result.divergence_trace[0]["rel_err"] == 0.0


def test_shards_that_do_not_add_up_are_named_where_they_start():
    """S=13 over 2 ranks, the last position dropped: the first module's output already holds 12 of
    13 positions (not skipped as impossible to put together, which left the loss to be named)."""
    result = verify_file(TINY, impl=ulysses("truncated_tail"), world_size=2, seq_len=13)
    assert result.status == "fail"
    first = result.first_divergence
    assert "do not add up" in first["message"] and "12 of the reference's 13" in first["message"], first
    assert first["name"] != "(step loss)", first


def test_a_value_broadcast_over_the_batch_is_put_together_and_named():
    """Positions from the local length as one [1, S/P] row: the position table on a rank is
    [1, S/P, H] against the reference's [B, S, H]. Expanded over the batch it is compared, and
    named, instead of skipped (which left the first block to be named)."""
    result = verify_file(TINY, impl=ulysses("broadcast_local_positions"), world_size=2, seq_len=16)
    first = result.first_divergence
    assert result.status == "fail" and first["name"] == "pos", first["message"]
    assert first["rank_shapes"] == [[1, 8, 16]] and first["reference_shape"] == [2, 16, 16]


def test_a_value_whose_shards_cannot_be_put_together_is_named_with_the_divergence():
    """Positions as a vector: the table is [S/P, H] on a rank against [B, S, H]. Nothing says how
    to compare it, so the first block is named, and the message names the table and its shapes."""
    result = verify_file(TINY, impl=ulysses("flat_local_positions"), world_size=2, seq_len=16)
    first = result.first_divergence
    assert result.status == "fail", result.failures
    assert first["not_compared"] == "pos (rank shapes [(8, 16)], reference (2, 16, 16))", first["message"]


def test_a_bug_only_in_a_parameter_gradient_is_named_as_such():
    result = verify_file(TINY, impl=f"{HERE}/verdict_impls.py:doubled_head_grad", world_size=2, seq_len=16)
    assert result.status == "fail"
    message = result.first_divergence["message"]
    assert "only parameter gradients differ (grad head.weight)" in message, message


def test_a_decorated_forward_is_located_at_the_model_line():
    """A forward under a decorator from another file (torch's) is located at the model's line."""
    from autosp_verify.divergence import _module_source

    class Decorated(torch.nn.Module):
        @torch.no_grad()
        def forward(self, x):
            return x

    assert "test_divergence.py" in _module_source(Decorated()), _module_source(Decorated())


@pytest.mark.multiproc
def test_first_divergence_on_gloo_processes():
    """The ranks' recordings travel back through torch.load(weights_only=True) as plain data."""
    impl, phase, name, where = MODULE_CASES[0]
    result = verify_file(TINY, impl=ulysses(impl), world_size=2, seq_len=16, simulator="gloo")
    assert result.status == "fail"
    first = result.first_divergence
    assert (first.get("phase"), first.get("name")) == (phase, name), first["message"]


# Op level (autosp pipelines with one rewrite broken; the rewritten graph is recorded node by node).
OP_CASES = [
    ("per_rank_loss", "cross_entropy", "F.cross_entropy("),
    ("detached_all_to_all", "seq_to_head.default", "no gradient can flow back"),
    ("head_size_all_to_all", "scaled_dot_product_attention", "F.scaled_dot_product_attention("),
]


@pytest.mark.parametrize("impl,op,where", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_level_first_divergence_names_the_op_and_line(impl, op, where):
    result = verify_file(LLAMA_STYLE, impl=f"{BROKEN_AUTOSP}:{impl}", world_size=2, seq_len=12)
    assert result.status == "fail"
    first = result.first_divergence
    assert first["phase"] == "forward" and first["op"] == op, first["message"]
    assert where in first["message"] and "llama_style.py" in first["source"]


def test_a_correct_impl_recorded_op_by_op_has_no_divergent_value():
    """The control for the controls: padded shards (S=13, P=4), head all-to-alls and the partial
    loss sums of a correct rewrite are all put back together and match, forward and backward."""
    spec = CaseSpec(LLAMA_STYLE, "autosp-eager", 4, 13, 2, "float64", 0)
    model_fn, inputs_fn = model_functions(spec.model)
    base, batch = build_case(model_fn, inputs_fn, spec)
    case = Case(spec, get_simulator("threaded"), base, batch, inputs_fn, tolerance_for(torch.float64), 120)
    first, trace = _diagnose(case)
    assert "every recorded intermediate value and gradient matches" in first["message"]
    ops = {e["op"] for e in trace}
    assert {"seq_to_head.default", "head_to_seq.default", "scaled_dot_product_attention"} <= ops
    assert {e["phase"] for e in trace} == {"forward", "backward"} and len(trace) > 100
    assert max(e["rel_err"] for e in trace if e["rel_err"] is not None) < 1e-12


def test_first_divergence_in_the_table_and_the_json(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([TINY, "--impl", ulysses("local_positions"), "--json", str(report)]) == 1
    assert "first divergence: value of pos (Embedding)" in capsys.readouterr().out
    case = json.loads(report.read_text())["cases"][0]
    assert case["first_divergence"]["name"] == "pos" and case["divergence_trace"]


def test_a_passing_case_is_not_diagnosed():
    result = verify_file(TINY, impl=ulysses(), world_size=2, seq_len=16)
    assert result.status == "pass" and result.first_divergence is None and not result.divergence_trace
