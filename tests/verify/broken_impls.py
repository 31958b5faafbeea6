"""Impls that misbehave on purpose, for the verifier's robustness tests (loadable by file path)."""
import threading
import time
import types

import torch
import torch.distributed as dist


class Refused(Exception):
    autosp_unsupported = True


def _loss(model, batch):
    return model(**batch)


def raise_in_collective(model, group):
    """Rank 1 raises while every other rank waits inside an all-reduce."""
    def step(**batch):
        if dist.get_rank(group) == 1:
            time.sleep(0.2)  # let the others enter the collective first
            raise RuntimeError("boom on rank 1")
        dist.all_reduce(torch.ones(1), group=group)
        return _loss(model, batch)
    return step


def never_joins(model, group):
    """Rank 1 never reaches the all-reduce the others wait in."""
    def step(**batch):
        if dist.get_rank(group) == 1:
            while True:
                time.sleep(0.05)
        dist.all_reduce(torch.ones(1), group=group)
        return _loss(model, batch)
    return step


def mismatched_collectives(model, group):
    """Rank 0 all-reduces while the others all-gather."""
    def step(**batch):
        t = torch.ones(4)
        if dist.get_rank(group) == 0:
            dist.all_reduce(t, group=group)
        else:
            dist.all_gather([torch.empty(4) for _ in range(group.size())], t, group=group)
        return _loss(model, batch)
    return step


def crash_at_prepare(model, group):
    if dist.get_rank(group) == 1:
        raise ValueError("cannot prepare on rank 1")
    return lambda **batch: _loss(model, batch)


def refuses(model, group):
    raise Refused("this impl does not support the model")


def refuses_autosp_error(model, group):
    from autosp import AutoSPError
    raise AutoSPError("head count 4 not divisible by the group")


def replicated(model, group):
    """Every rank runs the whole model: exact, with every output replicated (loss already global)."""
    def step(**batch):
        out = _loss(model, batch)
        # Grads are summed over ranks: each rank contributes 1/P of the full gradient.
        return {"loss": out["loss"] / group.size() + (out["loss"] - out["loss"] / group.size()).detach(),
                "logits": out["logits"]}
    return step


def bad_shape(model, group):
    """Outputs whose shape is neither the reference's nor a shard along one dim."""
    def step(**batch):
        out = _loss(model, batch)
        return {"loss": out["loss"], "logits": out["logits"][:, : -1, : -1]}
    return step


def rank_mutates_weights(model, group):
    """Writes into its replica: the user's model must not notice."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    return lambda **batch: _loss(model, batch)


STRAGGLER_GO = threading.Event()


def straggler(model, group):
    """Rank 1 fails at once; rank 0 outlives the run and, once released, all-reduces in a loop."""
    def step(**batch):
        if dist.get_rank(group) == 1:
            raise RuntimeError("boom on rank 1")
        while not STRAGGLER_GO.is_set():  # Python-level wait: interruptible by the simulator
            time.sleep(0.01)
        for _ in range(1000):
            dist.all_reduce(torch.ones(1), group=group)
        return _loss(model, batch)
    return step


def releasing_straggler(impl):
    """``impl``, but its step first releases the straggler and gives it time to reach a collective."""
    def wrapped(model, group):
        step = impl(model, group)

        def released(**batch):
            STRAGGLER_GO.set()
            time.sleep(0.2)
            return step(**batch)
        return released
    return wrapped


COMPILE_STARTED, COMPILE_OUTCOME = threading.Event(), []


def _slow_backend(gm, example_inputs):
    COMPILE_STARTED.set()
    for _ in range(30):  # 3 s in small sleeps: an asynchronous exception would land between them
        time.sleep(0.1)
    return gm


def _plus_one(x):
    return x + 1


def compiling_straggler(model, group):
    """Rank 1 fails once rank 0 is inside torch.compile; rank 0 outlives the run, compiling, and
    records whether its compile finished or was interrupted."""
    def step(**batch):
        if dist.get_rank(group) == 1:
            COMPILE_STARTED.wait(30)
            raise RuntimeError("boom on rank 1")
        try:
            fresh = types.FunctionType(_plus_one.__code__.replace(co_name=f"plus_one_{time.monotonic_ns()}"), globals())
            torch.compile(fresh, backend=_slow_backend)(torch.ones(2))  # a new code object: never cached
            COMPILE_OUTCOME.append("finished")
        except BaseException as exc:
            COMPILE_OUTCOME.append(type(exc).__name__)
            raise
        return _loss(model, batch)
    return step


# --- robustness of the verifier itself (tests/verify/test_robustness.py) ---------------------------

def swapped_order(model, group):
    """Rank 0 all-reduces then all-to-alls; the other ranks run the same two in the other order."""
    def step(**batch):
        x = torch.ones(2 * group.size(), 8, 4, dtype=torch.float64)
        calls = [lambda: dist.all_reduce(torch.ones((), dtype=torch.float64), group=group),
                 lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group)]
        for call in (calls if dist.get_rank(group) == 0 else calls[::-1]):
            call()
        return _loss(model, batch)
    return step


def mismatched_shapes(model, group):
    """Every rank all-reduces, rank 0 a [4] tensor, the others a [3] one."""
    def step(**batch):
        dist.all_reduce(torch.ones(4 if dist.get_rank(group) == 0 else 3), group=group)
        return _loss(model, batch)
    return step


def mismatched_dtypes(model, group):
    """Rank 0 all-reduces float64, the others float32: the threaded backend would promote silently."""
    def step(**batch):
        dist.all_reduce(torch.ones(4, dtype=torch.float64 if dist.get_rank(group) == 0 else torch.float32),
                        group=group)
        return _loss(model, batch)
    return step


def _replicated_step(model, group, tamper):
    """Every rank runs the whole model (exact, see ``replicated``); ``tamper(rank, loss)`` may spoil it."""
    def step(**batch):
        out = _loss(model, batch)
        p = group.size()
        loss = out["loss"] / p + (out["loss"] - out["loss"] / p).detach()
        return {"loss": tamper(dist.get_rank(group), loss), "logits": out["logits"]}
    return step


def nan_loss_on_rank1(model, group):
    """Exact, except that rank 1's loss VALUE is NaN (its gradients stay finite and right)."""
    return _replicated_step(model, group, lambda rank, loss: loss + float("nan") if rank == 1 else loss)


def inf_grad_on_rank1(model, group):
    """Exact, except that one entry of rank 1's gradient of the output head is +Inf."""
    if dist.get_rank(group) == 1:
        def poison(grad):
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
            return grad
        model.head.weight.register_hook(poison)
    return _replicated_step(model, group, lambda rank, loss: loss)
