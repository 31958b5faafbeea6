"""pytest plugin: sequence-parallel equivalence as a one-line assertion in a user's own tests.

Installed with autosp (entry point ``pytest11: autosp_verify``), so it is active in every pytest
run of an environment that has autosp; with ``PYTEST_DISABLE_PLUGIN_AUTOLOAD`` set, enable it with
``-p autosp_verify``. It adds:

``assert_sp_equivalent(model_fn, inputs_fn, *, world_size=2, impl="autosp", ...)``
    Runs :func:`autosp_verify.verify` (or :func:`~autosp_verify.verify_file` when ``model_fn`` is
    a model-file path and ``inputs_fn`` is None) and returns the :class:`CaseResult` when the
    status is ``pass`` (or ``structural`` on the fake simulator). Otherwise it raises
    ``AssertionError`` with a readable report: status, impl, simulator, P, S, the worst tensor,
    the failing tensors and the error. A refusal (``unsupported``) fails too, with the refusal
    message, unless ``allow_unsupported=True`` (then the result is returned); ``skipped`` (the
    simulator cannot run here, e.g. nccl without enough GPUs) calls ``pytest.skip``. Unusable
    input (a bad model file, an unknown impl, a model that fails on one device) raises as
    ``verify`` does. Also ``from autosp_verify import assert_sp_equivalent``.

``sp_world`` (fixture)
    A factory: ``sp_world(world_size=None, timeout=60.0)`` returns an :class:`SPWorld` whose
    ``.run(fn)`` calls ``fn(rank, group)`` on every rank of a threaded process group (P threads,
    exact collectives; ``group`` is a ``torch.distributed.ProcessGroup``) and returns the results
    in rank order. A rank that raises (or a hang past ``timeout``) ends the run with
    :class:`SPWorldError` naming the rank, with its traceback. ``world_size`` defaults to
    ``--autosp-world-size``.

``sp_verify`` (fixture)
    ``assert_sp_equivalent`` whose ``impl``, ``world_size`` and ``simulator`` default to the
    command-line options ``--autosp-impl``, ``--autosp-world-size``, ``--autosp-simulator``
    (when given); arguments passed in the call win.

Example (a user's test file)::

    from autosp_verify import assert_sp_equivalent

    def test_my_model_is_sp_exact():
        assert_sp_equivalent(model_fn, inputs_fn, world_size=4, impl="autosp", seq_len=32)

    def test_all_reduce(sp_world):
        import torch, torch.distributed as dist
        def fn(rank, group):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=group)
            return t.item()
        assert sp_world(4).run(fn) == [6.0] * 4

Importing this module imports pytest and nothing heavy of its own: the verifier and the
simulators are imported on first use.
"""
from __future__ import annotations

import os

import pytest

__all__ = ["SPWorld", "SPWorldError", "assert_sp_equivalent", "format_result"]

_OK = ("pass",)
_DEFAULT_WORLD_SIZE = 2


def _num(x) -> str:
    return "-" if x is None else f"{x:.3g}"


def format_result(result, model=None) -> str:
    """A CaseResult as the multi-line report an AssertionError carries."""
    where = f"impl {result.impl!r} on the {result.simulator} simulator, P={result.world_size}, S={result.seq_len}, " \
            f"batch {result.batch}, {result.dtype}"
    head = {"fail": "is NOT sequence-parallel equivalent",
            "error": "crashed, hung or timed out",
            "unsupported": "refused the model (unsupported)",
            "skipped": "could not be checked here (skipped)"}.get(result.status, f"ended with status {result.status!r}")
    lines = [f"autosp_verify: {result.status.upper()}: {where} {head}" + (f" (model {model})" if model else "")]
    if result.worst_tensor:
        w = result.worst_tensor
        lines.append(f"  worst tensor: {w['name']} (abs err {_num(w['abs_err'])}, rel err {_num(w['rel_err'])})")
    if result.worst_grad and (result.worst_tensor or {}).get("name") != f"grad {result.worst_grad['name']}":
        lines.append(f"  worst grad: {result.worst_grad['name']} (rel err {_num(result.worst_grad['rel_err'])})")
    if result.loss_abs_err is not None:
        lines.append(f"  loss abs err: {_num(result.loss_abs_err)}; max grad rel err: {_num(result.max_grad_rel_err)}")
    if result.failures:
        lines.append(f"  failing tensors ({len(result.failures)}, worst first):")
        lines += [f"    {f}" for f in result.failures[:10]]
        if len(result.failures) > 10:
            lines.append(f"    ... and {len(result.failures) - 10} more")
    if result.error:
        lines.append("  error: " + result.error.strip().replace("\n", "\n    "))
    return "\n".join(lines)


