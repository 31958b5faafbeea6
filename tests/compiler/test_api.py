"""autosp's API behaviour: handled sequence reductions are exact, bad input is refused clearly."""
import pytest
import torch

import autosp
from autosp_verify import verify

from .handled_models import MeanPooledAuxLoss, SliceShiftedLoss, WeightedLoss, inputs_fn
from .mixing_models import MixingLM
from .mixing_models import inputs_fn as mixing_inputs


@pytest.mark.parametrize("model_cls", [MeanPooledAuxLoss, SliceShiftedLoss, WeightedLoss])
@pytest.mark.parametrize("world_size,seq_len", [(2, 8), (4, 9)])
def test_handled_sequence_reductions_are_exact(model_cls, world_size, seq_len):
    result = verify(model_cls, inputs_fn, impl="autosp", world_size=world_size, seq_len=seq_len)
    assert result.passed, (result.status, result.error, result.failures[:5])


class GraphBreak(MixingLM):
    def forward(self, input_ids, labels):
        print("a graph break")  # noqa: T201 - Dynamo cannot trace print
        return super().forward(input_ids, labels)


def test_graph_break_is_a_clear_error():
    with pytest.raises(autosp.AutoSPError, match="graph break"):
        autosp.compile(GraphBreak("sdpa"), backend="eager").warm_up(
            2, **mixing_inputs(2, 8, torch.Generator().manual_seed(0)))


def test_padding_error_policy_refuses_an_indivisible_length():
    config = autosp.SPConfig(backend="eager", padding="error")
    with pytest.raises(autosp.AutoSPError, match="not divisible by the group size 2"):
        autosp.compile(MixingLM("sdpa"), config=config).warm_up(
            2, **mixing_inputs(2, 7, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding="truncate"), "padding must be one of"),
    (dict(passes=("layout", "nope")), "unknown passes"),
    (dict(seq_dim=-1), "seq_dim must be"),
    (dict(attention_kernel="flash"), "attention_kernel must be one of"),
])
def test_config_is_validated_up_front(kwargs, match):
    with pytest.raises(autosp.AutoSPError, match=match):
        autosp.SPConfig(**kwargs)


def test_inputs_of_different_lengths_are_refused():
    batch = mixing_inputs(2, 8, torch.Generator().manual_seed(0))
    batch["labels"] = batch["labels"][:, :6]
    with pytest.raises(autosp.AutoSPError, match="disagree on the length"):
        autosp.compile(MixingLM("sdpa"), backend="eager").warm_up(2, **batch)


def test_prepare_inputs_marks_aliases_and_leaves_the_callers_tensors_alone():
    ids, labels = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    marked = autosp.prepare_autosp_inputs(ids, labels)
    assert marked[0] is not ids and 1 in marked[0]._dynamo_weak_dynamic_indices
    assert not hasattr(ids, "_dynamo_weak_dynamic_indices") and marked[2] is None


def test_autosp_backend_is_registered_for_torch_compile():
    from autosp.backend import autosp_backend
    assert torch._dynamo.lookup_backend("autosp") is autosp_backend
