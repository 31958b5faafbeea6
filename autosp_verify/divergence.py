"""First divergence: the first value, in execution order, where the impl parts from one device.

When a case fails, the verifier runs it once more with the ``record`` probe, which keeps every
intermediate value and the gradient that reaches it, on every rank and on the reference:

* **op level**, for impls built on autosp (``impl.with_backend``, see impls.py): the graph after
  the passes runs through an FX interpreter that records each node's value. A node of the traced graph is compared with the same node of
  the single-device graph (traced the same way, passes off); a node a pass put in place of one
  (``node.meta["autosp_value_of"]``, e.g. the attention after its all-to-alls) is compared with
  the node it replaces; other inserted nodes (partial sums, padding) are not compared.
* **module level**, for any other impl: forward hooks on every named module record its input
  and output.

Rank values are put back together before comparing: equal shapes must match on every rank
(replicated); a value whose shape differs in one dim is concatenated along it in rank order and
cut to the reference length (padding), using the sequence layout the passes annotated when there
is one. A gradient of equal shape is summed over ranks (the SP convention; a replicated gradient,
as of the loss itself, also matches). The forward is searched first; if every value agrees, the
backward is searched from the loss back: the first gradient that differs names the op whose
backward (through an op consuming that value) went wrong.
"""
from __future__ import annotations

import dataclasses

import inspect
import math
import threading
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from autosp_verify.compare import TensorCheck, Tolerance, check_tensor
from autosp_verify.impls import resolve_impl
from autosp_verify.probes import Probe, register

_CURRENT = threading.local()  # the recorder of the run on this thread (one per rank thread)


@dataclass
class Entry:
    name: str  # node or module (+ " (input)") name on this run
    key: str  # the reference entry it is compared with
    op: str
    source: str
    value: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    seq: tuple | None = None  # (dim, inner, length) of a sequence-sharded value, from the passes' layout
    users: tuple = ()  # ops consuming it: where a wrong gradient comes from
    requires_grad: bool = False


@dataclass
class Recorder:
    entries: list = field(default_factory=list)

    def add(self, name, key, op, source, value, seq=None, users=()):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        entry = Entry(name, key, op, source, value.detach().clone(), None, seq, users, value.requires_grad)
        self.entries.append(entry)
        if value.requires_grad:
            def keep(grad, entry=entry):
                entry.grad = grad.detach().clone() if entry.grad is None else entry.grad + grad.detach()
            value.register_hook(keep)


# --- op level: the autosp graph through a recording interpreter ----------------------------------

def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return f"{node.op} {target}"
    return getattr(target, "__name__", None) or str(target)


def _source(node: fx.Node) -> str:
    """The model's line for a node; a node a pass inserted has none: its first user's then."""
    from autosp.passes.layout import source_line
    seen, frontier = set(), [node]
    while frontier:  # breadth first through users: the nearest op of the model's own code
        candidate = frontier.pop(0)
        if candidate.meta.get("stack_trace"):
            return source_line(candidate) if candidate is node else f"feeding {source_line(candidate)}"
        seen.add(candidate)
        frontier += [u for u in candidate.users if u not in seen]
    return "<no source: inserted by a pass>"


def _seq_of(node: fx.Node, full_len):
    """(dim, inner, length, S) of a sequence-sharded node, from the layout the passes annotated."""
    from autosp.passes.layout import LAYOUT, SHARDED
    lay = node.meta.get(LAYOUT)
    if getattr(lay, "state", None) != SHARDED or lay.dim is None or full_len is None:  # (tuples: per item)
        return None
    length = lay.length.subs({s: full_len for s in lay.length.free_symbols})
    return (lay.dim, lay.inner, int(length), full_len)


