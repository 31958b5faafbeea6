"""Trace one training step symbolically: the forward and backward graphs AOTAutograd runs.

The model is built under a CPU ``FakeTensorMode``: parameters have shapes and dtypes but no
storage, so an 8B model costs nothing. The inputs' sequence dim is marked dynamic, so every size
in the captured graphs is a sympy expression of the sequence symbol; the graphs are captured at
partition time (the min-cut partitioner Inductor uses, or autosp's selective one) and never run
for real. Why CPU fake tensors and not the meta device: on meta, ``nll_loss`` has no autograd
kernel (the loss's backward vanishes from the joint graph) and SDPA decomposes into the math
path; CPU fake tensors give the graphs a real run gets.

``impl="one_device"`` is plain ``torch.compile`` of the model (no passes); ``impl="autosp"`` is
``autosp.compile`` on a fake process group of ``world_size`` ranks (rank 0).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import fx

import autosp
from autosp.config import SEQUENCE_INPUTS, SPConfig
from autosp.errors import AutoSPError

IMPLS = ("one_device", "autosp")
CHECKPOINTING = (None, "selective")


@dataclass
class Captured:
    """The partitioned graphs of one compiled training step."""
    fw: fx.GraphModule
    bw: fx.GraphModule
    num_fwd_outputs: int


@dataclass
class Trace:
    """What the memory program is built from (see program.py)."""
    graphs: Captured
    symbols: frozenset  # the sequence-length symbols (each stands for S, or for local_lengths' value)
    guards: list  # sympy conditions the graphs were specialised under
    world_size: int
    impl: str
    checkpointing: str | None
    layers_traced: int | None = None  # None: the model as given
    meta: dict = field(default_factory=dict)
    # {symbol: its value in S}: autosp's local length ceil(S/P) has a symbol of its own
    local_lengths: dict = field(default_factory=dict)


class CaptureBackend:
    """An AOTAutograd backend that keeps the forward and backward graphs of every compile.

    The graphs run eagerly (``boxed_nop``), so a real run through this backend executes exactly
    the graphs the simulator reads (the validation tests rely on it)."""

    def __init__(self, checkpointing: str | None = None):
        if checkpointing not in CHECKPOINTING:
            raise ValueError(f"checkpointing must be one of {CHECKPOINTING}, got {checkpointing!r}")
        self.checkpointing = checkpointing
        self.captured: list[Captured] = []

    def _partition(self, joint, inputs, *, num_fwd_outputs, **kwargs):
        from torch._functorch.partitioners import min_cut_rematerialization_partition
        if self.checkpointing == "selective":
            from autosp.checkpointing import selective_partition
            fn = selective_partition(None, 0)  # symbol None: every symbolic dim carries the sequence
        else:
            fn = functools.partial(min_cut_rematerialization_partition, compiler="inductor")
        fw, bw = fn(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        self.captured.append(Captured(fw, bw, num_fwd_outputs))
        return fw, bw

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop
        inner = aot_autograd(fw_compiler=boxed_nop, bw_compiler=boxed_nop, partition_fn=self._partition)
        return inner(gm, example_inputs)

    def last(self) -> Captured:
        if not self.captured:
            raise AutoSPError("the model compiled without a backward graph (does its loss require grad?)")
        return self.captured[-1]


@contextlib.contextmanager
def fake_world(world_size: int):
    """A fake process group of ``world_size`` ranks on this thread (rank 0), destroyed after."""
    import sys
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise AutoSPError("the scale simulator needs a thread with no process group initialized")
    hook = sys.excepthook  # init_process_group wraps it (a rank prefix), destroy does not unwrap
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


def compiled_step(model, impl: str, backend, block_elements: int = 0):
    """``step(**inputs)``: the model compiled through ``backend``, plainly or through autosp."""
    if impl == "autosp":
        return autosp.compile(model, config=SPConfig(backend=backend, attention_block_elements=block_elements))
    if impl != "one_device":
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    compiled = torch.compile(model, backend=backend, fullgraph=True)

    def step(**inputs):
        marked = {k: autosp.prepare_inputs(v)[0] if k in SEQUENCE_INPUTS and isinstance(v, torch.Tensor)
                  and v.dim() >= 2 else v for k, v in inputs.items()}
        return compiled(**marked)
    return step


def build_model(model_fn, layers: int | None = None):
    """``model_fn()`` on the meta device (no storage; ``.float()`` and friends work there), with
    only its first ``layers`` decoder layers if given."""
    from autosp_verify.scale.layers import truncate_layers
    with torch.device("meta"):
        model = model_fn()
    if layers is not None:
        truncate_layers(model, layers)
    return model


def to_fake(model, mode, dtype: torch.dtype) -> None:
    """Every parameter and buffer becomes a fake CPU tensor (floating ones of ``dtype``), in
    place; tied parameters stay tied. Fake CPU, not meta: see the module docstring."""
    done: dict = {}

    def fake(t):
        if id(t) not in done:
            with mode:
                new = torch.empty_strided(t.shape, t.stride(), device="cpu",
                                          dtype=dtype if t.is_floating_point() else t.dtype)
            done[id(t)] = torch.nn.Parameter(new, requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else new
        return done[id(t)]
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in list(table.items()):
                if t is not None:
                    table[name] = fake(t)


def state_size(model, dtype: torch.dtype) -> dict:
    """Parameter count (tied ones once) and the bytes of parameters and buffers in ``dtype``."""
    params = list(model.parameters())
    size = torch.empty((), dtype=dtype).element_size()
    buffers = sum(b.numel() * (size if b.is_floating_point() else b.element_size()) for b in model.buffers())
    numel = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {"param_numel": numel, "trainable_numel": trainable, "buffer_bytes": buffers}


def _sequence_symbols(captured: Captured) -> frozenset:
    """The symbols of the forward's symbolic placeholders (the marked sequence lengths)."""
    symbols = set()
    for node in captured.fw.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.SymInt):
            symbols |= val.node.expr.free_symbols
        elif node.op == "placeholder" and isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    symbols |= s.node.expr.free_symbols
    if not symbols:
        raise AutoSPError("no dynamic sequence dim in the traced graph: the inputs carry no sequence")
    return frozenset(symbols)


