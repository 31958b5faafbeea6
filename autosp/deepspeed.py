"""AutoSP from a DeepSpeed config: ``autosp.deepspeed.initialize(model=..., optimizer=..., config=...)``.

The config uses the keys DeepSpeed users already know::

    {"train_micro_batch_size_per_gpu": 2,
     "compile": {"deepcompile": true, "passes": ["autosp"]},
     "sequence_parallel_size": 2,
     "zero_optimization": {"stage": 1}}

What this does, on every rank (all ranks call it, torch.distributed already initialised):

* validates the config loudly (``AutoSPError``): the passes (only ``"autosp"``), ``deepcompile``
  true, P dividing the world size, ``data_parallel_size`` (if given) = world / P, ZeRO stage 0-2;
* strips the AutoSP compile keys before DeepSpeed sees them, so DeepSpeed's OWN AutoSP never runs
  (its ``init_autosp`` patches torch's min-cut partitioner process-wide, and it is not exact);
* takes the groups from DeepSpeed's own helper, ``deepspeed.runtime.sequence_parallel.
  parallel_state_sp`` (the ``mpu`` DeepSpeed's Ulysses/ALST uses): SP groups of P consecutive ranks,
  the sequence-data-parallel group over all of them; it is handed to the engine as ``mpu``, so the
  engine's gradient all-reduce and ZeRO partitioning run over DP x SP. The DP groups (ranks with
  the same SP rank) are built with ``dist.new_group``: that helper has none;
* points ``deepspeed.comm`` at the existing torch.distributed world without the shared-memory op
  ``deepspeed.init_distributed`` JIT-builds with g++ (~40 s on CPU; never used here);
* makes the engine's forward run through ``autosp.compile`` on the SP group.

Gradient math (exact, no correction factor needed). AutoSP's convention: on every rank of an SP
group the loss is the replica's whole-sequence loss, and each rank's gradient is a partial whose
SUM over the SP group is the replica's gradient. DeepSpeed with an SP ``mpu`` all-reduces (sums)
over the sequence-data-parallel group (DP*SP ranks) and divides by ``world / sequence_parallel_size``
= DP (engine ``_reduce_non_expert_gradients``; ZeRO 1/2 ``average_tensor`` and
``gradient_reduction_w_predivide`` divide by the same). So every rank ends with
``(1/DP) * sum_dp sum_sp partial = mean over DP replicas of each replica's gradient``: the gradient
of the mean of the replicas' losses, what one device computes on the same global batch with
``loss = mean_d loss_d``. Dividing by DP*SP instead (no P factor) would scale it by 1/P; the test's
negative control does that and fails.
"""
from __future__ import annotations

import copy
import json
import os
import threading

import torch
import torch.distributed as dist

from autosp.errors import AutoSPError

KNOWN_PASSES = ("autosp",)
SUPPORTED_ZERO_STAGES = (0, 1, 2)
_LOCK = threading.Lock()


def _load(config):
    if config is None:
        raise AutoSPError("config is required (a dict or a path to a DeepSpeed JSON config)")
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    if not isinstance(config, dict):
        raise AutoSPError(f"config must be a dict or a path, got {type(config).__name__}")
    return copy.deepcopy(config)


