"""Accounting: what a case costs per rank, next to what Ulysses needs at least.

Three figures per case, in ``CaseResult.accounting`` (JSON) and the table's columns
``a2a/ar (min)``, ``sent/rank (min)``, ``mem/rank (1/P)`` and, when timed, ``compile s (no SP)``.

Collectives (``collectives``)
    Per training step (forward and backward) and per rank, by kind, and the bytes each rank
    sends to the other ranks. Measured only for impls whose step says ``autosp_counted``: an
    ``autosp.compile`` callable (the ``autosp*`` impls, or a user impl returning one) or
    ``autosp-wrap``'s step (its eager ops count the same way, adding all-gathers and
    reduce-scatters): autosp counts every
    collective its ops run, per thread (``autosp.collective_counts``), and its graph runs no
    other. ``measured`` is the rank that sends most (``per_rank``: every rank). Other impls show
    "-": nothing sound and non-global sees their collectives.

    The Ulysses minimum comes from the single-device reference: a torch-function mode records
    every ``scaled_dot_product_attention`` call (q/k/v shapes, ``enable_gqa``, and how many
    distinct key/value heads k and v really hold, since HF's ``repeat_kv`` copies them). Per
    attention, with H query heads, Hkv key/value heads, sequence S, P ranks, L = ceil(S/P):

    * 4 all-to-alls forward (q, k, v, out) and 4 backward (their gradients), each moving this
      rank's local tensor: q and out with ``Hq' = ceil(H/P)*P`` heads (padded to a multiple of
      P) and L positions; k and v with ``Hkv'`` heads: ``Hkv`` when P divides it, P when Hkv
      divides P (each rank gets the kv head of its query heads), otherwise ``Hq'`` (plain
      repetition; also whenever P does not divide H, as the padded heads then straddle groups);
    * 1 all-reduce of the loss (its numel x itemsize; no collective in the backward).

    Bytes are counted the same way on both sides: autosp counts the bytes handed to each
    collective (numel x itemsize of the send buffer), the minimum the bytes of the same buffers,
    and both are turned into **bytes sent to other ranks**: x (P-1)/P for an all-to-all (the
    chunk for itself stays), x 2(P-1)/P for an all-reduce (ring).

Activation memory (``memory``)
    The tensors the autograd graph holds for the backward right after the forward: the peak of
    activation memory in a training step (parameters, buffers and the batch excluded; transient
    buffers inside the forward, e.g. all-to-all send buffers, are not in it). The graph
    is walked from ``loss.grad_fn``: builtin nodes expose ``_saved_*``, custom-function nodes
    (autosp's ops, AOTAutograd's ``CompiledFunctionBackward``) ``saved_tensors``; storages are
    counted once. Compared like with like: the single-device figure is the model run the way
    the ranks run it, without the passes: eager for eager impls, ``torch.compile(backend=X)``
    for an autosp impl with inner backend X (``aot_eager_decomp_partition`` standing in for
    Inductor: the same partitioner without codegen), the sequence dim marked dynamic as autosp
    marks it.

    Which tensors are *sequence-long* is measured, not guessed from sizes (a hidden size can
    equal B*S): everything is run a second time with the sequence P positions longer (the same
    padding), and a tensor whose shape changes in exactly one dim is sequence-long (activations,
    q/k/v after the all-to-all); in two dims *sequence-squared* ([.., S, S] masks and scores:
    Ulysses keeps the whole [S, S] of a head-broadcast mask on every rank, so 1/P is not its
    ideal); no dim: other. ``ratio`` (the table's column) is the largest rank's sequence-long
    bytes, sequence-squared ones included, over the single-device ones, next to the ideal 1/P;
    ``activation_ratio`` counts the sequence-long ones alone, ``seq2_ratio`` the squared ones
    alone, ``rank_seq2_bytes`` is the largest rank's squared bytes (the table marks a row whose
    ranks hold any), and ``total_ratio`` counts every saved tensor. When P does not divide S every
    rank holds L = ceil(S/P) positions, so the ideal is L/S (above 1/P).

Compile time (``compile_s``, opt-in: ``compile_time=True`` / ``--compile-time``)
    Seconds for ``autosp.compile(model, backend=X).warm_up(P, **batch)`` (Dynamo, the passes,
    AOTAutograd and X, and one forward and backward on a fake process group) against
    ``torch.compile(model, backend=X, fullgraph=True)`` plus one forward and backward on the full
    batch on one device; fresh model copies and fresh backend objects (no Dynamo cache entry
    applies), FX-graph and AOTAutograd caches off, sequence dim dynamic in both. Wall seconds, and
    this process's CPU seconds (``*_cpu``: steadier on a loaded machine; Inductor's compile
    workers are other processes and not in it). The table shows wall seconds.
"""
from __future__ import annotations

