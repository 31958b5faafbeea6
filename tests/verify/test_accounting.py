"""Accounting (autosp_verify/accounting.py): collectives against the Ulysses minimum, activation
memory per rank against one device, and the report's figure, each with a negative control."""
import dataclasses
import json
import os

import pytest
import torch

from autosp_verify import accounting, figure
from autosp_verify.cli import main
from autosp_verify.core import CaseSpec
from autosp_verify.report import CaseResult, format_table
from autosp_verify.run import run_case

from .conftest import HERE, TINY, ulysses

HF_LLAMA = os.path.join(HERE, "..", "..", "fixtures", "hf_llama.py")
IMPLS = os.path.join(HERE, "accounting_impls.py")


def _case(model, impl, world_size, seq_len, **kwargs):
    return run_case(CaseSpec(os.path.abspath(model), impl, world_size, seq_len, 2, "float64", 0), None, **kwargs)


def _call(q, k, heads_kv=None, gqa=False, itemsize=8):
    return {"q": q, "k": k, "v": k, "enable_gqa": gqa, "itemsize": itemsize, "kv_heads": heads_kv or k[-3]}


@pytest.mark.parametrize("q_heads,kv_heads,P,S,kv_sent", [
    (8, 8, 2, 16, 8),  # MHA: every head
    (8, 2, 2, 16, 2),  # P divides the kv heads: no repetition
    (8, 2, 4, 16, 4),  # kv heads divide P: one kv head per rank
    (8, 1, 4, 16, 4),  # MQA
    (6, 2, 4, 16, 8),  # P does not divide the query heads: padded to 8, kv repeated as far
    (8, 8, 2, 13, 8),  # padded sequence: L = 7
])
def test_minimum_formula(q_heads, kv_heads, P, S, kv_sent):
    B, D = 2, 4
    L, q_sent = -(-S // P), -(-q_heads // P) * P
    got = accounting.ulysses_minimum([_call((B, q_heads, S, D), (B, kv_heads, S, D))], 4, P)
    per_head = B * L * D * 8
    assert got["all_to_all"] == 8 and got["all_reduce"] == 1 and got["all_reduce_bytes"] == 4
    assert got["all_to_all_bytes"] == 2 * per_head * (2 * q_sent + 2 * kv_sent)
    assert accounting.bytes_sent({"all_to_all_bytes": 100, "all_reduce_bytes": 8}, 4) == 75 + 12


def test_repeated_kv_heads_count_once():
    """HF's repeat_kv hands SDPA copies of the kv heads: the minimum counts the distinct ones."""
    k = torch.randn(2, 2, 16, 4)
    call = accounting._sdpa_call(torch.randn(2, 8, 16, 4), k.repeat_interleave(4, 1), k.repeat_interleave(4, 1), False)
    assert call["kv_heads"] == 2
    assert accounting._sdpa_call(torch.randn(2, 8, 16, 4), *torch.randn(2, 2, 8, 16, 4), False)["kv_heads"] == 8


def test_classify_by_the_dims_that_grow():
    at_s = [((32, 32), 8), ((2, 16, 16), 4), ((), 1)]  # B*S = hidden: sizes alone cannot tell
    at_s2 = [((36, 32), 9), ((2, 18, 18), 5), ((), 1)]
    assert accounting.classify(at_s, at_s2) == {"seq": 8, "seq2": 4, "other": 1, "total": 13}
    assert accounting.classify(at_s, at_s2[:2]) is None


def test_hf_llama_collectives_at_the_ulysses_count_and_memory_at_1_over_p():
    """HF Llama (8 query heads, 2 kv heads): per rank, the Ulysses number of collectives at P=2
    and 4, and sequence-long activations within 10% of 1/P of one device."""
    for P in (2, 4):
        acc = _case(HF_LLAMA, "autosp-eager", P, 16, memory=True).accounting
        coll, mem = acc["collectives"], acc["memory"]
        low, got = coll["minimum"], coll["measured"]
        assert (got["all_to_all"], got["all_reduce"]) == (low["all_to_all"], low["all_reduce"]) == (16, 1)
        # With its default cache HF calls SDPA with is_causal and enable_gqa (no repeat_kv): autosp
        # moves the 2 (P=2) or 4 (P=4) kv heads Ulysses needs, not 8.
        assert got["bytes_handed"] == low["bytes_handed"]
        assert abs(mem["ratio"] - 1 / P) <= 0.1 / P, mem
        assert mem["baseline"].startswith("torch.compile(backend='eager')")


def test_tiny_model_at_the_minimum_and_a_wasteful_impl_above_it():
    at_min = _case(TINY, "autosp-eager", 2, 16).accounting["collectives"]
    assert at_min["at_minimum"] and at_min["measured"]["bytes_sent"] == at_min["minimum"]["bytes_sent"]
    wasteful = _case(TINY, f"{IMPLS}:twice", 2, 16)
    assert wasteful.status == "pass"
    coll = wasteful.accounting["collectives"]
    assert not coll["at_minimum"] and coll["measured"]["all_to_all"] == 24 and coll["measured"]["all_reduce"] == 2
    assert "24/1 (16/1)" not in format_table([wasteful]) and "24/2 (16/1)" in format_table([wasteful])


def test_a_replicated_impl_holds_everything_and_counts_nothing():
    r = _case(TINY, f"{IMPLS}:replicated", 2, 16, memory=True)
    assert r.status == "pass"
    assert r.accounting["collectives"]["measured"] is None  # not an autosp step: not counted
    assert r.accounting["memory"]["ratio"] == pytest.approx(1.0, abs=0.02)
    sharded = _case(TINY, ulysses(), 2, 16, memory=True).accounting["memory"]
    assert abs(sharded["ratio"] - 0.5) <= 0.05


def test_the_memory_column_counts_masks_and_marks_a_rank_holding_one():
    """One device (compiled, as HF under torch.compile) holds a bool [B, 1, S, S] mask; autosp's
    ranks hold none, and the column's ratio counts it on both sides. Negative control: a mask the
    caller passes whole is held by every rank: the row says "+[S,S]"."""
    padded = _case(os.path.join(HERE, "..", "..", "fixtures", "hf_olmo2_padded.py"), "autosp", 2, 24, memory=True)
    mem = padded.accounting["memory"]
    assert padded.status == "pass" and mem["reference"]["seq2"] > 0 and mem["rank_seq2_bytes"] == 0
    with_masks = max(r["seq"] + r["seq2"] for r in mem["ranks"]) / (mem["reference"]["seq"] + mem["reference"]["seq2"])
    assert mem["ratio"] == with_masks <= 1.15 / 2
    assert "+[S,S]" not in format_table([padded])
    whole = _case(os.path.join(HERE, "square_mask_model.py"), "autosp", 2, 24, memory=True)
    assert whole.status == "pass" and whole.accounting["memory"]["rank_seq2_bytes"] > 0
    assert "+[S,S]" in format_table([whole])


def test_report_dir_writes_json_and_a_png(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main([TINY, "--impl", ulysses(), "--world-size", "2,4", "--report", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "a2a/ar (min)" in header and "mem/rank (1/P)" in header and header.rstrip().endswith("verdict")
    cases = json.loads((out / "report.json").read_text())["cases"]
    assert [c["accounting"]["memory"]["ratio"] is not None for c in cases] == [True, True]
    _assert_png(out / "accounting.png")


def test_png_with_the_error_of_each_op_of_a_failing_case(tmp_path):
    failing = CaseResult("x", "threaded", 2, 16, 2, "float64", "fail")
    failing.divergence_trace = [{"name": f"op{i}", "phase": "forward" if i < 5 else "backward",
                                 "rel_err": 10.0 ** (i - 12) if i else 0.0} for i in range(9)] + \
        [{"name": "inf", "phase": "backward", "rel_err": float("inf")}]
    _assert_png(figure.write_png([failing], str(tmp_path / "f.png")))


def _assert_png(path):
    import matplotlib.image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(str(path)).shape[0] > 100


def test_fake_simulator_counts_the_ranks_it_runs():
    """The fake simulator runs rank 0 and the last rank only: both counted, at the minimum."""
    r = _case(TINY, "autosp-eager", 4, 32, simulator="fake")
    assert r.status == "structural" and r.accounting["collectives"]["at_minimum"], r.accounting
    assert len(r.accounting["collectives"]["per_rank"]) == 2


def test_compile_time_is_the_median_of_alternating_pairs():
    """--compile-time: both sides per pair, the ratio the median of the pairs' ratios (one compile
    moves +-25% between runs); not measured for impls that are not autosp.compile."""
    from autosp_verify.core import build_case, model_functions
    spec = CaseSpec(TINY, "autosp-eager", 2, 8, 2, "float64", 0)  # Dynamo and the passes, no AOTAutograd: cheap
    base, batch = build_case(*model_functions(TINY), spec)
    times = accounting.compile_times(spec, base, batch, pairs=3)
    assert len(times["each_pair"]) == 3 and min(times["each_pair"]) > 0
    assert times["ratio"] == sorted(times["each_pair"])[1]
    assert times["with_passes"] > 0 and times["without"] > 0 and times["backend"] == "eager"
    assert accounting.compile_times(dataclasses.replace(spec, impl=ulysses()), base, batch) is None
    case = CaseResult("autosp-eager", "threaded", 2, 8, 2, "float64", status="pass",
                      accounting={"collectives": None, "compile_s": times})
    assert f"({times['without']:.1f}) {times['ratio']:.2f}x" in format_table([case])
