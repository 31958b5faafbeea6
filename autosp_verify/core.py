"""The case: build it, run the single-device reference, and the per-rank work every simulator runs.

``rank_fn(ctx, payload)`` is the one function that runs on a rank, whatever the simulator:
``payload`` is a :class:`LoadedCase` (in memory: threaded, fake) or a picklable :class:`CaseSpec`
(processes: the child rebuilds the model with ``model_fn`` and loads the parent's weights and
batch from ``weights_path``, so every rank holds identical weights and inputs).
"""
from __future__ import annotations

import copy
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autosp_verify.compare import non_finite
from autosp_verify.impls import is_refusal, resolve_impl
from autosp_verify.model_file import USER_CODE_ERRORS, ModelFileError, load_model_file
from autosp_verify.outputs import OutputError, split_output
from autosp_verify.precision import CastRecorder
from autosp_verify.probes import make_probes
from autosp_verify.randomness import RandomRecorder, refusal as random_refusal
from autosp_verify.simulators.base import RankError, RankFailure

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CaseSpec:
    """Everything a rank needs, picklable: the model file path (or a module-level model_fn), the
    impl spec string, sizes, dtype name, seed, and where the parent saved weights and batch."""

    model: Any
    impl: Any
    world_size: int
    seq_len: int
    batch: int
    dtype: str
    seed: int
    weights_path: str | None = None
    probes: tuple = ()  # names of probes (autosp_verify.probes) to run on every rank and the reference
    steps: int = 2  # batches the impl's step runs on, each its own inputs_fn draw, each compared


@dataclass
class Reference:
    loss: torch.Tensor
    outputs: dict
    grads: dict
    probes: dict = field(default_factory=dict)  # probe name -> what it collected


def lifted_recompile_limit():
    """One process verifies many models through the same forward code; under fullgraph Dynamo's
    recompile limit would fail them (never silently), so a run lifts it meanwhile."""
    return torch._dynamo.config.patch(recompile_limit=100_000, accumulated_recompile_limit=100_000)


def describe_model(model) -> str:
    return model if isinstance(model, str) else getattr(model, "__qualname__", repr(model))


def model_functions(model):
    """(model_fn, inputs_fn) from a model-file path, or (model_fn, None) for a bare callable."""
    if isinstance(model, str):
        mf = load_model_file(model)
        return mf.model_fn, mf.inputs_fn
    return model, None


def _seeded_model(model_fn, spec: CaseSpec) -> nn.Module:
    where = describe_model(spec.model)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(spec.seed)
        try:
            made = model_fn()
        except USER_CODE_ERRORS as exc:
            raise ModelFileError(f"{where}: model_fn() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(made, nn.Module):
        raise ModelFileError(f"{where}: model_fn() returned {type(made).__name__}, not an nn.Module")
    # A copy, so a model_fn that hands out a shared module never sees it converted or touched.
    return copy.deepcopy(made).to(DTYPES[spec.dtype])


def _cast(value, dtype, device=None):
    if isinstance(value, torch.Tensor):
        value = value.detach().clone().to(device) if device is not None else value.detach().clone()
        return value.to(dtype) if value.is_floating_point() else value
    return copy.deepcopy(value)


def build_case(model_fn, inputs_fn, spec: CaseSpec):
    """The base model (seeded, copied, in the case dtype) and the batch (floats in the case dtype)."""
    return _seeded_model(model_fn, spec), make_batch(inputs_fn, spec, spec.seed)


def later_batches(inputs_fn, spec: CaseSpec) -> list:
    """The batches of steps 2..``spec.steps``: other draws of ``inputs_fn`` (other tokens, padding,
    documents), so that a step that keeps something of the first call is caught."""
    return [make_batch(inputs_fn, spec, spec.seed + 1000 * i) for i in range(1, spec.steps)]


def make_batch(inputs_fn, spec: CaseSpec, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    where = describe_model(spec.model)
    try:
        batch = inputs_fn(spec.batch, spec.seq_len, generator)
    except USER_CODE_ERRORS as exc:
        raise ModelFileError(f"{where}: inputs_fn() raised {type(exc).__name__}: {exc}") from None
    if not isinstance(batch, dict):
        raise ModelFileError(f"{where}: inputs_fn() returned {type(batch).__name__}, not a dict of kwargs")
    return {k: _cast(v, DTYPES[spec.dtype]) for k, v in batch.items()}


def trainable(model: nn.Module):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _grads(loss, params):
    if not params or not loss.requires_grad:
        return {n: torch.zeros_like(p) for n, p in params}  # nothing flows: all zero, compare says so
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params, grads)}


def reference(base: nn.Module, batch: dict, spec: CaseSpec) -> Reference:
    where = describe_model(spec.model)
    model = copy.deepcopy(base)
    probes = make_probes(spec, on_reference=True)
    try:
        run = model
        for probe in probes:
            probe.before(model, None)
            run = probe.wrap_reference(run)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            loss, outputs = split_output(run(**{k: _cast(v, DTYPES[spec.dtype]) for k, v in batch.items()}))
        for probe in probes:
            probe.after_forward(loss, outputs)
        grads = _grads(loss, trainable(model))
    except OutputError as exc:
        raise ModelFileError(f"{where}: on one device, {exc}") from None
    except USER_CODE_ERRORS as exc:
        raise ModelFileError(f"{where}: the model fails on one device: {type(exc).__name__}: {exc}") from None
    _check_finite(where, loss, grads)
    return Reference(loss.detach(), {n: t.detach() for n, t in outputs.items()},
                     {n: g.detach() for n, g in grads.items()}, {p.name: p.collect() for p in probes})


