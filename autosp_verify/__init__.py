"""autosp_verify: prove or disprove that a sequence-parallel implementation is exact against one device.

Python API: :func:`verify` (model_fn, inputs_fn) and :func:`verify_file` (a model file) return a
:class:`CaseResult`; the impl protocol is in :mod:`autosp_verify.impls`, the tolerance table in
:mod:`autosp_verify.compare`, the simulators in :mod:`autosp_verify.simulators`.
"""
from autosp_verify.compare import TOLERANCES, Tolerance
from autosp_verify.impls import ImplUnavailable, is_refusal, resolve_impl
from autosp_verify.model_file import ModelFileError, load_model_file
from autosp_verify.report import CaseResult
from autosp_verify.run import verify, verify_file

__all__ = ["CaseResult", "ImplUnavailable", "ModelFileError", "TOLERANCES", "Tolerance", "is_refusal",
           "load_model_file", "resolve_impl", "verify", "verify_file"]
__all__ += ["assert_sp_equivalent"]


def __getattr__(name):
    # assert_sp_equivalent lives in the pytest plugin; imported on first use so that importing
    # autosp_verify does not import pytest (a test dependency only).
    if name == "assert_sp_equivalent":
        from autosp_verify.pytest_plugin import assert_sp_equivalent
        return assert_sp_equivalent
    raise AttributeError(f"module 'autosp_verify' has no attribute {name!r}")
