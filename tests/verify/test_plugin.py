"""The pytest plugin (assert_sp_equivalent, the sp_world and sp_verify fixtures, the --autosp-*
options) and the public hypothesis strategies, each with a negative control."""
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from autosp_verify import assert_sp_equivalent
from autosp_verify.pytest_plugin import SPWorld, SPWorldError
from autosp_verify.strategies import (
    SPCase,
    head_counts,
    seq_lens,
    sp_cases,
    world_sizes,
)

from .conftest import TINY, broken, ulysses
from .tiny_model import HEADS, inputs_fn, model_fn

pytest_plugins = ["pytester"]


# --- assert_sp_equivalent -------------------------------------------------------------------------

def test_assert_passes_for_a_correct_impl_and_returns_the_result():
    result = assert_sp_equivalent(model_fn, inputs_fn, world_size=4, impl=ulysses())
    assert result.status == "pass" and result.world_size == 4
    assert assert_sp_equivalent(TINY, world_size=2, impl=ulysses()).status == "pass"  # a model file


def test_assert_names_the_worst_tensor_of_a_mismatch():
    with pytest.raises(AssertionError) as info:
        assert_sp_equivalent(model_fn, inputs_fn, world_size=2, impl=ulysses("per_rank_mean"))
    message = str(info.value)
    assert message.startswith("autosp_verify: FAIL: impl ") and "ulysses_impls.py:per_rank_mean" in message
    assert "P=2, S=16" in message and "NOT sequence-parallel equivalent" in message
    assert "worst tensor: loss (abs err" in message and "loss differs across ranks" in message


def test_assert_fails_on_a_refusal_unless_allowed():
    with pytest.raises(AssertionError, match=r"UNSUPPORTED.*\n(.*\n)*  error: .*not divisible by 4"):
        assert_sp_equivalent(TINY, world_size=4, seq_len=18, impl=ulysses())
    result = assert_sp_equivalent(TINY, world_size=4, seq_len=18, impl=ulysses(), allow_unsupported=True)
    assert result.status == "unsupported"


def test_assert_fails_on_a_crash_with_the_rank_and_error():
    with pytest.raises(AssertionError, match="ERROR.*\n  error: rank 1 .*ValueError: cannot prepare on rank 1"):
        assert_sp_equivalent(TINY, impl=broken("crash_at_prepare"))


def test_assert_skips_when_the_simulator_cannot_run_here():
    with pytest.raises(pytest.skip.Exception, match="needs 64 GPUs"):
        assert_sp_equivalent(TINY, world_size=64, impl=ulysses(), simulator="nccl")


def test_assert_accepts_structural_only_from_the_fake_simulator():
    assert assert_sp_equivalent(TINY, world_size=4, impl=ulysses(), simulator="fake").status == "structural"


def test_assert_requires_inputs_fn_for_a_callable_model():
    with pytest.raises(TypeError, match="inputs_fn is required"):
        assert_sp_equivalent(model_fn)


# --- sp_world -------------------------------------------------------------------------------------

def _all_reduce_rank(rank, group):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=group)
    return rank, group.size(), t.item()


def test_sp_world_runs_fn_on_every_rank_with_real_collectives(sp_world):
    assert sp_world(4).run(_all_reduce_rank) == [(r, 4, 6.0) for r in range(4)]
    assert sp_world().run(_all_reduce_rank) == [(0, 2, 1.0), (1, 2, 1.0)]  # default P = 2


def test_sp_world_reports_the_failing_rank_with_its_traceback(sp_world):
    def fn(rank, group):
        if rank == 2:
            raise ValueError("bad shard on rank 2")
        dist.all_reduce(torch.ones(1), group=group)  # the others wait here: woken, not hung

    with pytest.raises(SPWorldError, match="rank 2: ValueError: bad shard on rank 2") as info:
        sp_world(4, timeout=30).run(fn)
    assert info.value.rank == 2 and "Traceback" in str(info.value)


# --- the plugin from a user's point of view -------------------------------------------------------

USER_TESTS = textwrap.dedent("""
    import torch
    import torch.distributed as dist
    from autosp_verify import assert_sp_equivalent

    TINY, GOOD, BAD = {tiny!r}, {good!r}, {bad!r}

    def test_function_passes():
        assert_sp_equivalent(TINY, world_size=4, impl=GOOD)

    def test_function_catches_the_bug():
        assert_sp_equivalent(TINY, world_size=2, impl=BAD)

    def test_fixture_verify(sp_verify):
        sp_verify(TINY, impl=GOOD)  # an explicit impl beats --autosp-impl

    def test_fixture_verify_option_default(sp_verify):
        sp_verify(TINY)  # impl from --autosp-impl

    def test_fixture_world(sp_world, request):
        def fn(rank, group):
            t = torch.ones(1)
            dist.all_reduce(t, group=group)
            return t.item()
        assert sp_world().run(fn) == [float(request.config.getoption("autosp_world_size"))] * 4
""")