class _Interpreter(fx.Interpreter):
    def __init__(self, gm, recorder):
        super().__init__(gm)
        self.recorder = recorder
        self.full_len = None

    def run_node(self, node):
        value = super().run_node(node)
        if node.meta.get("autosp_sequence_length"):
            self.full_len = int(value)
        key = node.meta.get("autosp_value_of")
        if key is not None and node.op in ("call_function", "call_method", "call_module"):  # not params
            self.recorder.add(node.name, key, _op_name(node), _source(node), value,
                              _seq_of(node, self.full_len), tuple(_op_name(u) for u in node.users))
        return value


def recording_backend(gm: fx.GraphModule, example_inputs):
    """An inner backend: plain eager run of the graph, recording when a recorder is set."""
    def run(*args):
        recorder = getattr(_CURRENT, "recorder", None)
        if recorder is None:
            return gm(*args)
        return _Interpreter(gm, recorder).run(*args)
    return run


def _reference_graph_run(model):
    """The model traced like autosp traces it (same marks, so the same node names), passes off."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import autosp

    compiled = autosp.compile(model, config=autosp.SPConfig(backend=recording_backend, passes=()))

    def run(**batch):
        if dist.is_initialized():
            raise RuntimeError("op-level recording of the reference needs a thread without a process group")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
        try:
            return compiled(**batch)
        finally:
            dist.destroy_process_group()
    return run


# --- module level: hooks on named modules ---------------------------------------------------------

def _module_source(module) -> str:
    try:
        fn = inspect.unwrap(type(module).forward)  # a decorated forward: the model's own line
        return f"{inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]} ({type(module).__name__}.forward)"
    except (TypeError, OSError):
        return type(module).__name__


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((t for t in map(_first_tensor, value) if t is not None), None)
    if isinstance(value, dict) or hasattr(value, "values"):
        try:
            return next((t for t in map(_first_tensor, value.values()) if t is not None), None)
        except TypeError:
            return None
    return None


def _watch_modules(model, recorder):
    modules = dict(model.named_modules())
    for name, module in modules.items():
        if not name:
            continue  # the model's own output is the loss and outputs the verifier compares
        op, source = type(module).__name__, _module_source(module)
        parent = name.rpartition(".")[0]
        # A module's input is computed by its parent's forward: that is the code to look at.
        made_in = f"{_module_source(modules[parent])[:-1]} of {parent or 'the model'})"

        def pre(mod, args, kwargs, name=name, op=op, source=made_in):
            recorder.add(f"{name} (input)", f"{name} (input)", op, source, _first_tensor((args, kwargs)))

        def post(mod, args, kwargs, out, name=name, op=op, source=source):
            recorder.add(name, name, op, source, _first_tensor(out))

        # Opaque to Dynamo: an impl that compiles the model breaks its graph here, rather than
        # tracing the recorder (whose side effects it cannot trace).
        module.register_forward_pre_hook(torch._dynamo.disable(pre), with_kwargs=True)
        module.register_forward_hook(torch._dynamo.disable(post), with_kwargs=True)


@register
class RecordProbe(Probe):
    name = "record"

    def __init__(self, spec, on_reference):
        super().__init__(spec, on_reference)
        self.recorder = Recorder()
        self.op_level = hasattr(resolve_impl(spec.impl), "with_backend")

    def wrap_impl(self, impl):
        return impl.with_backend(recording_backend) if self.op_level else impl

    def before(self, model, ctx):
        if self.op_level:
            _CURRENT.recorder = self.recorder
        else:
            _watch_modules(model, self.recorder)

    def wrap_reference(self, run):
        return _reference_graph_run(run) if self.op_level else run

    def after_forward(self, loss, outputs):
        _CURRENT.recorder = None
        self.recorder.add("(step loss)", "(step loss)", "loss", "the loss the step returns", loss)

    def collect(self):
        _CURRENT.recorder = None
        # plain dicts: process simulators send results through torch.load(weights_only=True)
        return {"level": "op" if self.op_level else "module",
                "entries": [dataclasses.asdict(e) for e in self.recorder.entries]}


# --- locating the first divergence ----------------------------------------------------------------

def _entries(recorded) -> list:
    """A recording's entries as ``Entry`` (they travel as dicts, tuples as lists)."""
    out = []
    for e in recorded["entries"]:
        e = dict(e)
        e["seq"] = tuple(e["seq"]) if e.get("seq") is not None else None
        e["users"] = tuple(e.get("users", ()))
        out.append(Entry(**e))
    return out


