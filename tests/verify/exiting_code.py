"""Impls that end or stall the process, for test_supervise.py."""
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
    """Never returns (a hung rank), so the run is still going when the test stops it."""
    def step(**batch):
        time.sleep(3600)
    return step