MODULE_LOG = """
import sys
def pytest_sessionfinish(session):
    with open("modules.txt", "w") as f:
        f.write("\\n".join(sorted(sys.modules)))
"""


@pytest.fixture(scope="module")
def verifier_imported():
    """Everything the user suite imports, imported before pytester snapshots sys.modules."""
    assert_sp_equivalent(TINY, world_size=4, impl=ulysses())
    SPWorld(2).run(_all_reduce_rank)


def test_user_suite_through_the_installed_plugin(verifier_imported, pytester):
    # In-process (a subprocess costs seconds of torch import per run). pytester drops from
    # sys.modules what was imported after it started, and re-importing e.g. torch._dynamo later
    # re-registers torch.library ops and breaks later tests in this worker: so import first (the
    # fixture, set up before pytester) and check below that the user suite imported nothing new.
    before = set(sys.modules)
    pytester.makeconftest(MODULE_LOG)
    pytester.makepyfile(test_user=USER_TESTS.format(tiny=TINY, good=ulysses(), bad=ulysses("shard_then_shift")))
    common = ["-p", "no:cacheprovider", "--autosp-world-size", "4"]
    result = pytester.runpytest(*common, "--autosp-impl", ulysses())
    result.assert_outcomes(passed=4, failed=1)
    result.stdout.fnmatch_lines(["*test_function_catches_the_bug*", "E * FAIL: impl *shard_then_shift*",
                                 "E * worst tensor: grad *"])
    # Negative control: the option is honoured -- the broken impl as the default fails sp_verify.
    result = pytester.runpytest(*common, "--autosp-impl", ulysses("per_rank_mean"))
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["FAILED *test_fixture_verify_option_default*"])
    fresh = {m for m in (pytester.path / "modules.txt").read_text().split() if m not in before}
    assert not {m for m in fresh if m.partition(".")[0] in ("torch", "autosp", "autosp_verify")}, fresh


# --- strategies -----------------------------------------------------------------------------------

@settings(max_examples=60, database=None)
@given(st.data())
def test_strategies_draw_valid_values(data):
    p = data.draw(world_sizes(8))
    assert p in (1, 2, 4, 8)
    q, kv = data.draw(head_counts(p))
    assert q % kv == 0 and q >= p and 1 <= kv <= 4
    s = data.draw(seq_lens(p))
    assert 2 <= s <= 3 * p + 3
    if p > 1:
        q, kv = data.draw(head_counts(p, divisible=False))
        assert q % kv == 0 and q % p and q >= p
        assert data.draw(seq_lens(p, divisible=False)) % p
    q, _ = data.draw(head_counts(p, divisible=True))
    assert q % p == 0
    assert data.draw(seq_lens(p, divisible=True)) % p == 0
    case = data.draw(sp_cases(max_world_size=8, seq_divisible=False))
    assert isinstance(case, SPCase) and case.world_size >= 2 and case.seq_len % case.world_size
    assert case.heads % case.kv_heads == 0 and case.dtype in (torch.float64, torch.float32)


def test_seq_lens_favour_lengths_p_does_not_divide():
    drawn = []

    @settings(max_examples=100, database=None, phases=[Phase.generate])
    @given(seq_lens(4))
    def collect(s):
        drawn.append(s)

    collect()
    ragged, tiny = sum(s % 4 != 0 for s in drawn), sum(s < 4 for s in drawn)
    assert ragged > len(drawn) / 3 and tiny > 0 and ragged < len(drawn)


def test_strategies_reject_impossible_requests():
    with pytest.raises(ValueError, match="divisible=False needs world_size >= 2"):
        seq_lens(1, divisible=False)
    with pytest.raises(ValueError, match="no multiple of 8"):
        seq_lens(8, max_len=7, divisible=True)


# The tiny model has HEADS query heads and the hand-written impl refuses S % P != 0: draw P <= HEADS
# and divisible lengths, so every case is one the impl accepts and must get exactly right.
TINY_CASES = sp_cases(world_size=world_sizes(HEADS, min_size=2), seq_divisible=True, max_len=24, max_batch=2,
                      dtype_choices=(torch.float64,))
QUICK = settings(max_examples=4, database=None, deadline=None, phases=[Phase.generate],
                 suppress_health_check=[HealthCheck.too_slow])


def _check(impl):
    @QUICK
    @given(TINY_CASES)
    def prop(case):
        assert_sp_equivalent(model_fn, inputs_fn, impl=impl, **case.verify_kwargs())
    prop()


def test_strategy_driven_check_passes_for_the_correct_impl():
    _check(ulysses())


def test_strategy_driven_check_finds_the_shard_then_shift_bug():
    with pytest.raises(AssertionError, match="FAIL: impl .*shard_then_shift"):
        _check(ulysses("shard_then_shift"))

