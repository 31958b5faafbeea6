"""The accounting probe: on the reference, every attention (for the Ulysses minimum) and the loss
size; on the ranks, autosp's collective counts; on both, the saved tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from autosp_verify.accounting.saved import _storages, saved_activations
from autosp_verify.probes import Probe, register

NAME = "accounting"


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_CONVS = {torch.conv1d, F.conv1d}
_PADS = {F.pad, torch._C._nn.pad}


class _SDPARecorder(TorchFunctionMode):
    """Every attention: SDPA's calls, and attention written out (``q @ k^T`` over the sequence on
    both sides, then ``@ v``; or the same as einsums), recorded as the SDPA call it stands for."""

    def __init__(self, calls: list, seq_len: int, convs: list | None = None):
        super().__init__()
        self.calls, self.seq_len, self.convs = calls, seq_len, convs
        self.pads = {}  # id of a zero-padded sequence -> (its record, the tensor: kept alive), until a conv reads it
        self.scores = None  # (q, k, heads label or None) in SDPA's layout, until the values come

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls.append(_sdpa_call(*args[:3], bool(kwargs.get("enable_gqa", False))))
        elif func in _MATMULS and len(args) == 2 and all(isinstance(t, torch.Tensor) and t.dim() >= 3 for t in args):
            a, b, S = *args, self.seq_len
            if a.shape[-2] == S and b.shape[-1] == S:
                self.scores = (a, b.transpose(-2, -1), None)
            elif self.scores is not None and a.shape[-2:] == (S, S) and b.shape[-2] == S:
                self._attended(b)
        elif func is torch.einsum:
            self._einsum(args)
        elif func in _CONVS and self.convs is not None and args:
            padded = self.pads.pop(id(args[0]), (None, None))[0]
            call = _conv_call(args, kwargs, self.seq_len, padded["pad"] if padded else (0, 0))
            if call:
                if padded:  # a causal conv written as pad, then conv: one halo
                    self.convs.remove(padded)
                self.convs.append(call)
        elif func in _PADS and self.convs is not None and args:
            out = func(*args, **kwargs)
            call = _pad_call(args, kwargs, self.seq_len)
            if call:
                self.convs.append(call)
                self.pads[id(out)] = (call, out)
            return out
        return func(*args, **kwargs)

    def _attended(self, v):
        q, k, _ = self.scores
        self.calls.append(_sdpa_call(q, k, v, False))
        self.scores = None

    def _einsum(self, args):
        """``bhid,bhjd->bhij`` then ``bhij,bhjd->bhid`` (any labels, any order of dims): q, k and v
        laid out as SDPA takes them by their labels."""
        operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
        equation = args[0].replace(" ", "") if isinstance(args[0], str) else ""
        if "->" not in equation or "." in equation or len(operands) != 2 or equation.count(",") != 1:
            return
        inputs, out = equation.split("->")
        labels = inputs.split(",")
        seq = [[label for label, n in zip(names, t.shape) if n == self.seq_len] for names, t in zip(labels, operands)]
        if self.scores is None and all(len(found) == 1 for found in seq) and out.find(seq[0][0]) > 0:
            split = out[out.index(seq[0][0]) - 1]  # the heads: the label before the queries
            if split in labels[0] and split in labels[1]:
                q, k = (_as_sdpa(t, names, found[0], split) for t, names, found in zip(operands, labels, seq))
                self.scores = (q, k, split)
        elif self.scores is not None and self.scores[2] is not None and self.scores[2] in labels[1] \
                and len(seq[1]) == 1:
            self._attended(_as_sdpa(operands[1], labels[1], seq[1][0], self.scores[2]))


def _conv_call(args, kwargs, seq_len: int, pad=(0, 0)) -> dict | None:
    """A ``conv1d`` along the sequence (its last dim; ``pad``: the zeros an ``F.pad`` put before and
    after it), stride 1: the positions each output reads before and after its own (from the
    padding, dilation and kernel), and a position's bytes."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation")
    given = {**dict(zip(names, args)), **kwargs}
    x, weight = given.get("input"), given.get("weight")
    single = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    if not isinstance(x, torch.Tensor) or not x.requires_grad or x.shape[-1] != seq_len + sum(pad) \
            or single(given.get("stride", 1)) != 1:  # activations only: labels, masks are padded whole
        return None
    reach = single(given.get("dilation", 1)) * (weight.shape[-1] - 1)
    padding = given.get("padding", 0)
    left = pad[0] + (reach // 2 if padding == "same" else 0 if padding == "valid" else single(padding))
    return {"seq_len": seq_len, "left": left, "right": max(0, reach - left),
            "position_bytes": x.numel() // x.shape[-1] * x.element_size()}


def _pad_call(args, kwargs, seq_len: int) -> dict | None:
    """``F.pad`` with (a, b) zeros along a dim of the sequence's length: position i reads i - a."""
    x, pad = args[0], args[1] if len(args) > 1 else kwargs.get("pad", ())
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    if not isinstance(x, torch.Tensor) or not x.requires_grad or mode != "constant":  # labels: padded whole
        return None
    for i in range(min(len(pad) // 2, x.dim())):
        a, b = pad[2 * i], pad[2 * i + 1]
        if x.shape[x.dim() - 1 - i] == seq_len and (a or b):
            return {"seq_len": seq_len, "left": max(a, 0), "right": max(-a, 0), "pad": (a, b),
                    "position_bytes": x.numel() // seq_len * x.element_size()}
    return None


def _as_sdpa(t, labels: str, seq: str, split: str):
    """``t`` with its heads and sequence dims moved to -3 and -2 (the layout SDPA takes)."""
    return t.movedim((labels.index(split), labels.index(seq)), (-3, -2))


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
        self.saved, self.compiled, self.sdpa, self.convs, self.loss_bytes = None, False, [], [], None
        self.autosp_step = None

    def wrap_reference(self, run):
        def recorded(*args, **kwargs):
            self._inputs(args, kwargs)
            with _SDPARecorder(self.sdpa, self.spec.seq_len, self.convs):
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
            data.update(sdpa=self.sdpa, convs=self.convs, loss_bytes=self.loss_bytes)
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
