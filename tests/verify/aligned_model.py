"""tiny_model with inputs that hide DeepSpeed's label-shift bug at P=2: no target crosses the
middle of the sequence and both halves hold the same number of targets. What remains visible is
the loss aggregation alone (a diagnostic for test_verify_deepspeed.py)."""
import importlib.util
import os
import sys

import torch

_spec = importlib.util.spec_from_file_location("_verify_tiny_for_aligned", os.path.join(os.path.dirname(__file__),
                                                                                       "tiny_model.py"))
_tiny = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _tiny  # Dynamo resolves the model's globals through sys.modules
_spec.loader.exec_module(_tiny)
model_fn = _tiny.model_fn


def inputs_fn(batch, seq_len, generator):
    ids = torch.randint(0, _tiny.VOCAB, (batch, seq_len), generator=generator)
    labels = ids.clone()
    labels[:, seq_len // 2] = -100  # the target of the last token of the first half
    positions = torch.arange(seq_len).unsqueeze(0).expand(batch, seq_len).contiguous()
    return {"input_ids": ids, "labels": labels, "position_ids": positions}
