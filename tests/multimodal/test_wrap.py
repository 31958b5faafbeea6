"""autosp.multimodal through the verifier: every multimodal fixture exact at P in {2, 4} in float64
(loss and every gradient: vision tower, projector, patch embedding), each planted bug caught, and
the errors a user meets named clearly."""
import contextlib
import os
import re

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from autosp import AutoSPError
from autosp.multimodal import wrap as wrap_module
from autosp.multimodal import (auto_wrap_model_for_sp, detect_model_sp_info, register_attention,
                               unwrap_model_for_sp)
from autosp_verify.accounting import saved as saved_module
from autosp_verify.cli import main
from autosp_verify.run import verify_file

from . import wrap_impls

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "..", "fixtures")
ONE_ATTENTION = os.path.join(HERE, "one_attention_model.py")

# fixture -> (a length 2 and 4 divide, one neither divides), and the names its vision tower,
# projector and patch embedding parameters match
MULTIMODAL = {
    "hf_vit": ((16, 13), r"vit\.layers", r"classifier", r"embeddings\.patch"),
    "mini_vlm": ((16, 19), r"vision_tower\.blocks", r"mm_projector", r"vision_tower\.patch_embed"),
    "hf_llava": ((16, 19), r"vision_tower\.encoder", r"multi_modal_projector", r"patch_embedding"),
    "hf_qwen2_vl": ((16, 19), r"visual\.blocks", r"visual\.merger", r"visual\.patch_embed"),
    "hf_internvl": ((16, 19), r"vision_tower\.encoder", r"multi_modal_projector", r"embeddings\.patch"),
}


def fixture(name):
    return os.path.join(FIXTURES, f"{name}.py")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(MULTIMODAL))
def test_multimodal_fixture_is_exact(name, world_size):
    lengths, *parts = MULTIMODAL[name]
    for seq_len in lengths:
        result = verify_file(fixture(name), impl="autosp-wrap", world_size=world_size, seq_len=seq_len, steps=1)
        assert result.status == "pass", (seq_len, result.error, result.failures)
        checked = [t["name"] for t in result.tensors if t["passed"]]
        for pattern in parts:  # the vision side's gradients are among the checked tensors
            assert any(re.search(pattern, n) for n in checked), (pattern, checked)


@pytest.mark.parametrize("name", ["mini_vlm", "hf_llava"])
def test_length_equal_to_head_dim(name):
    """Text head_dim 8 at seq_len 8: the rotary tables [B, S, head_dim] are shaped like an [S, S]
    mask; the forward's parameter names (mini_vlm passes cos, sin positionally; HF passes
    position_embeddings=(cos, sin)) say they are per-position and get sharded."""
    result = verify_file(fixture(name), impl="autosp-wrap", world_size=2, seq_len=8)
    assert result.status == "pass", (result.error, result.failures)


# bug -> the fixture and length that expose it
NEGATIVE_CONTROLS = [
    ("local_attention", "hf_vit", 13),
    ("every_rank_counts", "hf_vit", 13),
    ("gather_without_reduce", "hf_llava", 19),
    ("no_image_boundaries", "hf_qwen2_vl", 19),
    ("padding_reaches_loss", "hf_llava", 19),
    ("outside_reader_gets_own_chunk", "hf_llava", 19),  # vision_feature_layer reads vision layer 0
]


@pytest.mark.parametrize("bug,name,seq_len", NEGATIVE_CONTROLS, ids=[c[0] for c in NEGATIVE_CONTROLS])
def test_planted_bug_is_caught(bug, name, seq_len, monkeypatch):
    wrap_impls.BUGS[bug](monkeypatch)
    result = verify_file(fixture(name), impl="autosp-wrap", world_size=2, seq_len=seq_len)
    assert result.status == "fail", (result.status, result.error)


@pytest.mark.parametrize("seq_len", [8, 7])
@pytest.mark.parametrize("layout", ["manual_vit_attention", "manual_vit_attention_deepspeed_layout"])
def test_ulysses_vit_attention_by_hand(layout, seq_len):
    """UlyssesSPViTAttention alone: a class token (sharded as an ordinary position, or first on
    every rank as in DeepSpeed with has_cls_token=True), pooling over patches outside attention,
    padding."""
    result = verify_file(ONE_ATTENTION, impl=f"{HERE}/wrap_impls.py:{layout}", world_size=4, seq_len=seq_len)
    assert result.status == "pass", (result.error, result.failures[:3])


def test_class_token_layouts_mixed_up():
    """Negative control: DeepSpeed's layout with the class token taken as an ordinary position
    fails the check; the sharded layout declared has_cls_token=True is refused by name."""
    ignored = verify_file(ONE_ATTENTION, impl=f"{HERE}/wrap_impls.py:deepspeed_layout_cls_ignored", world_size=4,
                          seq_len=9)  # 8 patches: P divides them, so no length check can catch it
    assert ignored.status == "fail", (ignored.status, ignored.error)
    mixed = verify_file(ONE_ATTENTION, impl=f"{HERE}/wrap_impls.py:sharded_cls_taken_for_replicated", world_size=4,
                        seq_len=8)
    assert mixed.status == "unsupported" and "has_cls_token=False" in mixed.error, (mixed.status, mixed.error)


