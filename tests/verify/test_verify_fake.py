"""The fake process group: large P, shapes only, always labelled structural, never a numeric pass."""
import json
import os

import pytest
import torch

from autosp_verify import verify, verify_file
from autosp_verify.cli import main
from autosp_verify.compare import check_structure
from autosp_verify.core import Reference

from . import wide64_model
from .conftest import HERE, WIDE, broken, ulysses


def test_p16_runs_structurally_and_is_labelled_so(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([WIDE, "--impl", ulysses(), "--simulator", "fake", "--world-size", "16", "--seq-len", "64",
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    case = data["cases"][0]
    assert data["verdict"] == "structural" and case["status"] == "structural"
    assert case["structural"] is True and case["passed"] is False  # never claims numeric equivalence
    assert case["loss_abs_err"] is None and case["max_grad_rel_err"] is None
    assert "STRUCTURAL" in capsys.readouterr().out


def test_structural_check_catches_bad_shapes():
    r = verify_file(WIDE, impl=broken("bad_shape"), simulator="fake", world_size=16, seq_len=64)
    assert r.status == "fail" and any("output logits" in f for f in r.failures)


def test_a_numerically_wrong_impl_is_still_only_structural():
    # Fake collectives cannot see numbers: this is why the label matters.
    r = verify_file(WIDE, impl=ulysses("per_rank_mean"), simulator="fake", world_size=16, seq_len=64)
    assert r.status == "structural" and not r.passed


def test_crash_at_large_p_is_an_error_naming_the_rank():
    r = verify_file(WIDE, impl=ulysses(), simulator="fake", world_size=64, seq_len=64)  # 16 heads < 64 ranks
    assert r.status == "error" and r.error.startswith("rank 0 (step):")


# --- P=64: shapes and collective counts, never numerics ------------------------------------------

WIDE64 = os.path.join(HERE, "wide64_model.py")
STRUCTURAL_IMPLS = os.path.join(HERE, "structural_impls.py")
# Per rank, forward and backward: 4 + 4 all-to-alls per attention layer, 1 all-reduce (the loss).
ULYSSES_COUNTS = {"all_to_all": 8 * wide64_model.LAYERS, "all_reduce": 1}


def _kinds(counts):
    return {k: n for k, n in counts.items() if not k.endswith("_bytes")}


def test_p64_cli_prints_structural_rows_with_the_collectives_of_every_rank_run(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([WIDE64, "--impl", "autosp-eager", "--simulator", "fake", "--world-size", "64",
                 "--seq-len", "100,128", "--json", str(report)]) == 0  # 64 does not divide 100
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("autosp-eager")]
    assert len(rows) == 2 and all(row.endswith("STRUCTURAL") for row in rows)
    line = f"collectives per rank (autosp's ops, ranks 0, 63): all_reduce 1, all_to_all {ULYSSES_COUNTS['all_to_all']}"
    assert out.count(line) == 2
    for case in json.loads(report.read_text())["cases"]:
        assert case["status"] == "structural" and not case["passed"] and case["loss_abs_err"] is None
        per_rank = case["structural_collectives"]
        assert list(per_rank) == ["0", "63"]  # the ranks the fake simulator runs
        assert all(_kinds(c) == ULYSSES_COUNTS for c in per_rank.values())
        assert per_rank["0"] == per_rank["63"]  # bytes included


@pytest.mark.slow
def test_p64_autosp_aot_eager_is_structural_with_the_ulysses_counts():
    for seq_len in (100, 128):
        r = verify_file(WIDE64, impl="autosp", simulator="fake", world_size=64, seq_len=seq_len)
        assert r.status == "structural", (seq_len, r.error, r.failures)
        assert [_kinds(c) for c in r.structural_collectives.values()] == [ULYSSES_COUNTS] * 2


def test_p64_gqa_with_8_kv_heads_is_structural():
    # 64 query heads over 64 ranks, 8 kv heads: each rank gets the one kv head of its query head.
    r = verify(wide64_model.gqa_model_fn, wide64_model.inputs_fn, impl="autosp-eager", simulator="fake",
               world_size=64, seq_len=100)
    assert r.status == "structural", (r.error, r.failures)
    assert [_kinds(c) for c in r.structural_collectives.values()] == [ULYSSES_COUNTS] * 2


@pytest.mark.parametrize("name,expect", [
    ("extra_collective_on_last_rank", "rank 0: all_reduce 1 (8 B), all_to_all 8 (32768 B); rank 63: all_reduce 2 (12 B)"),
    ("other_shape_on_last_rank", "rank 0: all_reduce 2 (12 B), all_to_all 8 (32768 B); rank 63: all_reduce 2 (16 B)"),
])
def test_p64_ranks_that_issue_different_collectives_fail_structurally(name, expect):
    # The fake group completes any collective, so the run ends; only the counts tell the ranks apart.
    r = verify_file(WIDE64, impl=f"{STRUCTURAL_IMPLS}:{name}", simulator="fake", world_size=64, seq_len=100)
    assert r.status == "fail" and len(r.failures) == 1, (r.error, r.failures)
    assert r.failures[0].startswith("ranks issue different collectives") and expect in r.failures[0]


def test_p64_a_wrongly_shaped_gradient_fails_structurally():
    r = verify_file(WIDE64, impl=f"{STRUCTURAL_IMPLS}:grad_shape_on_last_rank", simulator="fake", world_size=64,
                    seq_len=100)
    assert r.status == "fail" and r.failures == ["rank 63: grad norm.weight has shape (1, 128), parameter (128,)"]
    assert r.structural_collectives is None  # no autosp op ran: nothing counted, nothing claimed


def test_check_structure_compares_the_collectives_of_the_ranks_run():
    ref = Reference(torch.zeros(()), {}, {})
    same = {"all_to_all": 2, "all_to_all_bytes": 64}

    def rank(counts):
        return {"loss": torch.zeros(()), "outputs": {}, "grads": {}, "structural_collectives": counts}
    assert check_structure(ref, [rank(same), None, rank(dict(same))]) == []
    assert check_structure(ref, [rank(None), None, rank({})]) == []  # nothing counted: nothing to compare
    expected = ("ranks issue different collectives (autosp's ops, forward and backward): "
                "rank 0: all_to_all 2 (64 B); rank 2: none")
    assert check_structure(ref, [rank(same), None, rank({})]) == [expected]