def _along(values, dim, inner, length):
    """Rank shards of a sequence dim (``inner`` elements per position, padded to ceil(S/P) per
    rank) -> the whole value, padding cut."""
    local = values[0].shape[dim] // inner
    parts = [v.reshape(*v.shape[:dim], -1, local, inner, *v.shape[dim + 1:]) for v in values]
    whole = torch.cat(parts, dim=dim + 1).narrow(dim + 1, 0, length)
    return whole.reshape(*whole.shape[:dim], -1, *whole.shape[dim + 3:])


def _whole(values, ref, seq):
    """(shards -> one tensor, the reference it is compared with), or None when the shapes do not
    say how. Positions past the sequence's end that no rank holds (a causal convolution's last
    outputs, which the model cuts off) are left out of both."""
    if seq is not None:
        dim, inner, length, full_len = seq
        held = sum(v.shape[dim] for v in values) // inner
        kept = length if held >= length or inner != 1 or ref.shape[dim] != length else max(held, full_len)
        if held < kept:
            raise ShardsShort(dim, held, length)
        try:
            whole = _along(values, dim, inner, kept)
            ref = ref.narrow(dim, 0, kept) if kept < length else ref
            return (whole, ref) if whole.shape == ref.shape else None
        except RuntimeError:
            return None
    if any(v.dim() != ref.dim() for v in values):
        return None
    whole = _concatenated(values, ref)
    if whole is None:  # a dim of 1 broadcast where one device holds more (one row for the batch)
        wide = [d for d in range(ref.dim()) if ref.shape[d] > 1 and all(v.shape[d] == 1 for v in values)]
        if wide:
            sizes = [[ref.shape[d] if d in wide else n for d, n in enumerate(v.shape)] for v in values]
            whole = _concatenated([v.expand(*size) for v, size in zip(values, sizes)], ref)
    return None if whole is None else (whole, ref)


def _concatenated(values, ref):
    """Same-rank shards that differ from ``ref`` along one dim -> concatenated along it, or None."""
    for d in range(ref.dim()):  # a whole dim padded on every rank (the sequence, head-sharded)
        if all(v.shape[d] > ref.shape[d] for v in values):
            values = [v.narrow(d, 0, ref.shape[d]) for v in values]
    dims = {d for v in values for d in range(v.dim()) if v.shape[d] != ref.shape[d]}
    if len(dims) != 1:
        return None
    dim = dims.pop()
    whole = torch.cat(values, dim=dim)
    if whole.shape[dim] < ref.shape[dim]:
        raise ShardsShort(dim, whole.shape[dim], ref.shape[dim])
    return whole.narrow(dim, 0, ref.shape[dim])


class ShardsShort(Exception):
    """The ranks' shards along ``dim`` hold fewer positions than the reference: they do not add up."""

    def __init__(self, dim, held, needed):
        super().__init__(f"the shards do not add up: the ranks hold {held} of the reference's {needed} "
                         f"along dim {dim}")


def _check(name, values, ref, seq, tol, grads):
    """The check of one value (or gradient) across ranks; None when it cannot be put together."""
    if any(v is None for v in values):
        return None
    if all(v.shape == ref.shape for v in values):
        each = max((check_tensor(name, v, ref, tol) for v in values), key=lambda c: c.score)
        if not grads or each.passed:
            return each  # replicated: every rank holds the whole value
        return check_tensor(name, sum(v.double() for v in values), ref, tol)  # summed over ranks
    try:
        put_together = _whole(values, ref, seq)
    except ShardsShort as short:
        return TensorCheck(name, abs_err=math.inf, rel_err=math.inf, passed=False, problem=str(short))
    return None if put_together is None else check_tensor(name, *put_together, tol)


