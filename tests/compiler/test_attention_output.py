"""The attention output held once (``SPConfig(attention_output=...)``): its backward takes
rowsum(dO * O) from the all-to-all after it instead of a saved head-sharded copy. Exact, one
saved copy less per attention, H values per position more in the backward's all-to-all; and a
negative control (that value halved) the verifier fails."""
import os

import pytest

from autosp_verify.core import CaseSpec
from autosp_verify.impls import autosp_impl
from autosp_verify.run import run_case

from . import wide_head_models as m
BROKEN_AUTOSP = os.path.join(os.path.dirname(__file__), "..", "verify", "broken_autosp.py")

P, S = 2, 16


def _run(impl, inputs_fn=m.inputs_fn, memory=False):
    spec = CaseSpec(m.model_fn, impl, P, S, 2, "float64", 0, steps=1)
    result = run_case(spec, inputs_fn, "threaded", 120, diagnose=False, memory=memory)
    assert result.status != "error", result.error
    return result


def _memory(result):
    memory = result.accounting["memory"]
    return memory["activation_ratio"] * P, max(memory["rank_bytes"])


def test_held_once_is_exact_and_saves_one_copy():
    once = _run(autosp_impl(), memory=True)
    twice = _run(autosp_impl(attention_output="twice"), memory=True)
    assert once.passed and twice.passed, (once.failures[:3], twice.failures[:3])
    (once_ratio, once_bytes), (twice_ratio, twice_bytes) = _memory(once), _memory(twice)
    # One [B, H, S/P, D] output less per layer (float64), and the activations at 1/P.
    assert twice_bytes - once_bytes == m.LAYERS * 2 * m.HEADS * (S // P) * m.HEAD_DIM * 8, (once_bytes, twice_bytes)
    assert once_ratio <= 1.02, (once_ratio, twice_ratio)
    once_sent, twice_sent = (r.accounting["collectives"]["measured"]["bytes_handed"] for r in (once, twice))
    assert once_sent > twice_sent == twice.accounting["collectives"]["minimum"]["bytes_handed"]
    assert once_sent <= 1.02 * twice_sent  # D: one value per query head and position


def test_held_once_under_a_mask_is_exact():
    """Padding: autosp::masked_attention takes rowsum(dO * O) from the all-to-all too."""
    import autosp
    before = autosp.COUNTERS["attention_output_once"]
    result = _run(autosp_impl(), m.padded_inputs_fn)
    assert result.passed, result.failures[:3]
    assert autosp.COUNTERS["attention_output_once"] - before == m.LAYERS


def test_a_wrong_delta_is_caught():
    """Negative control: rowsum(dO * O) halved on its way back: the forward is untouched, every
    attention input's gradient is wrong, and the verifier says so."""
    import autosp
    before = autosp.COUNTERS["attention_output_once"]
    result = _run(f"{BROKEN_AUTOSP}:delta_halved")
    assert autosp.COUNTERS["attention_output_once"] - before == m.LAYERS  # the path the bug is planted in
    assert result.status == "fail", result.status
    failing = {t["name"] for t in result.tensors if not t["passed"]}
    assert failing and all(name.startswith("grad") for name in failing), failing


def test_held_once_after_a_model_of_another_head_width():
    """Dynamo makes HF's attention scale a symbolic float once it has seen two head widths in a
    process (one code object serves every HF model): the output is still held once (the query
    multiplied by the scale), and exact. This made the control above pass after other tests."""
    import torch

    import autosp
    from autosp_verify.run import verify_file
    torch._dynamo.reset()
    llama = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf_llama.py")
    assert verify_file(llama, impl="autosp-eager", world_size=P, seq_len=S, steps=1).passed  # head_dim 4
    before = autosp.COUNTERS["attention_output_once"]
    result = _run(autosp_impl("eager"))
    assert result.passed, result.failures[:3]
    assert autosp.COUNTERS["attention_output_once"] - before == m.LAYERS
