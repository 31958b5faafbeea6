"""End to end on the threaded simulator: a known-good impl verifies exact, broken ones are caught,
refusals and crashes are classified, a failing or hung rank ends the run fast, nothing leaks."""
import time

import pytest
import torch

from autosp_verify import verify, verify_file

from .conftest import TINY, broken, ulysses
from .tiny_model import inputs_fn, model_fn
from .ulysses_impls import per_rank_mean, shard_then_shift, skip_output_a2a
from .ulysses_impls import ulysses as ulysses_impl


@pytest.mark.parametrize("world_size,seq_len", [(2, 16), (4, 16), (4, 24)])
def test_ulysses_is_exact_in_float64(world_size, seq_len):
    r = verify(model_fn, inputs_fn, impl=ulysses_impl, world_size=world_size, seq_len=seq_len)
    assert r.status == "pass", r
    assert r.loss_abs_err <= 1e-10 * 4 and r.max_grad_rel_err <= 1e-10


def test_ulysses_is_exact_in_float32():
    r = verify(model_fn, inputs_fn, impl=ulysses_impl, world_size=2, dtype=torch.float32)
    assert r.status == "pass", r


@pytest.mark.parametrize("impl,expect", [
    (skip_output_a2a, "logits"),  # (1) no all-to-all after attention: outputs are scrambled
    (per_rank_mean, "differs across ranks"),  # (2) each rank's own mean
    (shard_then_shift, "loss"),  # (3) labels sharded before the shift: boundary targets lost
])
def test_negative_controls_are_reported_as_mismatches(impl, expect):
    r = verify(model_fn, inputs_fn, impl=impl, world_size=2)
    assert r.status == "fail" and not r.passed
    assert any(expect in f for f in r.failures), r.failures
    assert r.max_grad_rel_err > 1e-3  # the numbers are in the report


def test_replicated_outputs_are_compared_on_every_rank():
    assert verify_file(TINY, impl=broken("replicated"), world_size=2).status == "pass"


def test_refusal_is_unsupported_with_its_message():
    r = verify_file(TINY, impl=ulysses(), world_size=4, seq_len=18)  # 18 % 4 != 0
    assert r.status == "unsupported" and "not divisible by 4" in r.error
    r = verify_file(TINY, impl=broken("refuses_autosp_error"), world_size=2)
    assert r.status == "unsupported" and "head count" in r.error


def test_crash_is_an_error_naming_rank_and_exception():
    r = verify_file(TINY, impl=broken("crash_at_prepare"), world_size=2)
    assert r.status == "error" and r.error == "rank 1 (prepare): ValueError: cannot prepare on rank 1"


def test_rank_raising_in_a_collective_ends_the_run_fast():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("raise_in_collective"), world_size=4, timeout=60)
    assert time.monotonic() - start < 15
    assert r.status == "error" and "rank 1" in r.error and "boom on rank 1" in r.error


def test_mismatched_collectives_end_the_run():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("mismatched_collectives"), world_size=2, timeout=10)
    assert time.monotonic() - start < 15 and r.status == "error" and "rank" in r.error


def test_rank_that_never_joins_times_out_then_next_run_works():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("never_joins"), world_size=2, timeout=2)
    assert time.monotonic() - start < 10
    assert r.status == "error" and r.error.startswith("timed out after 2 s")
    assert "rank 1 never joined all_reduce; rank 0 is waiting in all_reduce [1] float32" in r.error
    # The abandoned threads must not poison the next run's process group.
    assert verify(model_fn, inputs_fn, impl=ulysses_impl, world_size=2).status == "pass"


def test_leftover_ranks_never_reach_the_next_run():
    from .broken_impls import STRAGGLER_GO, releasing_straggler, straggler
    STRAGGLER_GO.clear()
    assert verify(model_fn, inputs_fn, impl=straggler, world_size=2).status == "error"
    # Rank 0 of that run is still alive; the next run settles it before starting, and releasing it
    # afterwards (it would all-reduce on its old group) changes nothing.
    r = verify(model_fn, inputs_fn, impl=releasing_straggler(ulysses_impl), world_size=2, timeout=20)
    assert r.status == "pass", r


def _a_compiling_leftover(monkeypatch, stop_compiles: bool):
    from autosp_verify.simulators import threaded
    from .broken_impls import COMPILE_OUTCOME, COMPILE_STARTED, compiling_straggler
    COMPILE_STARTED.clear()
    COMPILE_OUTCOME.clear()
    if stop_compiles:  # negative control: the settling that stopped every leftover at once
        monkeypatch.setattr(threaded, "compiling", lambda ident: False)
    assert verify(model_fn, inputs_fn, impl=compiling_straggler, world_size=2).status == "error"
    assert verify(model_fn, inputs_fn, impl=ulysses_impl, world_size=2).status == "pass"
    return COMPILE_OUTCOME


def test_a_leftover_rank_inside_torch_compile_is_left_to_finish(monkeypatch):
    """A SystemExit landing inside Dynamo can abort the process (it took down a CI worker)."""
    assert _a_compiling_leftover(monkeypatch, stop_compiles=False) == ["finished"]


def test_negative_control_a_leftover_stopped_mid_compile_is_seen(monkeypatch):
    assert _a_compiling_leftover(monkeypatch, stop_compiles=True) == ["SystemExit"]


def _group_name(ctx, payload):
    return ctx.group.group_name


def test_every_run_gets_its_own_group_name():
    """So a rank thread that outlived its run can never join the collectives of a later run."""
    from autosp_verify.simulators import get_simulator
    sim = get_simulator("threaded")
    first, second = sim.run(2, _group_name, None, 10), sim.run(2, _group_name, None, 10)
    assert len(set(first)) == 1 and len(set(second)) == 1 and first[0] != second[0]


def test_user_model_and_weights_are_unchanged():
    shared = model_fn()  # a model_fn that hands out one shared module
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    for impl in (ulysses_impl, broken("rank_mutates_weights")):
        verify(lambda: shared, inputs_fn, impl=impl, world_size=2)
    after = shared.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert next(shared.parameters()).dtype == torch.float32 and shared.training


def test_caller_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    verify(model_fn, inputs_fn, impl=ulysses_impl, world_size=2)
    assert torch.equal(torch.rand(3), expected)
