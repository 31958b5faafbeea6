"""The same cases on real processes over gloo: same verdicts, same error sizes, bounded failures."""
import time

import pytest

from autosp_verify import verify_file

from .conftest import TINY, broken, ulysses

pytestmark = pytest.mark.multiproc


def test_ulysses_is_exact_on_gloo():
    r = verify_file(TINY, impl=ulysses(), world_size=4, simulator="gloo")
    assert r.status == "pass", r
    assert r.loss_abs_err <= 4e-10 and r.max_grad_rel_err <= 1e-10


@pytest.mark.parametrize("impl", ["ulysses", "per_rank_mean", "shard_then_shift", "skip_output_a2a"])
def test_threaded_and_gloo_agree(impl):
    threaded = verify_file(TINY, impl=ulysses(impl), world_size=2, simulator="threaded")
    gloo = verify_file(TINY, impl=ulysses(impl), world_size=2, simulator="gloo")
    assert (threaded.status, threaded.failures) == (gloo.status, gloo.failures)
    for key in ("loss_abs_err", "max_grad_rel_err"):
        a, b = getattr(threaded, key), getattr(gloo, key)
        assert abs(a - b) <= 1e-12 + 1e-6 * max(abs(a), abs(b)), (key, a, b)


def test_rank_raising_in_a_collective_ends_the_run_fast():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("raise_in_collective"), world_size=4, simulator="gloo", timeout=60)
    assert time.monotonic() - start < 30
    assert r.status == "error" and r.error == "rank 1 (step): RuntimeError: boom on rank 1"


def test_rank_that_never_joins_times_out():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("never_joins"), world_size=2, simulator="gloo", timeout=3)
    assert time.monotonic() - start < 20
    assert r.status == "error" and r.error.startswith("timed out after 3 s") and "1" in r.error


def test_refusal_in_a_child_is_unsupported():
    r = verify_file(TINY, impl=broken("refuses"), world_size=2, simulator="gloo")
    assert r.status == "unsupported" and "does not support" in r.error


def test_callable_impl_is_refused_by_process_simulators():
    from .ulysses_impls import ulysses as impl
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        verify_file(TINY, impl=impl, simulator="gloo")


def test_mismatched_collectives_end_within_the_timeout():
    start = time.monotonic()
    r = verify_file(TINY, impl=broken("mismatched_collectives"), world_size=2, simulator="gloo", timeout=3)
    assert time.monotonic() - start < 20 and r.status == "error" and "rank" in r.error
