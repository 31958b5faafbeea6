"""The simulator against real steps: predicted per-rank peak (fake-tensor trace, nothing run)
within 10% of the peak measured on CPU tensors (rank 0 of a fake group, the same graphs,
``PeakMemory``), at a few thousand tokens. Negative controls: a simulator that forgets the saved
activations, or the working memory of the ops (the attention's blocks), falls outside 10%."""
import pytest
import torch

from autosp_verify.scale.evaluate import evaluate
from autosp_verify.scale.program import build_program
from autosp_verify.scale.trace import trace_step
from autosp_verify.scale.validate import measure, predicted_peak
from tests.scale import tiny_lm

TOLERANCE = 0.10
LAYERS = 3

# impl, P, dtype, S, attention block elements, checkpointing, peak in the attention's backward
SLOW = pytest.mark.slow
CASES = [
    pytest.param("one_device", 1, torch.float32, 1024, 0, None, False, id="one-device-fp32", marks=SLOW),
    pytest.param("autosp", 2, torch.bfloat16, 4096, 1 << 18, None, True, id="autosp-P2-bf16"),
    pytest.param("autosp", 4, torch.float32, 4096, 0, None, False, id="autosp-P4-fp32", marks=SLOW),
    pytest.param("autosp", 8, torch.bfloat16, 8192, 1 << 18, None, True, id="autosp-P8-bf16", marks=SLOW),
    pytest.param("autosp", 2, torch.float32, 2048, 0, "selective", False, id="autosp-P2-selective", marks=SLOW),
]


def _model():
    return tiny_lm.model_fn(LAYERS)


@pytest.mark.parametrize("impl, world_size, dtype, seq_len, block, checkpointing, in_attention", CASES)
def test_predicted_peak_within_10_percent_of_measured(impl, world_size, dtype, seq_len, block, checkpointing,
                                                      in_attention):
    common = dict(impl=impl, world_size=world_size, dtype=dtype, checkpointing=checkpointing)
    measured = measure(_model, tiny_lm.inputs_fn, seq_len=seq_len, block_elements=block, **common).peak
    program = build_program(trace_step(_model, tiny_lm.inputs_fn, block_elements=block, **common))
    predicted = predicted_peak(program, seq_len)
    assert abs(predicted / measured - 1) < TOLERANCE, (predicted, measured)

    # negative control: the same simulator without the saved activations
    forgetful = predicted_peak(program, seq_len, exclude=("saved",))
    assert abs(forgetful / measured - 1) > TOLERANCE, (forgetful, measured)
    assert evaluate(program, seq_len).step.startswith("masked_attention_backward") == in_attention
    if in_attention:
        # negative control: without the attention's working memory (its float32 copies and
        # blocks) the simulator is off, and finds its peak elsewhere
        forgetful = predicted_peak(program, seq_len, workspace=False)
        assert abs(forgetful / measured - 1) > TOLERANCE, (forgetful, measured)
        assert not evaluate(program, seq_len, workspace=False).step.startswith("masked_attention")
