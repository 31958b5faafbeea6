"""DeepSpeed's own AutoSP (the PyPI release) as an impl: the verifier's first real target.

Runs it the way DeepSpeed does (``engine.compile`` with ``{"compile": {"deepcompile": true,
"passes": ["autosp"]}, "sequence_parallel_size": P}``), minus the engine: the inputs go through
``prepare_autosp_inputs``, the model is compiled with ``fullgraph=True, dynamic=True`` (as
DeepSpeed's own AutoSP test does) and the backend from ``init_autosp`` (``apply_autosp`` on the
Dynamo graph, then ``torch._inductor.compile``); its ``autosp::all_to_all`` op and its group
registry do the communication. Nothing of DeepSpeed is patched. What differs, and why:

* ``deepspeed.comm`` gets a ``TorchBackend`` over the torch.distributed world the simulator
  already set up, built without the shared-memory all-reduce op that
  ``deepspeed.init_distributed`` JIT-compiles with g++ (~40 s; AutoSP never uses it).
* DeepSpeed bakes the rank into the graph at compile time, so every rank compiles its own graph:
  the compiled function gets a fresh code object per prepare (Dynamo caches per code object).
* In-process simulators (threaded, fake) share one process-global group registry between ranks
  and runs: it is cleared per run and its SP group registered as ``None``, which DeepSpeed's
  ``get_group`` resolves to the calling rank's own default group (the whole world, since P is
  the world size here). Under gloo/nccl the registry is left to DeepSpeed.
* DeepSpeed's deliberate refusals (its messages start with "AutoSP requires/expects/cannot/
  currently supports") are reported as "unsupported"; every other exception as an error.

``deepspeed-eager`` runs the same passes but returns the rewritten graph to Dynamo instead of
Inductor-compiling it: identical semantics, seconds instead of minutes on a 2-core CPU.
"""
from __future__ import annotations

import itertools
import os
import threading

import torch
import torch.distributed as dist

_LOCK = threading.Lock()
_COUNTER = itertools.count()
_REFUSAL_PREFIXES = ("AutoSP requires", "AutoSP expects", "AutoSP cannot", "AutoSP currently supports")


class DeepSpeedRefused(Exception):
    autosp_unsupported = True


def _import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # silences the accelerator probe warning
    import deepspeed.comm.comm as ds_comm
    return ds_comm


def _install_comm_backend():
    """Point deepspeed.comm at the already-initialised torch.distributed world (no shm op build)."""
    from autosp.deepspeed import _install_comm_backend as install
    install()


def _reset_registry_in_process(group):
    from deepspeed.compile.custom_ops import sp_dp_registry as registry
    if dist.get_rank(group) == 0:
        registry.GROUP_REGISTRY.clear()
        registry.GROUP_REGISTRY[0] = None  # get_group(0) -> None -> each rank's own default group
    dist.barrier(group)  # nobody compiles before rank 0 has reset


class _Config:
    """The two things ``init_autosp`` reads from a DeepSpeedConfig."""

    def __init__(self, sp_size):
        self._param_dict = {"sequence_parallel_size": sp_size}


def _forward(model, batch):
    return model(**batch)


def _fresh_forward():
    code = _forward.__code__.replace(co_name=f"_forward_{next(_COUNTER)}")
    return type(_forward)(code, _forward.__globals__, code.co_name)


def _refusal(exc):
    """DeepSpeed's deliberate refusal somewhere in the chain (Dynamo wraps backend errors), or None."""
    seen = exc
    while seen is not None:
        for line in str(seen).splitlines():
            for prefix in _REFUSAL_PREFIXES:
                if prefix in line:
                    return DeepSpeedRefused("deepspeed refused: " + line[line.index(prefix):].strip())
        seen = seen.__cause__ or getattr(seen, "inner_exception", None)
    return None


def _inductor_backend(sp_size):
    """``init_autosp``'s backend. init_autosp patches the min-cut partitioner by re-reading its
    source, which works once per process only (later calls fail: "could not get source code"),
    so every later rank or run in this process builds the same backend without re-patching."""
    import torch._functorch.partitioners as partitioners
    from deepspeed.compile.init_sp import init_autosp
    from deepspeed.compile.passes.sp_compile import apply_autosp
    with _LOCK:
        if partitioners.solve_min_cut.__code__.co_filename != "<string>":  # not patched yet
            return init_autosp(_Config(sp_size))

    def backend_fn(gm, real_inputs):  # init_autosp's backend_fn, verbatim
        apply_autosp(gm, real_inputs, debug=False, sp_size=sp_size, dp_size=1)
        return torch._inductor.compile(gm, real_inputs)
    return backend_fn


def _prepare(model, group, inductor: bool):
    _install_comm_backend()
    from deepspeed.compile.passes.sp_compile import apply_autosp, prepare_autosp_inputs
    sp_size = group.size()
    if sp_size != dist.get_world_size():
        raise DeepSpeedRefused(f"this adapter runs DeepSpeed AutoSP with sp = world size; got a group of "
                               f"{sp_size} in a world of {dist.get_world_size()}")
    if dist.get_backend(group) in ("threaded", "fake"):
        _reset_registry_in_process(group)
    if inductor:
        backend = _inductor_backend(sp_size)
    else:
        def backend(gm, example_inputs):
            apply_autosp(gm, example_inputs, debug=False, sp_size=sp_size, dp_size=1)
            return gm
    compiled = torch.compile(_fresh_forward(), backend=backend, fullgraph=True, dynamic=True)

    def step(**batch):
        ids, labels = batch.get("input_ids"), batch.get("labels")
        if ids is None or labels is None:
            raise DeepSpeedRefused("deepspeed refused: AutoSP needs input_ids and labels "
                                   f"(the batch has {sorted(batch)})")
        prepare_autosp_inputs(ids, labels, batch.get("position_ids"), batch.get("attention_mask"))
        try:
            return compiled(model, batch)
        except Exception as exc:
            refused = _refusal(exc)
            if refused is not None:
                raise refused from exc
            raise

    return step


def deepspeed_impl(model, group):
    return _prepare(model, group, inductor=True)


def deepspeed_eager_impl(model, group):
    return _prepare(model, group, inductor=False)