import copy
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from autosp_verify.core import lifted_recompile_limit
from autosp_verify.outputs import split_output
from autosp_verify.probes import Probe, register

NAME = "accounting"
# Inner backend -> the single-device backend that saves the same set of tensors.
BASELINE_BACKEND = {"eager": "eager", "aot_eager": "aot_eager", "inductor": "aot_eager_decomp_partition"}


# --- saved tensors --------------------------------------------------------------------------------

def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def _node_tensors(node) -> list:
    found = []
    for attr in dir(node):
        if attr.startswith("_saved_"):
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed (a backward ran)
                value = None
            values = value if isinstance(value, (tuple, list)) else (value,)
            found += [v for v in values if isinstance(v, torch.Tensor)]
    try:
        found += [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
    except (AttributeError, RuntimeError):  # builtin nodes have none; or already freed
        pass
    return found


def saved_activations(loss, exclude: set = frozenset()) -> tuple[list, bool]:
    """([(shape, bytes)] of the storages the graph of ``loss`` saves for the backward, in a fixed
    walk order, storages in ``exclude`` left out; whether an AOTAutograd node was met)."""
    seen, out, visited, compiled = set(), [], set(), False
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        compiled |= type(node).__name__ == "CompiledFunctionBackward"
        for t in _node_tensors(node):
            storage = t.untyped_storage()
            if storage.data_ptr() in exclude or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            out.append((tuple(t.shape), storage.nbytes()))
        stack += [n for n, _ in reversed(node.next_functions)]
    return out, compiled


def _mark_sequence(batch: dict, seq_len: int) -> dict:
    """New aliases of the batch with the sequence dim (dim 1 of size seq_len) dynamic, as autosp
    marks it, and every other dim static."""
    from autosp import prepare_inputs
    if seq_len < 2:
        return batch  # a length-1 dim is never symbolic (prepare_inputs refuses it)
    return {key: prepare_inputs(t)[0] if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[1] == seq_len
            else t for key, t in batch.items()}


def baseline_saved(base, batch: dict, seq_len: int, seed: int, backend: str | None) -> list:
    """The single-device saved tensors: ``base`` eager (backend None) or compiled with ``backend``."""
    model = copy.deepcopy(base)
    exclude = _storages([*model.parameters(), *model.buffers(), *batch.values()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if backend is None:
            loss, _ = split_output(model(**batch))
        else:
            with lifted_recompile_limit():
                compiled = torch.compile(model, backend=backend, fullgraph=True)
                loss, _ = split_output(compiled(**_mark_sequence(batch, seq_len)))
    return saved_activations(loss, exclude)[0]


def classify(at_s: list, at_s2: list) -> dict | None:
    """Bytes at S by how many dims change when the sequence grows (the same walk at S and S2)."""
    if len(at_s) != len(at_s2) or any(len(a) != len(b) for (a, _), (b, _) in zip(at_s, at_s2)):
        return None
    sums = {"seq": 0, "seq2": 0, "other": 0, "total": 0}
    for (shape, nbytes), (shape2, _) in zip(at_s, at_s2):
        changed = sum(a != b for a, b in zip(shape, shape2))
        sums["seq" if changed == 1 else "seq2" if changed >= 2 else "other"] += nbytes
        sums["total"] += nbytes
    return sums


# --- the probe ------------------------------------------------------------------------------------

class _SDPARecorder(TorchFunctionMode):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append(_sdpa_call(*args[:3], bool(kwargs.get("enable_gqa", False))))
        return func(*args, **kwargs)


def _distinct_heads(k, v) -> int:
    """The fewest kv heads that k and v are repetitions of (repeat_interleave along the heads)."""
    heads = k.shape[-3]
    for n in range(1, heads):
        if heads % n == 0:
            r = heads // n
            if all(torch.equal(t, t[..., ::r, :, :].repeat_interleave(r, dim=-3)) for t in (k, v)):
                return n
    return heads


def _sdpa_call(q, k, v, enable_gqa: bool) -> dict:
    call = {"q": tuple(q.shape), "k": tuple(k.shape), "v": tuple(v.shape), "enable_gqa": enable_gqa,
            "itemsize": q.element_size(), "kv_heads": k.shape[-3] if k.dim() >= 3 else 1}
    with torch.no_grad():
        if k.dim() >= 3 and k.shape[:-1] == v.shape[:-1] and k.shape[-3] > 1:
            call["kv_heads"] = _distinct_heads(k.detach(), v.detach())
    return call


@register
class Accounting(Probe):
    """Reference: SDPA calls, loss size. Ranks: autosp's collective counts. Both: saved tensors."""
    name = NAME

    def before(self, model, ctx):
        self.exclude = _storages([*model.parameters(), *model.buffers()])
        self.saved, self.compiled, self.sdpa, self.loss_bytes = None, False, [], None
        self.autosp_step = None

    def wrap_reference(self, run):
        def recorded(*args, **kwargs):
            self._inputs(args, kwargs)
            with _SDPARecorder(self.sdpa):
                return run(*args, **kwargs)
        return recorded

    def _inputs(self, args, kwargs):
        self.exclude |= _storages([*args, *kwargs.values()])

    def wrap_impl(self, impl):
        probe = self

        def wrapped(model, group):
            step = impl(model, group)
            is_autosp = getattr(step, "autosp_counted", False)

            def run(*args, **kwargs):
                probe._inputs(args, kwargs)
                if is_autosp:
                    probe.autosp_step = step
                    _autosp_reset()
                return step(*args, **kwargs)
            return run

        wrapped.__dict__.update(getattr(impl, "__dict__", {}))
        if hasattr(impl, "with_backend"):
            wrapped.with_backend = lambda backend: self.wrap_impl(impl.with_backend(backend))
        return wrapped

    def after_forward(self, loss, outputs):
        self.saved, self.compiled = saved_activations(loss, self.exclude)
        self.loss_bytes = loss.numel() * loss.element_size()

    def collect(self):
        data = {"saved": self.saved, "compiled": self.compiled}
        if self.on_reference:
            data.update(sdpa=self.sdpa, loss_bytes=self.loss_bytes)
        elif self.autosp_step is not None:
            import autosp
            config = getattr(self.autosp_step, "config", None)
            backend = config.backend if config is not None else None
            data.update(collectives=dict(autosp.collective_counts()),
                        backend=backend if isinstance(backend, str) else None)
        return data


def _autosp_reset():
    import autosp
    autosp.reset_collective_counts()


# --- the Ulysses minimum --------------------------------------------------------------------------

def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def ulysses_minimum(sdpa_calls: list, loss_bytes: int | None, world_size: int) -> dict:
    """Collectives by kind and bytes handed to them per rank (see the module docstring)."""
    P = world_size
    counts = {"all_to_all": 0, "all_to_all_bytes": 0, "all_reduce": 1, "all_reduce_bytes": loss_bytes or 0}
    for c in sdpa_calls:
        q, k, v, size = c["q"], c["k"], c["v"], c["itemsize"]
        S = q[-2]
        L = -(-S // P)
        hq = q[-3] if len(q) >= 3 else 1
        hk_shape = k[-3] if len(k) >= 3 else 1
        hkv = c["kv_heads"]
        hq_pad = -(-hq // P) * P
        if hkv == hq or hq % P:
            hkv_sent = hq_pad
        elif hkv % P == 0:
            hkv_sent = hkv
        elif P % hkv == 0:
            hkv_sent = P
        else:
            hkv_sent = hq_pad
        per_pos_head = {"q": _numel(q) // (hq * S), "k": _numel(k) // (hk_shape * k[-2]),
                        "v": _numel(v) // (hk_shape * v[-2])}
        out = per_pos_head["q"] // q[-1] * v[-1]  # out has q's batch dims and v's head dim
        one_way = L * size * (hq_pad * (per_pos_head["q"] + out) + hkv_sent * (per_pos_head["k"] + per_pos_head["v"]))
        counts["all_to_all"] += 8
        counts["all_to_all_bytes"] += 2 * one_way
    return counts


def bytes_sent(counts: dict, world_size: int) -> float:
    """Bytes a rank sends to the other ranks, from bytes handed to collectives by kind."""
    P = world_size
    a2a = counts.get("all_to_all_bytes", 0) * (P - 1) / P
    ar = counts.get("all_reduce_bytes", 0) * 2 * (P - 1) / P
    ag = counts.get("all_gather_bytes", 0) * (P - 1)  # its chunk, to every other rank (autosp-wrap)
    rs = counts.get("reduce_scatter_bytes", 0) * (P - 1) / P  # done as an all-to-all (autosp-wrap)
    return a2a + ar + ag + rs


# --- per case -------------------------------------------------------------------------------------

def _baseline_backend(rank_data: list):
    backends = {d.get("backend") for d in rank_data}
    if len(backends) == 1 and (backend := backends.pop()) in BASELINE_BACKEND:
        return BASELINE_BACKEND[backend], f"torch.compile(backend={BASELINE_BACKEND[backend]!r}), no passes"
    if any(d.get("compiled") for d in rank_data):
        return "aot_eager_decomp_partition", "torch.compile(backend='aot_eager_decomp_partition') (impl compiled, backend unknown)"
    return None, "eager"


def _collectives(spec, ref_data, rank_data):
    minimum = ulysses_minimum(ref_data.get("sdpa", []), ref_data.get("loss_bytes"), spec.world_size)
    out = {"minimum": {"all_to_all": minimum["all_to_all"], "all_reduce": minimum["all_reduce"],
                       "bytes_sent": bytes_sent(minimum, spec.world_size),
                       "bytes_handed": minimum["all_to_all_bytes"] + minimum["all_reduce_bytes"]},
           "per_rank": None, "measured": None, "at_minimum": None}
    counts = [d.get("collectives") for d in rank_data]
    if counts and all(c is not None for c in counts):
        per_rank = []
        for c in counts:
            kinds = {k: v for k, v in c.items() if not k.endswith("_bytes")}
            handed = sum(v for k, v in c.items() if k.endswith("_bytes"))
            per_rank.append({**kinds, "bytes_sent": bytes_sent(c, spec.world_size), "bytes_handed": handed})
        out["per_rank"] = per_rank
        worst = max(per_rank, key=lambda r: r["bytes_sent"])
        out["measured"] = worst
        out["at_minimum"] = (worst.get("all_to_all", 0) == minimum["all_to_all"]
                             and worst.get("all_reduce", 0) == minimum["all_reduce"]
                             and worst["bytes_handed"] <= out["minimum"]["bytes_handed"])
    return out


NO_SP_RATIO = 0.9  # a rank saving this share of one device's activations or more: no sequence split


def sequence_parallel(ref_data, rank_data, world_size) -> dict | None:
    """Whether the sequence was split, from what every case measures anyway: the activations
    the largest rank saves for its backward over the one device's (about 1/P plus what stays
    whole when it was; 1 or more when every rank ran the whole sequence, which is exact too).
    None at P=1 or when nothing was recorded."""
    ref_bytes = sum(b for _, b in ref_data.get("saved") or [])
    ranks = [sum(b for _, b in d.get("saved") or []) for d in rank_data if d.get("saved") is not None]
    if world_size < 2 or not ref_bytes or not ranks:
        return None
    ratio = max(ranks) / ref_bytes
    return {"saved_ratio": ratio, "happened": ratio < NO_SP_RATIO}


def _memory(spec, base, batch, batch2, rank_data, rank_data2):
    backend, how = _baseline_backend(rank_data)
    S2 = spec.seq_len + spec.world_size
    ref_s = baseline_saved(base, batch, spec.seq_len, spec.seed, backend)
    ref = classify(ref_s, baseline_saved(base, batch2, S2, spec.seed, backend)) if batch2 is not None else None
    ranks = [classify(a["saved"], b["saved"]) for a, b in zip(rank_data, rank_data2)] if rank_data2 else []
    P, S = spec.world_size, spec.seq_len
    out = {"baseline": how, "reference_bytes": sum(b for _, b in ref_s),
           "rank_bytes": [sum(b for _, b in d["saved"]) for d in rank_data], "ideal": 1 / P,
           "ideal_padded": -(-S // P) / S}
    out["total_ratio"] = max(out["rank_bytes"]) / out["reference_bytes"] if out["reference_bytes"] else None
    if ref is not None and ranks and all(r is not None for r in ranks):
        out["reference"], out["ranks"] = ref, ranks
        seq_long = [r["seq"] + r["seq2"] for r in ranks]  # [S, S] tensors are sequence-long too
        out["ratio"] = max(seq_long) / (ref["seq"] + ref["seq2"]) if ref["seq"] + ref["seq2"] else None
        out["activation_ratio"] = max(r["seq"] for r in ranks) / ref["seq"] if ref["seq"] else None
        out["seq2_ratio"] = max(r["seq2"] for r in ranks) / ref["seq2"] if ref["seq2"] else None
        out["rank_seq2_bytes"] = max(r["seq2"] for r in ranks)
    else:
        out["ratio"] = None
        out["note"] = ("sequence-long tensors not told apart: " +
                       ("no run at S+P" if batch2 is None else "the run at S+P saved a different set of tensors"))
    return out


def _longer_batch(spec, base, inputs_fn):
    """The spec and batch at S + P (same seed, same padding), for the run that tells
    sequence-long tensors apart."""
    from autosp_verify.core import build_case
    spec2 = dataclasses.replace(spec, seq_len=spec.seq_len + spec.world_size, probes=(NAME,), weights_path=None)
    return spec2, build_case(lambda: base, inputs_fn, spec2)[1]


def account(spec, ref, ranks, base, batch, *, inputs_fn=None, rerun=None, memory=True) -> dict:
    """The case's accounting from the probe data of the reference and the ranks. ``memory``: also
    the activation memory, which runs the ranks again on a batch P positions longer
    (``rerun(spec2, batch2) -> rank results``) and the single-device model twice."""
    ref_data = ref.probes.get(NAME) or {}
    ranks = [r for r in ranks if r is not None]  # the fake simulator runs only some ranks
    rank_data = [(r.get("probes") or {}).get(NAME) or {} for r in ranks]
    result = {"collectives": _collectives(spec, ref_data, rank_data)}
    sp = sequence_parallel(ref_data, rank_data, spec.world_size)
    if sp is not None:
        result["sequence_parallel"] = sp
    if memory and rank_data and all(d.get("saved") is not None for d in rank_data):
        batch2, ranks2 = None, None
        try:
            spec2, batch2 = _longer_batch(spec, base, inputs_fn)
            ranks2 = [r["probes"][NAME] for r in rerun(spec2, batch2) if r is not None]
        except Exception as exc:  # noqa: BLE001 (reported: the accounting never fails a case)
            result["memory_note"] = f"the run at S+P failed: {type(exc).__name__}: {exc}"
            batch2 = None
        result["memory"] = _memory(spec, base, batch, batch2, rank_data, ranks2)
    return result


def account_case(spec, ref, ranks, base, batch, inputs_fn, rerun, *, memory=False, compile_time=False) -> dict:
    """:func:`account` (and :func:`compile_times`) for run_case; ``rerun(spec2, batch2)`` runs the
    ranks again on another batch. Never raises: a failure is reported."""
    try:
        result = account(spec, ref, ranks, base, batch, inputs_fn=inputs_fn, rerun=rerun, memory=memory)
        if compile_time:
            result["compile_s"] = compile_times(spec, base, batch)
    except Exception as exc:  # noqa: BLE001 (reported: the accounting never fails a case)
        result = {"error": f"{type(exc).__name__}: {exc}"}
    return result


# --- compile time ---------------------------------------------------------------------------------

def _fresh(backend: str):
    """A backend object Dynamo has never seen, compiling with ``backend``: no cache entry applies."""
    def fresh(gm, example_inputs):
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    return fresh


def compile_times(spec, base, batch) -> dict | None:
    """Seconds to compile with the passes (autosp.compile + warm_up) and without (torch.compile),
    forward and backward each, for the named autosp impls; None for other impls."""
    from autosp_verify.impls import _AUTOSP_IMPLS
    backend = {"autosp": "aot_eager", "autosp-eager": "eager", "autosp-inductor": "inductor"}.get(spec.impl)
    if not isinstance(spec.impl, str) or spec.impl not in _AUTOSP_IMPLS or backend is None:
        return None
    import torch._functorch.config
    import torch._inductor.config

    import autosp
    with lifted_recompile_limit(), torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        model = copy.deepcopy(base)
        start, cpu = time.perf_counter(), time.process_time()
        compiled = torch.compile(model, backend=_fresh(backend), fullgraph=True)
        loss, _ = split_output(compiled(**_mark_sequence(batch, spec.seq_len)))
        params = [p for p in model.parameters() if p.requires_grad]
        if loss.requires_grad and params:
            torch.autograd.grad(loss, params, allow_unused=True)
        without, without_cpu = time.perf_counter() - start, time.process_time() - cpu
        model = copy.deepcopy(base)
        start, cpu = time.perf_counter(), time.process_time()
        autosp.compile(model, backend=_fresh(backend)).warm_up(spec.world_size, **batch)
        with_passes, with_cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"with_passes": with_passes, "without": without, "with_passes_cpu": with_cpu, "without_cpu": without_cpu,
            "backend": backend}
