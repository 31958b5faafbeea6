"""Rank functions for tests/compiler/test_runtime.py, run in gloo processes (module level: picklable).

Each runs what a CUDA training loop does on one rank: the forward on the rank's thread, the
backward on a plain new thread (CUDA's autograd engine runs it on a device thread of its own),
and returns the rank's gradients."""
import copy
import threading

import torch
import torch.distributed as dist

import autosp


def _on_new_thread(fn):
    out = {}

    def body():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (handed back to the rank's thread)
            out["error"] = exc
    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def _loss(out):
    return out["loss"] if isinstance(out, dict) else out.loss


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return [g.detach() for g in torch.autograd.grad(loss, params)]


def backward_elsewhere(ctx, payload):
    """One model over the world: forward here, backward on a new thread."""
    model = copy.deepcopy(payload["model"])
    loss = _loss(autosp.compile(model, backend=payload["backend"])(**payload["batch"]))
    return _on_new_thread(lambda: _grads(model, loss))


def two_models_two_groups(ctx, payload):
    """Model A over the world, model B over pairs of ranks; forward A, forward B, backward B,
    backward A, each backward on a new thread."""
    pairs = [dist.new_group([r, r + 1]) for r in range(0, ctx.world_size, 2)]
    pair = pairs[ctx.rank // 2]
    a, b = copy.deepcopy(payload["model"]), copy.deepcopy(payload["model"])
    # backend "eager": the rewritten graph's custom ops find their group at run time as under
    # AOTAutograd (test_backward_on_another_thread_... runs that), at a quarter of the compile
    loss_a = _loss(autosp.compile(a, backend="eager")(**payload["batch"]))
    loss_b = _loss(autosp.compile(b, group=pair, backend="eager")(**payload["batch"]))
    grads_b = _on_new_thread(lambda: _grads(b, loss_b))
    grads_a = _on_new_thread(lambda: _grads(a, loss_a))
    return {"a": grads_a, "b": grads_b}


def collective_on_wrong_device(ctx, payload):
    """A tensor the group's backend cannot take (the only device a CPU-only torch has besides the
    CPU is meta): named, not sent."""
    try:
        autosp.gather_sequence(torch.ones(2, 3, device="meta"), 1, ctx.group)
    except autosp.AutoSPError as exc:
        return str(exc)
    return None