def _shape_env(captured: Captured):
    """The ShapeEnv of the forward's symbolic sizes (None: no symbolic input)."""
    for node in captured.fw.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        for s in [val] if isinstance(val, torch.SymInt) else list(getattr(val, "shape", ())):
            if isinstance(s, torch.SymInt):
                return s.node.shape_env
    return None


def _local_lengths(captured: Captured, symbols) -> dict:
    """{symbol: expression in S} for the sequence symbols that stand for autosp's local length."""
    from autosp.local_symbol import stands_for
    env = _shape_env(captured)
    return {s: e for s, e in stands_for(env).items() if s in symbols} if env is not None else {}


def _guards(captured: Captured) -> list:
    env = _shape_env(captured)
    return [g.expr for g in env.guards] if env is not None else []


def trace_step(model_fn, inputs_fn, *, impl: str = "autosp", world_size: int = 1, batch: int = 1,
               dtype: torch.dtype = torch.bfloat16, checkpointing: str | None = None,
               block_elements: int = 0, layers: int | None = None, trace_len: int | None = None) -> Trace:
    """Trace one training step of ``model_fn()`` on fake tensors; see the module docstring.

    ``layers``: build the model with only its first ``layers`` decoder layers (see layers.py).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "one_device" and world_size != 1:
        raise ValueError(f"impl 'one_device' runs on one rank, got world_size={world_size}")
    length = trace_len or 16 * world_size + 3  # P does not divide it: the padded graph, never specialised
    real_inputs = inputs_fn(batch, length, torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    backend = CaptureBackend(checkpointing)
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    model = build_model(model_fn, layers)
    to_fake(model, mode, dtype)
    model.train()
    with fake_world(world_size), mode:
        inputs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in real_inputs.items()}
        compiled_step(model, impl, backend, block_elements)(**inputs)
    captured = backend.last()
    torch._dynamo.reset()
    symbols = _sequence_symbols(captured)
    return Trace(captured, symbols, _guards(captured), world_size, impl, checkpointing,
                 layers, {"batch": batch, "dtype": str(dtype).removeprefix("torch."), "trace_len": length,
                          "block_elements": block_elements}, _local_lengths(captured, symbols))