def test_cli_runs_autosp_wrap(capsys):
    assert main([fixture("mini_vlm"), "--impl", "autosp-wrap", "--world-size", "2", "--seq-len", "19"]) == 0
    assert "PASS" in capsys.readouterr().out


# --- what a user meets -----------------------------------------------------------------------------

class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4)])

    def forward(self, x):
        return self.layers[0](x)


def test_nothing_to_wrap_says_what_it_found_and_how_to_register():
    with pytest.raises(AutoSPError, match=r"Plain: no known vision or language attention.*register_attention"):
        auto_wrap_model_for_sp(Plain(), process_group=object())


class MyAttention(nn.Module):
    def forward(self, x):
        return x


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = MyAttention()


def test_registered_attention_class_is_detected():
    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()])
    assert not detect_model_sp_info(model).blocks
    register_attention("MyAttention", "vision")
    info = detect_model_sp_info(model)
    assert list(info.blocks) == ["layers.0", "layers.1"] and len(info.vit_attn_modules) == 2


def test_attention_that_is_itself_the_list_item_is_its_own_block():
    model = nn.Module()
    model.layers = nn.ModuleList([MyAttention(), MyAttention()])
    register_attention("MyAttention", "vision")
    assert list(detect_model_sp_info(model).blocks) == ["layers.0", "layers.1"]


@pytest.mark.parametrize("seq_len", [9, 8])
def test_timm_style_blocks_in_nn_sequential_are_exact(seq_len):
    result = verify_file(os.path.join(HERE, "sequential_vit_model.py"), impl="autosp-wrap", world_size=4,
                         seq_len=seq_len)
    assert result.status == "pass", (result.status, result.error, result.failures[:3])
    assert any(t["name"].startswith("grad blocks.1.attn") for t in result.tensors if t["passed"])
    measured = result.accounting["collectives"]["measured"]
    assert measured["all_to_all"] == 2 * 4 * 2, measured  # 2 blocks x (q, k, v, out) x (forward, backward)


def test_attention_outside_a_layer_list_is_refused():
    model = nn.Module()
    model.attn = MyAttention()
    register_attention("MyAttention", "vision")
    with pytest.raises(AutoSPError, match="neither an item of an nn.ModuleList or nn.Sequential nor inside one"):
        detect_model_sp_info(model)


def _hf_vit(attn_implementation):
    from transformers import ViTConfig, ViTModel
    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32,
                       image_size=8, patch_size=4, attn_implementation=attn_implementation)
    return ViTModel(config)


def test_eager_attention_is_refused_at_wrap_time():
    with pytest.raises(AutoSPError, match="attn_implementation='eager'.*needs 'sdpa'"):
        auto_wrap_model_for_sp(_hf_vit("eager"), process_group=object())


def test_wrap_twice_refused_and_unwrap_restores_one_device(monkeypatch):
    model = _hf_vit("sdpa").eval()
    pixels = torch.randn(1, 3, 8, 8)
    expected = model(pixels).last_hidden_state
    group = object()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: 2)
    auto_wrap_model_for_sp(model, process_group=group)
    with pytest.raises(AutoSPError, match="already wrapped"):
        auto_wrap_model_for_sp(model, process_group=group)
    unwrap_model_for_sp(model)
    assert torch.equal(model(pixels).last_hidden_state, expected)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())  # each layer's class forward again


def test_a_forward_set_on_a_layer_instance_is_refused():
    model = _hf_vit("sdpa")
    model.layers[0].forward = lambda hidden_states, *a, **k: hidden_states
    with pytest.raises(AutoSPError, match=r"layer 'layers.0' \(ViTLayer\) has a forward set on the instance"):
        auto_wrap_model_for_sp(model, process_group=object())
    assert not hasattr(model, "_autosp_sp_state")


class MixingLayer(nn.Module):
    """A layer that, besides attention, mixes positions (token pooling, or a depthwise conv)."""

    def __init__(self, mix):
        super().__init__()
        self.attn, self.mix = nn.Linear(8, 24), mix

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.attn(x).view(b, s, 3, 2, 4).permute(2, 0, 3, 1, 4)
        x = x + torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 8)
        if self.mix == "pool":
            return x + x.mean(dim=1, keepdim=True)
        return x + torch.nn.functional.conv1d(x.transpose(1, 2), torch.ones(8, 1, 3, dtype=x.dtype),
                                              padding=1, groups=8).transpose(1, 2)


class MixingAttention(nn.Linear):
    autosp_attention = "vision"


class MixingModel(nn.Module):
    def __init__(self, mix):
        super().__init__()
        self.layers = nn.ModuleList([MixingLayer(mix)])
        self.layers[0].attn.__class__ = MixingAttention

    def forward(self, x):
        return {"loss": self.layers[0](x).square().mean()}


