"""Probes: instruments that watch a step, on every rank and on the single-device reference.

A probe is made fresh for each run (a rank or the reference) from its name, so a case that runs
in other processes carries only names (``CaseSpec.probes``). The run calls, in order::

    impl = probe.wrap_impl(impl)      # ranks only: e.g. swap the inner compiler backend
    probe.before(model, ctx)          # ctx is None on the reference
    run = probe.wrap_reference(model) # the reference only: what it calls instead of the model
    ... prepare the impl, run the step (forward) ...
    probe.after_forward(loss, outputs)
    ... gradients (backward) ...
    data = probe.collect()            # picklable; lands in the rank result under "probes"

A probe must not change the numbers: the verdict of a case is the same with or without it.
Register a probe class with :func:`register`.
"""
from __future__ import annotations

PROBES: dict = {}


def register(cls):
    PROBES[cls.name] = cls
    return cls


class Probe:
    name = "probe"

    def __init__(self, spec, on_reference: bool):
        self.spec, self.on_reference = spec, on_reference

    def wrap_impl(self, impl):
        return impl

    def before(self, model, ctx) -> None:
        pass

    def wrap_reference(self, run):
        return run

    def after_forward(self, loss, outputs) -> None:
        pass

    def collect(self):
        return None


def make_probes(spec, on_reference: bool) -> list:
    if not spec.probes:
        return []
    _load_builtin()
    unknown = [n for n in spec.probes if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probes {unknown}; known: {sorted(PROBES)}")
    return [PROBES[n](spec, on_reference) for n in spec.probes]


BUILTIN = ("autosp_verify.divergence", "autosp_verify.accounting")


def _load_builtin():
    # Imported here, not at the top: each probe module imports this one to register itself.
    import importlib
    for module in BUILTIN:
        importlib.import_module(module)
