"""The scale simulator's API: per-rank peak memory of one training step, and the longest
sequence that fits a budget, for a model file at any sequence length and SP degree.

    sim = Simulator.from_file("fixtures/scale_llama3_8b.py")
    point = sim.point(Scenario("autosp", sp=8), 131072)     # Point: total bytes and parts
    sim.longest(Scenario("autosp", sp=8), 80 * 2**30)       # tokens

Each (graph, SP degree, checkpointing) is traced once (trace.py), with the decoder stack cut
to ``traced_layers()`` layers and extended to all of them (layers.py) when the layers are alike;
every length after that costs an evaluation of the program (evaluate.py), milliseconds.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from autosp_verify.scale import layers as stack
from autosp_verify.scale.evaluate import Peak, check_guards, evaluate
from autosp_verify.scale.program import Program, build_program
from autosp_verify.scale.state import Training, dtype_of, state_of
from autosp_verify.scale.trace import build_model, state_size, trace_step

IMPLS = ("one_device", "plain_dp", "autosp")
PARTS = ("parameters", "gradients", "optimizer", "saved", "temporaries", "input_derived", "masks")
MAX_LEN = 1 << 30


@dataclass(frozen=True)
class Scenario:
    """``one_device``: plain torch.compile on one rank. ``plain_dp``: the same graph on each of
    ``dp`` data-parallel ranks (ZeRO over them). ``autosp``: autosp.compile over ``sp`` ranks,
    times ``dp`` replicas (ZeRO over sp x dp)."""
    impl: str
    sp: int = 1
    dp: int = 1
    checkpointing: str | None = None

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        if self.sp < 1 or self.dp < 1:
            raise ValueError(f"sp and dp must be >= 1, got sp={self.sp}, dp={self.dp}")
        if self.impl != "autosp" and self.sp != 1:
            raise ValueError(f"{self.impl} has no sequence parallelism (sp={self.sp})")
        if self.impl == "one_device" and self.dp != 1:
            raise ValueError("one_device runs on one rank: use plain_dp for several")

    @property
    def ranks(self) -> int:
        return self.sp * self.dp

    @property
    def graph(self) -> str:
        return "autosp" if self.impl == "autosp" else "one_device"

    @property
    def label(self) -> str:
        ranks = f"P={self.sp}" if self.dp == 1 else f"P={self.ranks} (SP={self.sp} x DP={self.dp})"
        ckpt = ", selective ckpt" if self.checkpointing else ""
        return f"{self.impl} {ranks if self.impl != 'one_device' else 'P=1'}{ckpt}"


@dataclass
class Point:
    scenario: Scenario
    seq_len: int
    total: int
    parts: dict
    phase: str  # "forward", "backward" or "optimizer step"
    where: str  # the op (and module) at the peak


@dataclass
class Simulator:
    model_fn: object
    inputs_fn: object
    training: Training = field(default_factory=Training)
    batch: int = 1
    block_elements: int = 0
    full_trace: bool = False
    name: str = ""

    def __post_init__(self):
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        model = build_model(self.model_fn)
        self.sizes = state_size(model, dtype_of(self.training.dtype))
        self.path = stack.stack_path(model)
        self.layers = len(stack.layer_stack(model)) if self.path else None
        self.not_periodic = stack.homogeneous(model)
        self._programs: dict = {}

    @classmethod
    def from_file(cls, path: str, **kwargs) -> "Simulator":
        from autosp_verify.model_file import load_model_file
        loaded = load_model_file(path)
        return cls(loaded.model_fn, loaded.inputs_fn, name=kwargs.pop("name", path), **kwargs)

    def _extrapolates(self) -> bool:
        return (not self.full_trace and self.not_periodic is None and self.layers is not None
                and self.layers > stack.traced_layers())

    def program(self, graph: str, sp: int, checkpointing: str | None) -> Program:
        """The memory program of one training step (traced once per key)."""
        key = (graph, sp, checkpointing)
        if key not in self._programs:
            start, program, note = time.perf_counter(), None, "every layer traced"
            if self._extrapolates():
                cut = stack.traced_layers()
                try:
                    program = stack.extend(self._trace(graph, sp, checkpointing, cut), self.path, cut, self.layers)
                    note = f"{cut} layers traced, extended to {self.layers}"
                except stack.NotPeriodic as exc:
                    note = f"every layer traced ({exc})"
            if program is None:
                program = self._trace(graph, sp, checkpointing, None)
            program.meta.update(trace_seconds=time.perf_counter() - start, layers_note=note)
            self._programs[key] = program
        return self._programs[key]

    def traced(self) -> list:
        """(graph, SP degree, checkpointing, seconds, how) for every program traced so far."""
        return [(*key, p.meta["trace_seconds"], p.meta["layers_note"]) for key, p in self._programs.items()]

    def _trace(self, graph: str, sp: int, checkpointing, layers) -> Program:
        return build_program(trace_step(self.model_fn, self.inputs_fn, impl=graph, world_size=sp, batch=self.batch,
                                        dtype=dtype_of(self.training.dtype), checkpointing=checkpointing,
                                        block_elements=self.block_elements, layers=layers))

    def point(self, scenario: Scenario, seq_len: int) -> Point:
        """Per-rank peak bytes of one training step at ``seq_len`` tokens, and what holds them."""
        program = self.program(scenario.graph, scenario.sp, scenario.checkpointing)
        return combine(scenario, seq_len, evaluate(program, seq_len),
                       state_of(self.sizes, self.training, scenario.ranks))

    def shortest(self, scenario: Scenario) -> int:
        """The shortest length the traced graphs cover (their guards, e.g. a chunk of >= 2)."""
        program = self.program(scenario.graph, scenario.sp, scenario.checkpointing)
        for length in range(2, 8 * scenario.sp + 8):
            try:
                check_guards(program, length)
                return length
            except ValueError:
                continue
        raise ValueError(f"{scenario.label}: no short length satisfies the trace's guards")

    def longest(self, scenario: Scenario, budget: int) -> int:
        """The longest sequence whose per-rank peak fits ``budget`` bytes (0: none does)."""
        if budget <= 0:
            raise ValueError(f"budget must be positive, got {budget}")
        fits = lambda n: self.point(scenario, n).total <= budget  # noqa: E731
        lo = self.shortest(scenario)
        if not fits(lo):
            return 0
        hi = lo * 2
        while hi < MAX_LEN and fits(hi):
            lo, hi = hi, hi * 2
        if hi >= MAX_LEN and fits(MAX_LEN):
            return MAX_LEN
        while hi - lo > 1:  # fits(lo), not fits(hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo


def combine(scenario: Scenario, seq_len: int, peak: Peak, state) -> Point:
    """The rank's peak: the graphs' (with the state beside them) or the optimizer step's."""
    base = {"parameters": state.parameters, "optimizer": state.optimizer}
    graphs = peak.total + state.parameters + state.optimizer
    step = sum(peak.end_live.values()) + state.parameters + state.optimizer + state.step_extra
    if graphs >= step:
        parts = {**base, **peak.by_category}
        where = f"{peak.step} ({peak.module})" if peak.module else peak.step
        return Point(scenario, seq_len, graphs, _ordered(parts), peak.phase, where)
    parts = {**base, **peak.end_live}
    parts["temporaries"] += state.step_extra
    return Point(scenario, seq_len, step, _ordered(parts), "optimizer step", "gradient shard in float32")


def _ordered(parts: dict) -> dict:
    return {name: int(parts.get(name, 0)) for name in PARTS}
