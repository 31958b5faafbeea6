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