def assert_sp_equivalent(model_fn, inputs_fn=None, *, world_size=_DEFAULT_WORLD_SIZE, impl="autosp", seq_len=16,
                         batch=2, dtype=None, simulator="threaded", allow_unsupported=False, **kw):
    """Assert that ``impl`` makes the model sequence-parallel exact on ``world_size`` ranks.

    ``model_fn`` is a callable returning an ``nn.Module`` (with ``inputs_fn(batch, seq_len,
    generator)``), or the path of a model file (a .py defining both; ``inputs_fn`` None uses the
    file's). ``dtype`` defaults to float64. Further keywords (``seed``, ``timeout``, ``rtol``,
    ``atol``) go to :func:`autosp_verify.verify`. Returns the :class:`CaseResult`.
    """
    import torch

    from autosp_verify.run import verify, verify_file

    dtype = torch.float64 if dtype is None else dtype
    args = dict(impl=impl, world_size=world_size, seq_len=seq_len, batch=batch, dtype=dtype, simulator=simulator, **kw)
    model = None
    if isinstance(model_fn, (str, os.PathLike)):
        model = os.fspath(model_fn)
        if inputs_fn is None:
            result = verify_file(model, **args)
        else:
            result = verify(os.path.abspath(model), inputs_fn, **args)
    else:
        if inputs_fn is None:
            raise TypeError("assert_sp_equivalent: inputs_fn is required unless model_fn is a model-file path")
        result = verify(model_fn, inputs_fn, **args)
    if result.status in _OK or (result.status == "structural" and result.structural):
        return result
    if result.status == "unsupported" and allow_unsupported:
        return result
    if result.status == "skipped":
        pytest.skip(result.error or f"the {result.simulator} simulator cannot run here")
    raise AssertionError(format_result(result, model))


class SPWorldError(Exception):
    """A rank of an :class:`SPWorld` run raised, or the run timed out. ``.rank`` is the rank
    (None when unknown), ``.kind`` "error" or "timeout"; the message ends with the rank's traceback."""

    def __init__(self, failure):
        message = failure.message + (f"\n\n{failure.detail.rstrip()}" if failure.detail else "")
        super().__init__(message)
        self.rank, self.kind = failure.rank, failure.kind


def _call_user_fn(ctx, fn):
    return fn(ctx.rank, ctx.group)


class SPWorld:
    """``world_size`` ranks as threads of torch's threaded process group (the verifier's threaded
    simulator: exact collectives, one run at a time per process)."""

    def __init__(self, world_size: int, timeout: float = 60.0):
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
        self.world_size, self.timeout = world_size, timeout

    def run(self, fn) -> list:
        """``[fn(rank, group) for every rank]``, run concurrently, in rank order."""
        from autosp_verify.simulators import SimulationError
        from autosp_verify.simulators.threaded import ThreadedSimulator

        try:
            return ThreadedSimulator().run(self.world_size, _call_user_fn, fn, self.timeout)
        except SimulationError as exc:
            raise SPWorldError(exc.failure) from None

    def __repr__(self):
        return f"SPWorld(world_size={self.world_size})"


def pytest_addoption(parser):
    group = parser.getgroup("autosp", "autosp sequence-parallel verification (sp_verify / sp_world fixtures)")
    group.addoption("--autosp-impl", default=None, metavar="IMPL",
                    help="default impl for sp_verify: autosp, deepspeed, MODULE:CALLABLE, file.py:CALLABLE")
    group.addoption("--autosp-world-size", type=int, default=None, metavar="P",
                    help=f"default SP degree for sp_verify and sp_world (default {_DEFAULT_WORLD_SIZE})")
    group.addoption("--autosp-simulator", default=None, metavar="NAME",
                    help="default simulator for sp_verify: threaded, gloo, fake, nccl")


def _option_defaults(config) -> dict:
    given = {"impl": config.getoption("autosp_impl"), "world_size": config.getoption("autosp_world_size"),
             "simulator": config.getoption("autosp_simulator")}
    return {k: v for k, v in given.items() if v is not None}


@pytest.fixture
def sp_world(pytestconfig):
    """Factory ``sp_world(world_size=None, timeout=60.0) -> SPWorld``; see the module docstring."""
    default = pytestconfig.getoption("autosp_world_size") or _DEFAULT_WORLD_SIZE

    def make(world_size=None, timeout=60.0) -> SPWorld:
        return SPWorld(default if world_size is None else world_size, timeout)

    return make


@pytest.fixture
def sp_verify(pytestconfig):
    """``assert_sp_equivalent`` with defaults from --autosp-impl/--autosp-world-size/--autosp-simulator."""
    defaults = _option_defaults(pytestconfig)

    def check(model_fn, inputs_fn=None, **kw):
        return assert_sp_equivalent(model_fn, inputs_fn, **{**defaults, **kw})

    return check