@pytest.mark.parametrize("mix,op", [("pool", "mean over the sequence dim 1"), ("conv", "conv1d")])
def test_sequence_mixing_inside_a_layer_is_refused(mix, op):
    from autosp_verify.run import verify

    result = verify(lambda: MixingModel(mix), lambda batch, seq_len, g: {"x": torch.randn(batch, seq_len, 8, generator=g)},
                    impl="autosp-wrap", world_size=2, seq_len=8)
    assert result.status == "unsupported", (result.status, result.error)
    assert op in result.error and "layers.0" in result.error


@pytest.mark.multiproc
def test_real_gloo_processes():
    """Real C++ process groups (the threaded group is a Python object: more forgiving)."""
    result = verify_file(fixture("hf_llava"), impl="autosp-wrap", world_size=2, seq_len=19, simulator="gloo")
    assert result.status == "pass", (result.error, result.failures)


def test_deepspeed_users_code_meets_its_exceptions():
    """DeepSpeed's AutoSP raises ValueError for a model it cannot handle, and its
    LlavaFusionAdapter takes (projector, group, image_token_id=...): both answered by name."""
    from autosp.multimodal import fusion
    with pytest.raises(ValueError, match="no known vision or language attention"):
        auto_wrap_model_for_sp(Plain(), process_group=object())
    projector = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8))
    with pytest.raises(AutoSPError, match="DeepSpeed's signature .* auto_wrap_model_for_sp"):
        fusion.LlavaFusionAdapter(projector, object(), image_token_id=32000)


def test_past_the_head_count_the_eager_path_gathers_keys_and_values():
    """LLaVA's 4-head language model and vision tower over 8 ranks: Ulysses within blocks, keys and
    values gathered over the blocks, exact, and fewer bytes than padding the heads up to P."""
    gathers = {}
    for world_size in (4, 8):  # 4 heads: plain Ulysses at 4 ranks, blocks of Ulysses at 8
        result = verify_file(fixture("hf_llava"), impl="autosp-wrap", world_size=world_size, seq_len=13, steps=1)
        assert result.status == "pass", (world_size, result.error, result.failures)
        gathers[world_size] = result.accounting["collectives"]["measured"]["all_gather"]
    attention_layers = 4  # 2 in the vision tower, 2 in the language model
    assert gathers[8] - gathers[4] == 2 * attention_layers  # keys and values, each attention


CHECKPOINTED_LLAVA = os.path.join(HERE, "checkpointed_llava.py")


def _checkpointed_a2a(world_size=2, seq_len=19):
    plain = verify_file(fixture("hf_llava"), impl="autosp-wrap", world_size=world_size, seq_len=seq_len, steps=1)
    checkpointed = verify_file(CHECKPOINTED_LLAVA, impl="autosp-wrap", world_size=world_size, seq_len=seq_len,
                               steps=1)
    a2a = lambda r: r.accounting["collectives"]["measured"]["all_to_all"]  # noqa: E731
    return checkpointed, a2a(plain), a2a(checkpointed)


def test_hf_activation_checkpointing_is_exact_and_recomputes_once():
    """HF's checkpointed layers recompute their forward in the backward, outside the layer's call:
    the recompute runs Ulysses too. The verifier's saved-tensor walk must not trigger recomputes
    (each would run the layer's collectives again): the all-to-alls are the plain run's plus one
    forward of each recomputed layer, at most half as many again."""
    from autosp.masked_attention import KERNELS
    KERNELS.clear()
    checkpointed, plain_a2a, checkpointed_a2a = _checkpointed_a2a()
    assert checkpointed.status == "pass", (checkpointed.error, checkpointed.failures)
    assert plain_a2a < checkpointed_a2a <= 1.5 * plain_a2a, (plain_a2a, checkpointed_a2a)
    # checkpointing turns use_cache off: HF's mask, causal, runs torch's fused kernel
    assert KERNELS["fused"] > 0, dict(KERNELS)


def test_recompute_outside_ulysses_is_caught(monkeypatch):
    """Negative control: the recompute left outside UlyssesMode attends this rank's chunk alone."""
    monkeypatch.setattr(wrap_module, "_recompute_in_mode", lambda block, context: contextlib.nullcontext())
    result = verify_file(CHECKPOINTED_LLAVA, impl="autosp-wrap", world_size=2, seq_len=19, steps=1)
    assert result.status == "error" and "CheckpointError" in result.error, (result.status, result.error)


def test_saved_tensor_walk_that_recomputes_is_caught(monkeypatch):
    """Negative control: a walk that lets the reads recompute counts every recompute's collectives."""
    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))
    monkeypatch.setattr(saved_module, "_NoRecompute", Reads)
    _, plain_a2a, checkpointed_a2a = _checkpointed_a2a()
    assert checkpointed_a2a > 1.5 * plain_a2a, (plain_a2a, checkpointed_a2a)