def model_facts(base: nn.Module, batch: dict, spec: CaseSpec) -> CastRecorder:
    """What the model computes in (precision.py: ``computes_in``, ``where``), from one eager
    forward without grad of a copy of the model: once a case, apart from the reference (a probe
    may compile that one, and the dispatch modes recording it would stop Dynamo). Raises
    ModelFileError when that forward draws random numbers (randomness.py): nothing to compare."""
    model = copy.deepcopy(base)
    casts, draws = CastRecorder(), RandomRecorder()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), casts, draws:
            torch.manual_seed(spec.seed)
            model(**{k: _cast(v, DTYPES[spec.dtype]) for k, v in batch.items()})
    except USER_CODE_ERRORS:
        return CastRecorder()  # it ran once already; nothing recorded is nothing loosened
    if draws.draws:
        raise ModelFileError(f"{describe_model(spec.model)}: {random_refusal(draws.draws, model)}")
    return casts


def _check_finite(where, loss, grads):
    """A loss or gradient that is NaN/Inf on one device leaves nothing to verify against."""
    tensors = [("loss", loss), *((f"grad {n}", g) for n, g in grads.items())]
    bad = [f"{name} has {kind}" for name, kind in ((name, non_finite(t.detach())) for name, t in tensors) if kind]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ModelFileError(f"{where}: the model fails on one device: {', '.join(bad[:3])}{more}; nothing to "
                             "verify against (check the model, the inputs, the dtype)")


class LoadedCase:
    """An in-memory case: the base model is never handed out, only deep copies of it."""

    def __init__(self, spec: CaseSpec, base: nn.Module, batch: dict, later: list = ()):
        self.spec, self._base, self._batches = spec, base, [batch, *later]
        self._lock = threading.Lock()  # copies are made one at a time, whatever thread asks

    @classmethod
    def from_spec(cls, spec: CaseSpec) -> "LoadedCase":
        model_fn, _ = model_functions(spec.model)
        base = _seeded_model(model_fn, spec)
        saved = torch.load(spec.weights_path, weights_only=True)
        base.load_state_dict(saved["state_dict"])
        return cls(spec, base, saved["batch"], saved.get("later", ()))

    def replica(self, device) -> nn.Module:
        with self._lock:
            return copy.deepcopy(self._base).to(device)

    def batches_for(self, device) -> list:
        """Step 1's batch, then the later steps' (``later_batches``)."""
        return [{k: _cast(v, DTYPES[self.spec.dtype], device) for k, v in b.items()} for b in self._batches]


def _failure(rank, stage, exc) -> RankError:
    detail = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if is_refusal(exc):
        return RankError(RankFailure(rank, "unsupported", f"rank {rank} ({stage}): {exc}", detail))
    return RankError(RankFailure(rank, "error", f"rank {rank} ({stage}): {type(exc).__name__}: {exc}", detail))


def rank_fn(ctx, payload):
    """One rank: prepare the impl on a replica, step on the full batch, take this rank's grads;
    then the same prepared step on each later batch (``later``: loss, outputs, grads)."""
    case = payload if isinstance(payload, LoadedCase) else LoadedCase.from_spec(payload)
    model, (batch, *later) = case.replica(ctx.device), case.batches_for(ctx.device)
    impl = resolve_impl(case.spec.impl)
    probes = make_probes(case.spec, on_reference=False)
    for probe in probes:
        impl = probe.wrap_impl(impl)
        probe.before(model, ctx)
    names = {id(p): n for n, p in trainable(model)}  # before the impl: a wrapper may move modules
    try:
        step = impl(model, ctx.group)
    except USER_CODE_ERRORS as exc:
        raise _failure(ctx.rank, "prepare", exc) from exc
    named, watched, results = None, {}, []
    for number, inputs in enumerate([batch, *later], 1):
        stage = "step" if number == 1 else f"step {number}"
        try:
            out = step(**inputs)
        except USER_CODE_ERRORS as exc:
            raise _failure(ctx.rank, stage, exc) from exc
        try:
            loss, outputs = split_output(out)
        except OutputError as exc:
            raise RankError(RankFailure(ctx.rank, "error", f"rank {ctx.rank} ({stage}): {exc}")) from exc
        if number == 1:
            for probe in probes:
                probe.after_forward(loss, outputs)
            named = [(names.get(id(p), n), p) for n, p in trainable(model)]
        try:
            grads = ctx.on_other_thread(lambda: _grads(loss, named))  # as CUDA's autograd runs it
        except USER_CODE_ERRORS as exc:
            raise _failure(ctx.rank, "backward" if number == 1 else f"backward {number}", exc) from exc
        results.append({"loss": loss.detach().cpu(), "outputs": {n: t.detach().cpu() for n, t in outputs.items()},
                        "grads": {n: g.detach().cpu() for n, g in grads.items()}})
        if number == 1:  # probes watch step 1 only (its collectives, its saved tensors)
            watched = {p.name: p.collect() for p in probes}
    first, *rest = results
    return {**first, "later": rest, "probes": watched}


def _warm_up(payload, world_size):
    """Main-thread hook for in-process simulators: let the impl compile once (see impls.py).
    Any failure is left for the ranks to meet and report with their rank."""
    case = payload if isinstance(payload, LoadedCase) else LoadedCase.from_spec(payload)
    impl = resolve_impl(case.spec.impl)
    for probe in make_probes(case.spec, on_reference=False):
        impl = probe.wrap_impl(impl)
    hook = getattr(impl, "warm_up", None)
    if hook is None:
        return
    try:
        hook(case.replica("cpu"), world_size, case.batches_for("cpu")[0])
    except Exception:
        pass


rank_fn.warm_up = _warm_up
