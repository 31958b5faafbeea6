"""Fewer layers traced, all simulated (layers.py): a program traced with 5 decoder layers and
extended to 6 (layers 2 and 3 both copies of traced layer 2) gives the peak, and the breakdown
of it, of a full 6-layer trace at every length.
Negative controls: a model whose middle layers differ is refused as not periodic (by the
structure check and by the traced program itself), and a wrong extension (one layer too many)
gives a larger peak."""
import pytest

from autosp_verify.scale import layers
from autosp_verify.scale.evaluate import evaluate
from autosp_verify.scale.program import END, Buffer, Program, Step, build_program
from autosp_verify.scale.trace import build_model, trace_step
from tests.scale import tiny_lm

FULL = 6
LENGTHS = (64, 1000, 4096, 1 << 20)


def _program(model_fn, impl, world_size, checkpointing, cut=None):
    return build_program(trace_step(model_fn, tiny_lm.inputs_fn, impl=impl, world_size=world_size,
                                    checkpointing=checkpointing, layers=cut))


def _model():
    return tiny_lm.model_fn(FULL)


CASES = [pytest.param("autosp", 2, None, id="autosp-P2", marks=pytest.mark.slow),
         pytest.param("one_device", 1, None, id="one-device", marks=pytest.mark.slow),
         pytest.param("autosp", 2, "selective", id="autosp-P2-selective", marks=pytest.mark.slow)]


@pytest.mark.parametrize("impl, world_size, checkpointing", CASES)
def test_extended_program_equals_the_full_trace(impl, world_size, checkpointing):
    path, cut = layers.stack_path(build_model(_model)), layers.traced_layers()
    assert layers.homogeneous(build_model(_model)) is None
    full = _program(_model, impl, world_size, checkpointing)
    part = _program(_model, impl, world_size, checkpointing, cut)
    extended = layers.extend(part, path, cut, FULL)
    for n in LENGTHS:
        a, b = evaluate(full, n), evaluate(extended, n)
        assert (a.total, a.by_category, a.end_live) == (b.total, b.by_category, b.end_live), n
    longer = layers.extend(part, path, cut, FULL + 1)  # negative control: one layer too many
    assert evaluate(longer, 4096).total > evaluate(full, 4096).total


def _uneven():
    """Middle layer 2 with a wider MLP."""
    model = tiny_lm.model_fn(FULL)
    import torch
    wide = tiny_lm.model_fn(1, intermediate=256).model.layers[0]
    model.model.layers[2] = wide
    return model.to(torch.float32)


@pytest.mark.slow
def test_layers_that_differ_are_not_extended():
    model = build_model(_uneven)
    assert layers.homogeneous(model) == "the decoder layers differ in structure"
    cut = layers.traced_layers()
    part = _program(_uneven, "autosp", 2, None, cut)
    with pytest.raises(layers.NotPeriodic, match="middle layers"):
        layers.extend(part, layers.stack_path(model), cut, FULL)


def _synthetic(n_layers: int) -> Program:
    """A stack's program written by hand: per layer, a temporary, an activation saved for the
    layer's backward, the residual stream read by the next layer, and a gradient to the end; an
    embedding before the layers whose gradient comes after them."""
    steps, buffers = [], []

    def step(phase, module):
        steps.append(Step(f"s{len(steps)}", phase, module, op=module.rsplit(".", 1)[-1]))
        return len(steps) - 1
    embed = step("forward", "model.embed")
    fw = {i: [step("forward", f"model.layers.{i}.mlp") for _ in range(3)] for i in range(n_layers)}
    head = step("forward", "lm_head")
    loss = step("backward", "lm_head")
    bw = {i: [step("backward", f"model.layers.{i}.mlp") for _ in range(2)] for i in reversed(range(n_layers))}
    embed_grad = step("backward", "model.embed")
    buffers.append(Buffer("embed", 10, "saved", embed, fw[0][1]))
    for i in range(n_layers):
        buffers.append(Buffer(f"tmp{i}", 7, "temporaries", fw[i][0], fw[i][1]))
        buffers.append(Buffer(f"act{i}", 5, "saved", fw[i][1], bw[i][1]))
        after = fw[i + 1][0] if i + 1 < n_layers else head
        buffers.append(Buffer(f"res{i}", 3, "saved", fw[i][2], after))
        buffers.append(Buffer(f"grad{i}", 2, "gradients", bw[i][0], END))
    buffers.append(Buffer("logits", 11, "temporaries", head, loss))
    buffers.append(Buffer("embed_grad", 13, "gradients", embed_grad, END))
    return Program(steps, buffers, frozenset(), [], {})


def test_extension_of_a_hand_written_stack():
    """Fast and with no tracing: a 5-layer program extended to 9 layers is the 9-layer one."""
    cut = layers.traced_layers()
    extended = layers.extend(_synthetic(cut), "model.layers", cut, 9)
    want = _synthetic(9)
    key = lambda p: sorted((b.name[:3], b.nbytes, b.category, b.birth, b.death) for b in p.buffers)  # noqa: E731
    assert [(s.phase, s.op) for s in extended.steps] == [(s.phase, s.op) for s in want.steps]
    assert key(extended) == key(want)
    assert evaluate(extended, 2).total == evaluate(want, 2).total
    assert key(layers.extend(_synthetic(cut), "model.layers", cut, 10)) != key(want)  # negative control
