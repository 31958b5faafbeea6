"""Soundness: an op that mixes the sequence with no sequence-parallel rule is refused at compile
time with AutoSPError naming the op and the model's source line; never run silently wrong."""
import pytest
import torch

import autosp
from autosp_verify import verify

from .mixing_models import MIXERS, MixingLM, inputs_fn

OP_NAMES = {"group_norm": "group_norm", "cumsum": "cumsum", "last_token": "getitem", "conv1d": "pad",
            "eager_attention": "matmul", "sort": "sort", "flip": "flip", "gather": "gather",
            "roll": "roll", "min_over_seq": "min", "addmm_over_seq": "addmm",
            "repeat_along_seq": "repeat", "histc_own_range": "histc"}


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


@pytest.mark.parametrize("kind", ["max_of_two", "window_longer", "built_shape", "repeat_along_hidden"])
def test_elementwise_max_and_a_slice_keeping_every_position_are_exact(kind):
    """Controls for ``min_over_seq`` and ``last_token`` above: max/min of two tensors is
    elementwise; ``h[:, -64:]`` of fewer than 64 positions keeps them all (Dynamo traced it so)."""
    result = verify(lambda: MixingLM(kind), inputs_fn, impl="autosp-eager", dtype=torch.float64,
                    world_size=2, seq_len=13)
    assert result.passed, (result.status, result.error, result.failures[:5])


def test_negative_control_a_size_left_whole_on_a_chunk_is_refused_at_compile_time(monkeypatch):
    """``local_sizes`` without its ``torch.Size`` case: the view would reshape a chunk to the
    whole sequence at run time (GPTBigCode crashed so); the pass's own check refuses it instead."""
    from torch import fx

    from autosp.passes import sizes
    localize = sizes._localize
    monkeypatch.setattr(sizes, "_localize", lambda ctx, arg: arg if isinstance(arg, fx.Node) and
                        arg.target is torch.Size else localize(ctx, arg))
    try:
        with pytest.raises(autosp.AutoSPError, match=r"whole sequence's[\s\S]*mixing_models.py"):
            _compile_for("built_shape", 2)
    finally:
        torch._dynamo.reset()


def test_dropout_is_said_once_with_its_line_and_a_model_without_any_is_not(recwarn):
    """Each rank draws its chunk's mask from its own generator (alike where seeded alike): said,
    with the model's line; the same model without dropout says nothing (the control)."""
    from autosp.passes.registry import COUNTERS
    _compile_for("sdpa", 2)
    assert not [w for w in recwarn if "random numbers" in str(w.message)]
    before = COUNTERS["random_draws"]
    with pytest.warns(UserWarning, match=r"draws random numbers[\s\S]*mixing_models.py.*dropout_p=0.1"):
        _compile_for("sdpa_dropout", 2)
    assert COUNTERS["random_draws"] > before


def test_attention_dropout_past_the_head_count_is_refused_with_the_way_out():
    """4 query heads over 8 ranks gathers keys and values over 2 blocks, where only the blockwise
    op can attend a rank's queries, and it draws no dropout (under 4 ranks: plain Ulysses)."""
    _compile_for("sdpa_dropout", 4)
    with pytest.raises(autosp.AutoSPError, match="dropout 0.1 with keys and values gathered over 2 blocks"):
        _compile_for("sdpa_dropout", 8)


class _UnrelatedLengths(torch.nn.Module):
    """token_type_ids is as long as input_ids (autosp checks it every call) but nothing in the graph
    relates the two sizes, so it gets a symbol of its own: an activation carrying it is refused."""

    def __init__(self):
        super().__init__()
        self.emb, self.types, self.head = torch.nn.Embedding(16, 8), torch.nn.Embedding(2, 8), torch.nn.Linear(8, 16)

    def forward(self, input_ids, labels, token_type_ids):
        logits = self.head(self.emb(input_ids))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": loss + self.types(token_type_ids).pow(2).mean(), "logits": logits}


def test_an_activation_holding_another_inputs_length_is_refused():
    ids = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    with pytest.raises(autosp.AutoSPError, match="the length of another sequence input that nothing in the model "
                                                 "relates to the sequence"):
        autosp.compile(_UnrelatedLengths(), backend="eager").warm_up(2, input_ids=ids, labels=ids,
                                                                   token_type_ids=torch.zeros_like(ids))


def test_generation_reading_a_kv_cache_is_refused_and_a_training_forward_with_use_cache_is_not():
    """transformers 5 builds a DynamicCache in every forward of a use_cache=True model (concatenation
    onto an empty cache: accepted, the default-config fixtures run it); a forward that reads a filled
    cache concatenates onto the sequence and is refused with a message that says why."""
    from fixtures import hf_llama
    assert hf_llama.model_fn().config.use_cache  # as from_pretrained returns it
    torch.manual_seed(0)
    model = hf_llama.model_fn().eval()
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = model(input_ids=ids).past_key_values
    torch._dynamo.reset()
    autosp.compile(model, backend="eager").warm_up(2, input_ids=ids)  # control: the cache-building forward
    torch._dynamo.reset()
    with pytest.raises(autosp.AutoSPError, match="reading a KV cache .* generate without autosp"):
        autosp.compile(model, backend="eager").warm_up(2, input_ids=ids[:, :4], past_key_values=cache)


def test_attention_implementation_other_than_sdpa_or_eager_is_refused_by_name():
    from fixtures import hf_llama
    model = hf_llama.model_fn()
    model.set_attn_implementation("flex_attention")
    with pytest.raises(autosp.AutoSPError, match="LlamaForCausalLM uses attn_implementation='flex_attention'.*'sdpa'"):
        autosp.compile(model, backend="eager")
    for impl in ("sdpa", "eager"):  # control: the same model with SDPA, or attention written out, is taken
        model.set_attn_implementation(impl)
        autosp.compile(model, backend="eager")


def test_a_vlm_with_data_dependent_splits_is_refused_with_the_way_out():
    """Qwen2-VL's vision tower splits attention by image sizes read from a tensor: Dynamo cannot
    guard on them. A refusal naming the line and autosp.multimodal, not Dynamo's raw error."""
    import os
    from autosp_verify import verify_file
    path = os.path.join(os.path.dirname(__file__), "..", "..", "fixtures", "hf_qwen2_vl.py")
    result = verify_file(path, impl="autosp", world_size=2, seq_len=16, steps=1)
    assert result.status == "unsupported", (result.status, result.error)
    assert "modeling_qwen2_vl.py" in result.error and "auto_wrap_model_for_sp" in result.error, result.error


def test_a_checkpoint_region_with_a_policy_of_its_own_is_refused():
    """torch.utils.checkpoint regions are inlined and recomputed (test_checkpointing.py); one with a
    context_fn (its own selective policy), or nested in another, is refused by name. Control: a
    plain region compiles."""
    _compile_for("checkpointed_sdpa", 2)
    with pytest.raises(autosp.AutoSPError, match="context_fn.*checkpointing='selective'"):
        _compile_for("checkpointed_with_policy", 2)
    with pytest.raises(autosp.AutoSPError, match="region inside another"):
        _compile_for("nested_checkpoints", 2)
