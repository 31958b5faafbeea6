"""The command: exit statuses, the table, the JSON report, and short messages for bad model files."""
import json
import textwrap

import pytest

from autosp_verify.cli import main, parse_args

from .conftest import TINY, broken, ulysses

GOOD_FNS = "def inputs_fn(b, s, g):\n    return {}\n"


@pytest.mark.parametrize("body,expect", [
    (None, "no such file"),
    ("def model_fn(:\n", "syntax error"),
    ("import no_such_module_xyz\n", "failed to import: ModuleNotFoundError"),
    (GOOD_FNS, "does not define model_fn()"),
    ("def model_fn():\n    raise RuntimeError('bad init')\n" + GOOD_FNS, "model_fn() raised RuntimeError: bad init"),
    ("def model_fn():\n    return 3\n" + GOOD_FNS, "not an nn.Module"),
    ("import torch\ndef model_fn():\n    return torch.nn.Linear(2, 2)\n" + GOOD_FNS, "fails on one device"),
    (textwrap.dedent("""
        import torch
        class M(torch.nn.Module):
            def forward(self):
                return {"logits": torch.zeros(1)}
        def model_fn():
            return M()
        """) + GOOD_FNS, "no loss"),
])
def test_bad_model_file_exits_2_with_a_short_message(tmp_path, capsys, body, expect):
    path = tmp_path / "model.py"
    if body is not None:
        path.write_text(body)
    assert main([str(path), "--impl", ulysses()]) == 2
    err = capsys.readouterr().err.strip()
    assert expect in err and str(path) in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_pass_prints_a_row_per_case_and_writes_json(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([TINY, "--impl", ulysses(), "--world-size", "2,4", "--seq-len", "16,24", "--json", str(report)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 6 and out[-1].startswith("verdict: pass (4 cases: 4 pass)")
    assert all(line.rstrip().endswith("PASS") for line in out[1:5])
    data = json.loads(report.read_text())
    assert data["verdict"] == "pass" and len(data["cases"]) == 4
    case = data["cases"][0]
    assert {"impl", "simulator", "world_size", "seq_len", "batch", "dtype", "passed", "structural", "loss_abs_err",
            "max_grad_rel_err", "worst_tensor", "error"} <= case.keys()
    assert case["passed"] is True and case["structural"] is False and case["worst_tensor"]["name"]


def test_mismatch_exits_1_and_names_the_worst_gradient(tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main([TINY, "--impl", ulysses("per_rank_mean"), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "verdict: fail" in out
    case = json.loads(report.read_text())["cases"][0]
    assert case["passed"] is False and case["max_grad_rel_err"] > 0.1 and case["worst_grad"]["name"] in out


def test_crash_exits_1(capsys):
    assert main([TINY, "--impl", broken("crash_at_prepare")]) == 1
    assert "rank 1 (prepare): ValueError" in capsys.readouterr().out


def test_refusal_exits_3(capsys):
    assert main([TINY, "--impl", broken("refuses")]) == 3
    assert "verdict: unsupported" in capsys.readouterr().out


def test_timeout_flag(capsys):
    assert main([TINY, "--impl", broken("never_joins"), "--timeout", "1"]) == 1
    assert "timed out after 1 s" in capsys.readouterr().out


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main([TINY, "--world-size", "two"]) == 2
    assert main([TINY, "--simulator", "mpi"]) == 2
    assert main([TINY, "--impl", "no_such_impl"]) == 2
    assert main([TINY, "--impl", "no.such.module:fn"]) == 2
    assert "cannot import no.such.module" in capsys.readouterr().err


def test_tolerance_overrides_reach_the_comparison(capsys):
    # An absurd rtol makes a broken impl pass: the flag is wired through (tests never loosen).
    assert main([TINY, "--impl", ulysses("shard_then_shift"), "--rtol", "1e3"]) == 0
    config = parse_args([TINY, "--rtol", "1e-3", "--atol", "0"])
    assert (config.rtol, config.atol, config.world_sizes, config.impl) == (1e-3, 0.0, (2,), "autosp")


@pytest.mark.parametrize("flags, named", [
    (["--timeout", "0"], "--timeout"), (["--timeout", "-5"], "--timeout"), (["--timeout", "nan"], "--timeout"),
    (["--timeout", "inf"], "--timeout"), (["--rtol", "-1"], "--rtol"), (["--rtol", "nan"], "--rtol"),
    (["--atol", "inf"], "--atol"), (["--seed", "1e23"], "--seed"), (["--seed", str(2 ** 70)], "--seed"),
    (["--steps", "0"], "--steps"), (["--json", "/no/such/folder/r.json"], "--json"),
    (["--junit-xml", "/no/such/folder/r.xml"], "--junit-xml"), (["--explore", "3", "--memory"], "--memory"),
    (["--explore", "3", "--junit-xml", "r.xml"], "--junit-xml"),
])
def test_flags_are_checked_before_any_work(flags, named, capsys):
    """Exit 2 naming the flag, before a model is loaded (no table is printed)."""
    assert main([TINY, *flags]) == 2
    out = capsys.readouterr()
    assert named in out.err and "impl" not in out.out, (out.out, out.err)


def test_model_files_load_as_scripts(tmp_path, capsys):
    """A neighbour module imported at load, and argparse at import reading its own argv."""
    (tmp_path / "helper_module_for_model.py").write_text(
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('tiny_for_model', {TINY!r})\n"
        "tiny = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(tiny)\n")
    (tmp_path / "model.py").write_text(textwrap.dedent("""
        import argparse
        args = argparse.ArgumentParser().parse_args()  # sees [this file], not the verifier's flags
        from helper_module_for_model import tiny
        model_fn, inputs_fn = tiny.model_fn, tiny.inputs_fn
    """))
    assert main([str(tmp_path / "model.py"), "--impl", "autosp-eager", "--world-size", "2"]) == 0
    (tmp_path / "model.txt").write_text("")
    assert main([str(tmp_path / "model.txt")]) == 2
    assert "not a .py file" in capsys.readouterr().err