def parse_config(config, world_size: int):
    """Validate a DeepSpeed config that asks for AutoSP. Returns (config for DeepSpeed, P).

    The returned config has no ``compile`` AutoSP keys and no ``data_parallel_size`` (DeepSpeed
    would build its own mesh from it; the groups come from the ``mpu``)."""
    config = _load(config)
    compile_cfg = config.get("compile")
    if not isinstance(compile_cfg, dict):
        raise AutoSPError('the config has no "compile" section; AutoSP is turned on with '
                          '"compile": {"deepcompile": true, "passes": ["autosp"]}')
    passes = compile_cfg.get("passes")
    if not isinstance(passes, (list, tuple)) or not passes:
        raise AutoSPError(f'"compile.passes" must be a non-empty list, got {passes!r}')
    unknown = [p for p in passes if p not in KNOWN_PASSES]
    if unknown:
        raise AutoSPError(f"unknown or unsupported compile passes {unknown}: autosp.deepspeed runs "
                          f"only {list(KNOWN_PASSES)} (DeepSpeed's z1/z3/autotp passes are not combined with it)")
    if compile_cfg.get("deepcompile") is not True:
        raise AutoSPError('"compile.passes" has "autosp" but "compile.deepcompile" is '
                          f'{compile_cfg.get("deepcompile")!r}: set it to true')
    sp = config.get("sequence_parallel_size")
    if sp is None:
        raise AutoSPError('"sequence_parallel_size" is required with the autosp pass')
    if isinstance(sp, bool) or not isinstance(sp, int) or sp < 1:
        raise AutoSPError(f'"sequence_parallel_size" must be a positive int, got {sp!r}')
    if world_size % sp:
        raise AutoSPError(f'"sequence_parallel_size" {sp} does not divide the world size {world_size}')
    dp = config.pop("data_parallel_size", None)
    if dp is not None and dp * sp != world_size:
        raise AutoSPError(f'"data_parallel_size" {dp} x "sequence_parallel_size" {sp} != world size {world_size}')
    zero = config.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage not in SUPPORTED_ZERO_STAGES:
        raise AutoSPError(f"ZeRO stage {stage} is not supported with autosp (supported: {SUPPORTED_ZERO_STAGES})")
    rest = {k: v for k, v in compile_cfg.items() if k not in ("deepcompile", "passes")}
    if rest:
        config["compile"] = rest  # other compile options stay DeepSpeed's
    else:
        config.pop("compile")
    return config, sp


def _install_comm_backend():
    """``deepspeed.comm`` over the already-initialised torch.distributed world, without the shm op
    that ``TorchBackend.__init__`` JIT-builds (the same construction as autosp_verify's adapter)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed.comm.comm as ds_comm
    from deepspeed.comm.backend import Backend
    from deepspeed.comm.torch import TorchBackend, has_all_reduce_coalesced, has_coalescing_manager
    with _LOCK:
        if isinstance(ds_comm.cdb, TorchBackend) and ds_comm.cdb.is_initialized():
            return
        backend = TorchBackend.__new__(TorchBackend)
        Backend.__init__(backend, name="torch")
        backend.shm_comm_op = None
        backend.has_all_reduce_coalesced = has_all_reduce_coalesced()
        backend.has_coalescing_manager = has_coalescing_manager()
        backend.all_gather_function = TorchBackend.get_all_gather_function()
        backend.reduce_scatter_function = TorchBackend.get_reduce_scatter_function()
        backend.single_gpu_mode = True
        backend.using_mpi = False
        backend.initialized = True
        ds_comm.cdb = backend


class Groups:
    """The DP x SP layout: rank r is SP rank r % P in SP group r // P (= its DP rank)."""

    def __init__(self, mpu, sp_group, dp_group, sp_size, world_size, rank):
        self.mpu, self.sp_group, self.dp_group = mpu, sp_group, dp_group
        self.sp_size, self.dp_size = sp_size, world_size // sp_size
        self.sp_rank, self.dp_rank = rank % sp_size, rank // sp_size


_GROUPS: dict = {}


