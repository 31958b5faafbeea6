"""The impl protocol, and the registry that turns an impl name into an impl.

Impl protocol
-------------
An impl is a callable ``impl(model, group) -> step``. The verifier calls it once on every rank,
inside that rank, with that rank's own replica of the model (identical weights on every rank,
already converted to the case dtype, in whatever mode ``model_fn`` returned it: train unless the
model file says otherwise) and the sequence-parallel process group
(``torch.distributed.ProcessGroup``; its size is the SP degree P, ``dist.get_rank(group)`` the
rank, read at run time).

``step(**batch)`` receives the FULL batch, identical on every rank (each rank gets its own copy),
and returns the model output on this rank: an HF-style output with ``.loss``, a dict with
``"loss"``, or a tuple whose first item is the loss. Rules for the output:

* the loss must be identical on every rank, and equal to the single-device loss;
* a tensor that carries the sequence may be returned whole (the reference shape: compared as
  replicated, every rank must match) or as this rank's contiguous shard along the sequence,
  shards in rank order (the one dim whose size differs from the reference is the sequence dim;
  the verifier concatenates the ranks' shards along it; a rank may hold an empty shard).

The verifier then computes each rank's gradients with
``torch.autograd.grad(loss, params, allow_unused=True)`` on that rank's replica (None counts as
zeros) and SUMS them over the ranks (the SP convention: gradients of the SP group are summed)
before comparing with the single-device gradients.

Refusing a model: an impl that raises, at prepare time or in ``step``, an ``autosp.AutoSPError``
or any exception whose class has a truthy ``autosp_unsupported`` attribute makes the case
"unsupported" with its message. Any other exception makes the case an "error" (the impl crashed
on a model it accepted), reported with the rank and the exception type and message.

Optional hook: ``impl.warm_up(model, world_size, batch)``, when the impl has it, is called once
on the main thread before the in-process (threaded) simulator starts its ranks, with a replica
and the full batch, so that an impl can compile once rather than once per rank thread. A failure
there is ignored: the ranks then meet it and report it with their rank.

Optional: ``impl.with_backend(backend) -> impl``, for impls built on ``autosp.compile`` (see
:func:`autosp_impl`): the same impl with another inner compiler backend. With it, the first
divergence of a failing case is found op by op in the rewritten graph; without it, module by
module (forward hooks on the named modules of the replica).

Names
-----
``autosp``: ``autosp.compile(model, group=group, backend="aot_eager")``: the rewrite alone.
``autosp-inductor``: the same with Inductor (``autosp.compile``'s default backend).
``autosp-eager``: the same rewritten graph run eagerly (fast to compile; property tests).
``autosp-wrap``: ``autosp.multimodal.auto_wrap_model_for_sp`` (module-level, eager; vision-language
models). ``deepspeed``: DeepSpeed's own AutoSP passes
and backend (passes + Inductor); ``deepspeed-eager``: the same passes, the rewritten graph run
eagerly (no Inductor; seconds instead of minutes on CPU). ``alst``: DeepSpeed's ALST Ulysses
for HF models (``UlyssesSPAttentionHF``; see :mod:`autosp_verify.alst_impl`). ``MODULE:CALLABLE`` or
``path/to/file.py:CALLABLE``: a user's callable.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from typing import Callable

from autosp_verify.model_file import USER_CODE_ERRORS


class ImplUnavailable(Exception):
    """The named impl cannot be used here (not importable, not callable, not implemented yet)."""


def is_refusal(exc: BaseException) -> bool:
    if getattr(type(exc), "autosp_unsupported", False):
        return True
    # An AutoSPError instance implies its module is loaded; never import autosp just to ask.
    errors = sys.modules.get("autosp.errors")
    return errors is not None and isinstance(exc, errors.AutoSPError)


def autosp_impl(backend="aot_eager", **config):
    """An impl that is ``autosp.compile`` with inner ``backend`` and ``SPConfig(**config)``.

    It has a ``warm_up`` hook (the threaded simulator calls it once on the main thread so that
    rank threads find the graph compiled; Dynamo would otherwise compile once per rank thread)
    and ``with_backend(backend)``, the same impl with another inner backend: the verifier swaps
    in a recording backend to find the first divergent op of a failing case."""
    def impl(model, group):
        import autosp
        return autosp.compile(model, config=autosp.SPConfig(group=group, backend=backend, **config))

    def warm_up(model, world_size, batch):
        import autosp
        autosp.compile(model, config=autosp.SPConfig(backend=backend, **config)).warm_up(world_size, **batch)

    impl.warm_up = warm_up
    impl.with_backend = lambda other: autosp_impl(other, **config)
    impl.__qualname__ = f"autosp[{backend}]"
    return impl


# "autosp" checks the rewrite itself: AOTAutograd without codegen runs the same ATen ops as the
# single-device reference, so any difference is the rewrite's. "autosp-inductor" adds Inductor,
# whose fused kernels round differently (float32-level differences appear even without SP when a
# model computes its loss in float32, as HF models do).
# "autosp-eager" runs the rewritten graph eagerly (autograd through the custom ops): the same
# rewrite, compiled in a fraction of the time, for property tests that draw many architectures.
_AUTOSP_IMPLS = {"autosp": autosp_impl("aot_eager"), "autosp-inductor": autosp_impl("inductor"),
                 "autosp-eager": autosp_impl("eager")}


def autosp_wrap_impl(model, group):
    """``autosp.multimodal.auto_wrap_model_for_sp``: module-level wrapping (vision-language models)."""
    from autosp.multimodal import auto_wrap_model_for_sp
    wrapped = auto_wrap_model_for_sp(model, group)

    def step(**batch):
        return wrapped(**batch)
    step.autosp_counted = True  # its collectives go through autosp's counters (accounting)
    return step


def _check_autosp():
    try:
        import autosp
    except Exception as exc:
        raise ImplUnavailable(f"impl 'autosp': cannot import autosp ({type(exc).__name__}: {exc})") from None
    if not callable(getattr(autosp, "compile", None)):
        raise ImplUnavailable("impl 'autosp': autosp.compile does not exist in this checkout yet; "
                              "use --impl deepspeed or --impl MODULE:CALLABLE")


def _check_deepspeed():
    if importlib.util.find_spec("deepspeed") is None:
        raise ImplUnavailable("impl 'deepspeed': the deepspeed package is not installed")


_LOAD_LOCK = threading.Lock()  # rank threads may resolve the same file at once


def _load_callable(spec: str) -> Callable:
    target, _, attr = spec.rpartition(":")
    name = None
    try:
        with _LOAD_LOCK:
            if target.endswith(".py"):
                from autosp_verify.model_file import _module_name
                path = os.path.abspath(target)
                name = _module_name(path)
                module = sys.modules.get(name)
                if module is None:
                    mod_spec = importlib.util.spec_from_file_location(name, path)
                    module = importlib.util.module_from_spec(mod_spec)
                    sys.modules[name] = module  # before exec: its classes must be findable (Dynamo, pickle)
                    mod_spec.loader.exec_module(module)
            else:
                if os.getcwd() not in sys.path:
                    sys.path.append(os.getcwd())  # a console script's sys.path lacks the working dir
                module = importlib.import_module(target)
    except USER_CODE_ERRORS as exc:
        if name is not None:
            sys.modules.pop(name, None)
        raise ImplUnavailable(f"impl {spec!r}: cannot import {target} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ImplUnavailable(f"impl {spec!r}: {target} has no callable {attr!r}")
    return fn


def resolve_impl(spec) -> Callable:
    """An impl name, 'MODULE:CALLABLE', 'file.py:CALLABLE', or a callable -> the impl callable."""
    if callable(spec):
        return spec
    if spec in _AUTOSP_IMPLS:
        _check_autosp()
        return _AUTOSP_IMPLS[spec]
    if spec == "autosp-wrap":
        _check_autosp()
        return autosp_wrap_impl
    if spec in ("deepspeed", "deepspeed-eager"):
        _check_deepspeed()
        from autosp_verify import deepspeed_impl
        return deepspeed_impl.deepspeed_impl if spec == "deepspeed" else deepspeed_impl.deepspeed_eager_impl
    if spec == "alst":
        _check_deepspeed()
        from autosp_verify.alst_impl import alst_impl
        return alst_impl
    if isinstance(spec, str) and ":" in spec:
        return _load_callable(spec)
    raise ImplUnavailable(f"unknown impl {spec!r}: use autosp, autosp-wrap, deepspeed, deepspeed-eager, alst, "
                          "MODULE:CALLABLE or path/to/file.py:CALLABLE")


def impl_label(spec) -> str:
    if isinstance(spec, str):
        return spec
    return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', repr(spec))}"
