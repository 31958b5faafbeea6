"""Public entry points: ``compile``, ``prepare_inputs`` (and DeepSpeed's ``prepare_autosp_inputs``)."""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings

import torch
import torch.distributed as dist
from torch._dynamo.exc import BackendCompilerFailed, Unsupported
from torch.fx.experimental import _config as fx_config
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from autosp import collectives
from autosp.backend import backend_for
from autosp.config import SPConfig
from autosp.errors import AutoSPError, OutputNeedsOtherRanks

def _mark(t: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """A new alias of ``t`` with its sequence dim marked dynamic (the caller's tensor is untouched)."""
    if t.dim() <= seq_dim:
        raise AutoSPError(f"a sequence input of shape {tuple(t.shape)} has no dim {seq_dim}")
    if t.shape[seq_dim] < 2:
        raise AutoSPError(f"sequence length {t.shape[seq_dim]} is too short (need at least 2)")
    alias = t.view(t.shape)
    # maybe_: a length whose chunk has size 1 makes broadcasting guard on it; that specialises
    # (one more compile) instead of failing. The sequence stays a symbol in the Dynamo graph.
    torch._dynamo.maybe_mark_dynamic(alias, seq_dim)
    for dim in range(t.dim()):  # never symbolic: a batch equal to the length would share its symbol
        if dim != seq_dim:
            torch._dynamo.mark_static(alias, dim)
    return alias


def _mark_square(t: torch.Tensor) -> torch.Tensor:
    """A new alias of a [.., S, S] mask the caller built, its last two dims marked dynamic."""
    alias = t.view(t.shape)
    for dim in range(t.dim()):
        if dim >= t.dim() - 2:
            torch._dynamo.maybe_mark_dynamic(alias, dim)
        else:
            torch._dynamo.mark_static(alias, dim)
    return alias


def prepare_inputs(*tensors: torch.Tensor | None, seq_dim: int = 1):
    """Mark the sequence dim of each tensor (None passes through); returns new aliases."""
    return tuple(None if t is None else _mark(t, seq_dim) for t in tensors)


def prepare_autosp_inputs(input_id, label_id, position_id=None, attention_mask=None, seq_dim=1):
    """DeepSpeed's signature; the returned tensors are marked aliases (the inputs are untouched)."""
    if input_id is None or label_id is None:
        raise AutoSPError("input_id and label_id are required")
    return prepare_inputs(input_id, label_id, position_id, attention_mask, seq_dim=seq_dim)


def _takes(model, name: str) -> bool:
    """Whether the model's forward has a parameter ``name``."""
    try:
        return name in inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False


def _loss_of(out):
    if isinstance(out, dict):
        return out.get("loss")
    if isinstance(out, (tuple, list)):
        return out[0] if out else None
    return getattr(out, "loss", out if isinstance(out, torch.Tensor) else None)


def _marked(t, seq_dim: int) -> bool:
    return seq_dim in getattr(t, "_dynamo_weak_dynamic_indices", ())


def _is_square_mask(name: str, t) -> bool:
    """A 3-D or 4-D attention mask ([B, S, S], [B, 1, S, S]) the caller built whole."""
    return name == "attention_mask" and isinstance(t, torch.Tensor) and t.dim() >= 3 \
        and t.shape[-1] == t.shape[-2]


def check_sdpa(named_modules, who: str, takes=("sdpa",)) -> None:
    """HF models name their attention kernel in their configs; ``who`` takes the kernels in
    ``takes`` only (the passes: SDPA and HF's eager kernel, attention written out), and a flex or
    flash kernel otherwise ends in an error that never names it. ``named_modules``: (name,
    module) pairs to look at."""
    for name, module in named_modules:
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if impl is not None and impl not in takes:
            where = f"{name} ({type(module).__name__})" if name else type(module).__name__
            names = " or ".join(repr(t) for t in takes)
            raise AutoSPError(f"{where} uses attn_implementation={impl!r}: {who} needs {names} (torch's "
                              "scaled_dot_product_attention); load the model with attn_implementation='sdpa' "
                              "(on the config, and on its text/vision sub-configs)")


def hf_warnings_ignored():
    """transformers' ``logger.warning_once`` (a graph break under Dynamo) is skipped while tracing:
    HF warns with it inside forward, e.g. that activation checkpointing turns ``use_cache`` off."""
    warning_once = getattr(logging.Logger, "warning_once", None)
    if warning_once is None:
        return contextlib.nullcontext()
    ignored = torch._dynamo.config.ignore_logging_functions
    return torch._dynamo.config.patch(ignore_logging_functions=ignored | {warning_once})


def install_hf_output_hooks(module) -> None:
    """transformers installs its output-capturing hooks (router logits, hidden states) at a
    model's first forward that asks for them, under a ``threading.Lock`` Dynamo cannot trace (a
    graph break: Mixtral with ``output_router_logits=True``). Installed here before tracing, as that
    first forward would install them (the same hooks, once)."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # no transformers, or one without output capturing
        return
    for sub in module.modules() if isinstance(module, torch.nn.Module) else ():
        if isinstance(sub, PreTrainedModel):
            maybe_install_capturing_hooks(sub)  # the first marks the models inside it: the rest return


class CompiledSP:
    """The callable ``autosp.compile`` returns. Every rank calls it with the full batch."""

    autosp_counted = True  # every collective it runs goes through autosp's counters (verifier accounting)

    def __init__(self, model, config: SPConfig, compile_kwargs):
        module = getattr(model, "__self__", model)  # a bound forward (the DeepSpeed path): its module
        check_sdpa(module.named_modules() if isinstance(module, torch.nn.Module) else (), "AutoSP's passes",
                   takes=("sdpa", "eager"))
        self.model, self.config = model, config
        compile_kwargs.setdefault("fullgraph", True)
        self._compile_kwargs = compile_kwargs
        self._compiled = {}  # group key -> torch.compile'd model
        self._cache_off = False  # use_cache=False passed (see OutputNeedsOtherRanks)

    def _for_group(self, key: str, size: int):
        if key not in self._compiled:
            install_hf_output_hooks(getattr(self.model, "__self__", self.model))
            backend = backend_for(self.config, size, key)
            self._compiled[key] = torch.compile(self.model, backend=backend, **self._compile_kwargs)
        return self._compiled[key]

    def _mark_inputs(self, args, kwargs):
        seq_dim, names = self.config.seq_dim, self.config.sequence_inputs
        args = list(args)
        first = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
        if first is not None:
            args[first] = _mark(args[first], seq_dim)
        kwargs = {k: self._mark_input(k, v) if k in names and isinstance(v, torch.Tensor) else v
                  for k, v in kwargs.items()}
        if first is None and not names & kwargs.keys():  # called by keyword, with names of its own
            key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.dim() > seq_dim), None)
            if key is not None:
                kwargs[key] = _mark(kwargs[key], seq_dim)
        lengths = {t.shape[seq_dim] for t in [*args, *kwargs.values()] if _marked(t, seq_dim)}
        lengths |= {t.shape[-1] for k, t in kwargs.items() if k in names and _is_square_mask(k, t)}
        if len(lengths) > 1:
            raise AutoSPError(f"sequence inputs disagree on the length along dim {seq_dim}: {sorted(lengths)}")
        if lengths:  # other inputs of that length carry the sequence too (nanoGPT's targets, by any name)
            length = next(iter(lengths))
            same = lambda t: isinstance(t, torch.Tensor) and t.dim() > seq_dim and t.shape[seq_dim] == length \
                and not _marked(t, seq_dim)  # noqa: E731
            args = [_mark(a, seq_dim) if same(a) else a for a in args]
            kwargs = {k: _mark(v, seq_dim) if k not in names and same(v) else v for k, v in kwargs.items()}
        return args, kwargs, lengths.pop() if lengths else None

    def _mark_input(self, name, t):
        return _mark_square(t) if _is_square_mask(name, t) else _mark(t, self.config.seq_dim)

    def __call__(self, *args, **kwargs):
        return self._call(self.config.resolve_group(), args, kwargs)

    def warm_up(self, world_size: int, *args, **kwargs):
        """Compile forward and backward for ``world_size`` ranks on a fake process group on this
        thread (no other rank needed; the numbers are meaningless), so that later calls, from any
        rank or thread, find the graph compiled. Needs no process group on this thread."""
        from torch.testing._internal.distributed.fake_pg import FakeStore
        if dist.is_initialized():
            raise AutoSPError("warm_up needs a thread with no process group initialized")
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
        fake_world = dist.group.WORLD
        try:
            out = self._call(dist.group.WORLD, args, kwargs)
            loss = _loss_of(out)
            params = [p for p in self.model.parameters() if p.requires_grad]
            if loss is not None and loss.requires_grad and params:
                torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            if dist.is_initialized() and dist.group.WORLD is fake_world:  # never another thread's group
                dist.destroy_process_group()

    def _call(self, group, args, kwargs):
        key = collectives.group_key(group)
        args, kwargs, length = self._mark_inputs(args, kwargs)
        size = dist.get_world_size(group)
        if length is not None and length % size and self.config.padding == "error":
            raise AutoSPError(f"sequence length {length} is not divisible by the group size {size} "
                              "(padding='error')")
        try:
            return self._run(key, size, args, kwargs)
        except OutputNeedsOtherRanks as e:
            if "use_cache" in kwargs or not _takes(self.model, "use_cache"):
                raise
            # A KV cache is for generation, which a training step under SP is not; HF's
            # sliding-window cache would need the sequence's last positions on every rank.
            warnings.warn(f"autosp.compile: the model's KV cache cannot be kept ({e}); building none from "
                          "now on (use_cache=False, as HF does under activation checkpointing)", stacklevel=3)
            self._cache_off = True
            return self._run(key, size, args, kwargs)

    def _run(self, key, size, args, kwargs):
        if self._cache_off:
            kwargs = {**kwargs, "use_cache": False}
        try:
            # No duck sizing: another dynamic dim equal to the length must not share its symbol.
            with fx_config.patch(use_duck_shape=False), hf_warnings_ignored():
                return self._for_group(key, size)(*args, **kwargs)
        except BackendCompilerFailed as e:
            if isinstance(e.inner_exception, AutoSPError):
                raise e.inner_exception.with_traceback(None) from None
            raise
        except Unsupported as e:
            raise AutoSPError(f"the model does not compile to one graph (graph break): {e}") from None
        except GuardOnDataDependentSymNode as e:
            caused = next((line.strip() for line in str(e).splitlines() if line.startswith("Caused by:")), "")
            raise AutoSPError(f"the model does not compile to one graph: a shape depends on tensor data "
                              f"({str(e).splitlines()[0]}) {caused}. Vision-language models that split or "
                              "splice by image sizes: wrap them with autosp.multimodal.auto_wrap_model_for_sp "
                              "(module-level, eager) instead") from None


def compile(model, *, group=None, backend="inductor", config: SPConfig | None = None, **torch_compile_kwargs):
    """Compile ``model`` for Ulysses sequence parallelism over ``group`` (default: the world).

    Returns a callable taking the same arguments as the model. Every rank passes the FULL batch;
    the compiled graph takes this rank's part of the sequence. The loss is the one of the whole
    sequence on every rank; outputs that carry the sequence (logits) come back as this rank's
    chunk (``autosp.gather_sequence`` reassembles them). Gradients must be summed over the group.
    """
    if config is None:
        config = SPConfig(group=group, backend=backend)
    return CompiledSP(model, config, dict(torch_compile_kwargs))
