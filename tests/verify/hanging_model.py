"""tiny_model whose forward never returns on the main thread (where the one-device reference runs)."""
import threading
import time

import torch

from tests.verify.tiny_model import inputs_fn  # noqa: F401
from tests.verify.tiny_model import model_fn as _tiny


class Hangs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = _tiny()

    def forward(self, **batch):
        while threading.current_thread() is threading.main_thread():
            time.sleep(0.01)
        return self.inner(**batch)


def model_fn():
    return Hangs()