def _groups(sp: int) -> Groups:
    """SP groups from DeepSpeed's ``parallel_state_sp`` (P > 1; P = 1 needs no mpu), DP groups
    from ``dist.new_group``. Built once per process and P (every rank must call this)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp in _GROUPS:
        return _GROUPS[sp]
    mpu = None
    if sp > 1:
        from deepspeed.runtime.sequence_parallel import parallel_state_sp as mpu
        if mpu._SEQUENCE_PARALLEL_GROUP is None:
            mpu.initialize_sequence_parallel(sp)
        elif mpu.get_sequence_parallel_world_size() != sp:
            raise AutoSPError(f"DeepSpeed's sequence parallel groups already exist with size "
                              f"{mpu.get_sequence_parallel_world_size()}, not {sp}")
        sp_group = mpu.get_sequence_parallel_group()
    else:
        sp_group = None
        for r in range(world):
            g = dist.new_group([r])
            if r == rank:
                sp_group = g
    dp_group = None
    for s in range(sp):
        g = dist.new_group(list(range(s, world, sp)))
        if rank % sp == s:
            dp_group = g
    _GROUPS[sp] = Groups(mpu, sp_group, dp_group, sp, world, rank)
    return _GROUPS[sp]


def _route_forward(model, step, original):
    """Calls of ``model`` (the engine calls ``self.module(...)``: its hooks still run eagerly)
    go through ``step``, which compiles the model's original forward."""
    model.forward = step
    model._autosp_original_forward = original


def _compiled_already(*args, **kwargs):
    """``engine.compile()`` after ``autosp.deepspeed.initialize``: the forward already runs through
    ``autosp.compile`` (DeepSpeed's own compile would wrap it a second time): nothing to do."""
    return None


def initialize(model=None, optimizer=None, config=None, *, backend="inductor", autosp_config=None,
               dist_init_required=False, **deepspeed_kwargs):
    """``deepspeed.initialize`` with AutoSP: returns what it returns, ``(engine, optimizer,
    dataloader, lr_scheduler)``. The engine's forward runs through ``autosp.compile`` on this
    rank's SP group; ``engine.autosp_groups`` holds the layout (``sp_group``, ``dp_group``,
    ``sp_rank``, ``dp_rank``, ...). Every rank of an SP group must feed the same (full-length)
    batch; the DP replicas (``dp_rank``) feed their own. ``backend`` is the torch.compile backend
    after the passes (``"aot_eager"`` compiles fastest on CPU)."""
    import autosp
    from autosp.config import SPConfig
    if model is None:
        raise AutoSPError("model is required")
    if deepspeed_kwargs.get("training_data") is not None:
        # DeepSpeed's loader would shard over DP*SP ranks (its SP mpu has no data-parallel getters);
        # every rank of an SP group must see the same batch.
        raise AutoSPError("training_data is not supported: feed each DP replica's batches yourself "
                          "(engine.autosp_groups.dp_rank / dp_size pick the replica's share)")
    if not dist.is_initialized():
        raise AutoSPError("torch.distributed is not initialized: call dist.init_process_group first")
    if dist_init_required:
        raise AutoSPError("dist_init_required=True is not supported: initialise torch.distributed first")
    if "mpu" in deepspeed_kwargs or "mesh_param" in deepspeed_kwargs:
        raise AutoSPError("mpu/mesh_param are built by autosp.deepspeed from sequence_parallel_size")
    ds_config, sp = parse_config(config, dist.get_world_size())
    _install_comm_backend()
    import deepspeed
    groups = _groups(sp)
    if autosp_config is None:
        autosp_config = SPConfig(group=groups.sp_group, backend=backend)
    elif autosp_config.group is not None or autosp_config.mesh is not None:
        raise AutoSPError("autosp_config must not name a group: it is the SP group from the DeepSpeed config")
    else:
        autosp_config = copy.copy(autosp_config)
        autosp_config.group = groups.sp_group
    # The compiled callable wraps the model's ORIGINAL forward (a bound method: Dynamo lifts the
    # parameters as it does for the module), so routing model.forward to it cannot recurse.
    forward = getattr(model, "_autosp_original_forward", None) or model.forward  # initialised before
    step = autosp.compile(forward, config=autosp_config)
    engine, opt, loader, sched = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                      mpu=groups.mpu, dist_init_required=False,
                                                      **deepspeed_kwargs)
    _route_forward(model, step, forward)
    engine.compile = _compiled_already
    engine.autosp_groups = groups
    engine.autosp_step = step
    return engine, opt, loader, sched
