"""Impls for the verdict tests: ones that end or stall the process, run no sequence parallelism, or
break only a parameter gradient."""
import os
import time

import torch.distributed as dist


def exits_on_rank1(model, group):
    """``os._exit(0)`` on rank 1: the process ends with status 0 and no verdict."""
    def step(**batch):
        if dist.get_rank(group) == 1:
            os._exit(0)
        return model(**batch)
    return step


def sleeps(model, group):
    """Never returns (a hung rank, in Python: a stopped thread leaves at its next bytecode)."""
    def step(**batch):
        while True:
            time.sleep(0.05)
    return step



class _Spins:
    """An impl whose warm-up (on the main thread, before the ranks) never returns."""

    def __call__(self, model, group):
        return lambda **batch: model(**batch)

    def warm_up(self, model, world_size, batch):
        while True:
            time.sleep(0.01)


spinning_warm_up = _Spins()


def whole_sequence_everywhere(model, group):
    """No sequence parallelism at all: every rank runs the whole sequence and its loss counts once
    (exact, which the verifier must not mistake for SP)."""
    from autosp.collectives import count_once

    def step(**batch):
        out = model(**batch)
        logits = out["logits"]
        chunk = -(-logits.shape[1] // dist.get_world_size(group))
        mine = logits[:, dist.get_rank(group) * chunk:(dist.get_rank(group) + 1) * chunk]
        return {"loss": count_once(out["loss"], group), "logits": count_once(mine, group)}
    return step


def doubled_head_grad(model, group):
    """The ulysses impl, plus a parameter hook doubling one weight's gradient (a bug only in a
    parameter gradient: nothing the module hooks record differs)."""
    from tests.verify.ulysses_impls import ulysses
    step = ulysses(model, group)
    model.head.weight.register_hook(lambda grad: grad * 2)
    return step
