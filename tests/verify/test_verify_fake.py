"""The fake process group: large P, shapes only, always labelled structural, never a numeric pass."""
import json

from autosp_verify import verify_file
from autosp_verify.cli import main

from .conftest import WIDE, broken, ulysses


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
