"""``autosp-verify MODEL.py --explore N``: a seeded Hypothesis search over (P, S, B) that shrinks a
failure to the smallest case and prints a command reproducing it.

The target bug (explore_impls.padded_labels_zero) pads the sequence to a multiple of P and pads
the labels with 0 instead of -100: exact whenever P divides S, wrong at every other length.
"""
import json
import os
import shlex

from autosp_verify import cli
from autosp_verify.explore import explore

from .conftest import HERE, TINY, broken, ulysses

EXPLORE_IMPLS = os.path.join(HERE, "explore_impls.py")
BUGGY = f"{EXPLORE_IMPLS}:padded_labels_zero"


def _reproduce(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("reproduce: ")]
    assert len(lines) == 1, out
    return lines[0].removeprefix("reproduce: ")


def test_shrinks_a_failure_at_lengths_p_does_not_divide_to_the_minimal_case(tmp_path, capsys):
    # Lengths from 2: the smallest case (P=2, S=2) passes, so the search has to find a failure and shrink it.
    report = tmp_path / "explore.json"
    argv = [TINY, "--impl", BUGGY, "--explore", "30", "--seq-len", "2,64", "--json", str(report)]
    assert cli.main(argv) == 1
    out = capsys.readouterr().out
    data = json.loads(report.read_text())
    explored = data["explore"]
    assert explored["minimal"] == {"world_size": 2, "seq_len": 3, "batch": 1, "dtype": "float64", "status": "fail"}
    first = explored["first_failure"]
    assert (first["world_size"], first["seq_len"], first["batch"]) > (2, 3, 1)  # found bigger, shrunk
    assert data["verdict"] == "fail" and [(c["world_size"], c["seq_len"], c["batch"]) for c in data["cases"]] == [
        (2, 3, 1)]
    assert "minimal failing case: P=2, S=3, B=1, float64 (shrunk from" in out and "FAIL" in out
    command = _reproduce(out)
    assert command == explored["reproduce"] == shlex.join(
        ["autosp-verify", TINY, "--impl", BUGGY, "--world-size", "2", "--seq-len", "3", "--batch", "1", "--dtype",
         "float64", "--simulator", "threaded", "--seed", "0"])
    assert cli.main(shlex.split(command)[1:]) == 1  # the printed command reproduces the failure
    assert "FAIL" in capsys.readouterr().out
    assert cli.main([TINY, "--impl", BUGGY, "--world-size", "2", "--seq-len", "4", "--batch", "1"]) == 0  # P | S: exact


def test_smallest_case_is_tried_first(capsys):
    # Lengths from 3: the very first case (P=2, S=3, B=1) fails already, nothing to shrink.
    assert cli.main([TINY, "--impl", BUGGY, "--explore", "30", "--seq-len", "3,64"]) == 1
    out = capsys.readouterr().out
    assert "1 distinct cases run (1 fail)" in out
    assert "minimal failing case: P=2, S=3, B=1, float64 (the first failing case found)" in out
    assert cli.main(shlex.split(_reproduce(out))[1:]) == 1


def test_correct_impl_no_failure_and_refusals_are_not_failures(tmp_path, capsys):
    # ulysses refuses lengths P does not divide: reported as unsupported, never as a failure.
    report = tmp_path / "explore.json"
    argv = [TINY, "--impl", ulysses(), "--explore", "5", "--world-size", "2", "--seq-len", "2,8", "--batch", "2",
            "--json", str(report)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "no failure in" in out and "(P in {2}, S in 2..8, B in 1..2, dtype float64)" in out
    assert "unsupported: the impl refused them; a refusal is not a failure" in out and "reproduce" not in out
    explored = json.loads(report.read_text())["explore"]
    assert explored["minimal"] is None and explored["reproduce"] is None and explored["unsupported_is_failure"] is False
    assert explored["counts"]["pass"] >= 1 and explored["counts"]["unsupported"] >= 1
    assert set(explored["counts"]) == {"pass", "unsupported"}


def test_refused_everywhere_exits_3_and_usage_errors_exit_2(capsys):
    assert cli.main([TINY, "--impl", broken("refuses"), "--explore", "3"]) == 3
    assert "nothing passed: verdict unsupported" in capsys.readouterr().out
    assert cli.main([TINY, "--impl", BUGGY, "--explore", "0"]) == 2
    assert cli.main([TINY, "--impl", BUGGY, "--explore", "3", "--explore-dtypes", "float8"]) == 2
    assert cli.main([TINY, "--impl", "no_such_impl", "--explore", "3"]) == 2
    assert "unknown impl" in capsys.readouterr().err


def test_same_seed_same_search_and_minimal_case():
    def draws(seed):  # the correct padded impl: nothing fails, every case drawn is run
        result = explore(TINY, f"{EXPLORE_IMPLS}:padded", 5, world_sizes=(2,), min_seq_len=2, max_seq_len=8,
                         max_batch=2, seed=seed)
        assert result.failure is None
        return list(result.statuses)

    assert draws(7) == draws(7)
    minimal = [explore(TINY, BUGGY, 10, world_sizes=(2,), min_seq_len=2, max_seq_len=12, max_batch=2, seed=3,
                       diagnose_minimal=False).reproduce() for _ in range(2)]
    assert minimal[0] == minimal[1] and "--world-size 2 --seq-len 3 --batch 1" in minimal[0]
    assert "--seed 3" in minimal[0]


def test_cases_the_model_cannot_run_are_counted_not_failures(tmp_path, capsys):
    model = tmp_path / "short_model.py"  # the tiny model, refusing sequences shorter than 3 tokens
    model.write_text(f"exec(compile(open({TINY!r}).read(), {TINY!r}, 'exec'))\n_inputs_fn = inputs_fn\n\n\n"
                     "def inputs_fn(batch, seq_len, generator):\n    if seq_len < 3:\n"
                     "        raise ValueError(f'seq_len={seq_len}: too short')\n"
                     "    return _inputs_fn(batch, seq_len, generator)\n")
    padded = f"{EXPLORE_IMPLS}:padded"
    assert cli.main([str(model), "--impl", padded, "--explore", "4", "--world-size", "2", "--seq-len", "6",
                     "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "model-invalid: the model itself cannot run them on one device (not a failure)" in out
    assert "too short" in out and "no failure in" in out
    assert cli.main([str(model), "--impl", padded, "--explore", "3", "--seq-len", "2"]) == 2  # nothing runnable
    assert "fails on one device in every case tried" in capsys.readouterr().err