def _describe(entry, check, values, ref, phase, last_match):
    shapes = sorted({tuple(v.shape) for v in values if v is not None})
    err = check.problem or f"rel err {check.rel_err:.3g}"
    where = "value" if phase == "forward" else "gradient"
    what = entry.op if entry.key == entry.name else f"{entry.op}, standing for {entry.key}"
    text = (f"{where} of {entry.name} ({what}) differs from one device: {err}; "
            f"rank shapes {shapes}, reference {tuple(ref.shape)}; at {entry.source}")
    if phase == "backward":
        users = f" ({', '.join(entry.users)})" if entry.users else ""
        text += f"; the backward of what consumes it{users} went wrong"
    if last_match:
        text += f"; last matching {where}: {last_match}"
    return {"phase": phase, "name": entry.name, "op": entry.op, "source": entry.source,
            "reference_shape": list(ref.shape), "rank_shapes": [list(s) for s in shapes],
            "abs_err": check.abs_err, "rel_err": check.rel_err, "message": text}


def locate(reference: dict, ranks: list, tol: Tolerance, seq_len: int | None = None):
    """(first_divergence or None, trace): the trace lists every compared value in order."""
    reference, ranks = _entries(reference), [_entries(r) for r in ranks]
    ref_entries = {e.name: e for e in reference}
    per_rank = [{e.name: e for e in r} for r in ranks]
    order = [e for e in ranks[0] if e.key in ref_entries]
    trace, first = [], None
    for phase in ("forward", "backward"):
        last_match, unplaced = None, None
        steps = order if phase == "forward" else list(reversed(order))
        for entry in steps:
            ref = ref_entries[entry.key]
            if entry.key == entry.name and ref.op != entry.op:
                continue  # the two traces disagree here: nothing sound to compare
            ref_value = ref.value if phase == "forward" else ref.grad
            if ref_value is None:
                continue
            found = [r.get(entry.name) for r in per_rank]
            if phase == "forward":
                values = [None if e is None else e.value for e in found]
                if seq_len == 1:
                    values = values[:1]  # a one-position shard has the full shape: other ranks hold padding
            else:  # no gradient reached it on a rank: zero there
                values = [None if e is None else e.grad if e.grad is not None else torch.zeros_like(e.value)
                          for e in found]
            check = _check(entry.name, values, ref_value, entry.seq, tol, grads=phase == "backward")
            if check is None:
                if unplaced is None and all(v is not None for v in values):
                    shapes = sorted({tuple(v.shape) for v in values})
                    unplaced = f"{entry.name} (rank shapes {shapes}, reference {tuple(ref_value.shape)})"
                continue
            if phase == "forward" and check.passed and ref.requires_grad:
                cut = [r for r, e in enumerate(per_rank) if entry.name in e and not e[entry.name].requires_grad]
                if cut:
                    check.passed = False
                    check.problem = (f"no gradient can flow back from it on rank(s) {cut} (it can on one device): "
                                     "a non-differentiable op made it, e.g. a detach or a collective without autograd")
            trace.append({"name": entry.name, "op": entry.op, "phase": phase,
                          "rel_err": check.rel_err if math.isfinite(check.rel_err) else None})
            if first is None and not check.passed:
                first = _describe(entry, check, values, ref_value, phase, last_match)
                if unplaced is not None:  # it may have gone wrong there: say so, it was not compared
                    first["message"] += f"; not compared before it, its shards cannot be put together: {unplaced}"
                    first["not_compared"] = unplaced
            elif first is None:
                last_match = entry.name
        if first is not None:
            break
    return first, trace
