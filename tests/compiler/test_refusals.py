"""Soundness: an op that mixes the sequence with no sequence-parallel rule is refused at compile
time with AutoSPError naming the op and the model's source line; never run silently wrong."""
import pytest
import torch

import autosp

from .mixing_models import MIXERS, MixingLM, inputs_fn

OP_NAMES = {"group_norm": "group_norm", "cumsum": "cumsum", "last_token": "getitem", "conv1d": "conv1d",
            "eager_attention": "matmul", "sort": "sort", "flip": "flip", "gather": "gather",
            "roll": "roll"}


def _compile_for(kind, world_size):
    torch._dynamo.reset()
    batch = inputs_fn(2, 8, torch.Generator().manual_seed(0))
    autosp.compile(MixingLM(kind), backend="eager").warm_up(world_size, **batch)


@pytest.mark.parametrize("kind", sorted(MIXERS))
def test_sequence_mixing_op_is_refused_with_op_and_source_line(kind):
    with pytest.raises(autosp.AutoSPError) as info:
        _compile_for(kind, 2)
    message = str(info.value)
    assert OP_NAMES[kind] in message, message
    assert "mixing_models.py" in message, message  # the model's own source line


def test_attention_model_compiles():
    """Control for the refusals above: the same model with attention instead compiles."""
    _compile_for("sdpa", 2)


def test_fewer_query_heads_than_ranks_is_refused_with_the_counts():
    with pytest.raises(autosp.AutoSPError, match="4 query heads, fewer than the 8 ranks"):
        _compile_for("sdpa", 8)
