"""Find the attention modules (vision and language) and the vision-language projector of a model.

Attention modules are known by class name (the registries below, DeepSpeed's names included) or
by a class attribute ``autosp_attention = "vision"`` / ``"language"`` (how a hand-written model
declares them without importing autosp). The unit AutoSP shards is the attention's *block*: the
nearest enclosing module (the attention itself included) that is a numbered item of an
``nn.ModuleList``, or failing that of an ``nn.Sequential`` (a transformer layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from autosp.errors import AutoSPError

VISION_ATTENTION = {
    "ViTAttention", "ViTSelfAttention", "CLIPAttention", "SiglipAttention", "InternVisionAttention",
    "InternVLVisionAttention", "Qwen2VLVisionAttention", "VisionAttention", "Idefics2VisionAttention",
    "PaliGemmaVisionAttention", "DeiTAttention", "Dinov2Attention",
}
LANGUAGE_ATTENTION = {
    "LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen2VLAttention", "Qwen3Attention",
    "InternLM2Attention", "GemmaAttention", "Gemma2Attention", "Phi3Attention", "GPTNeoXAttention",
    "FalconAttention", "MptAttention",
}
PROJECTOR_NAMES = ("multi_modal_projector", "mm_projector", "visual_projection", "vision_proj",
                   "img_projection", "merger", "mlp1")


def register_attention(class_name: str, side: str) -> None:
    """Teach the detector an attention class: ``side`` is "vision" or "language"."""
    if side not in ("vision", "language"):
        raise AutoSPError(f"register_attention: side must be 'vision' or 'language', got {side!r}")
    (VISION_ATTENTION if side == "vision" else LANGUAGE_ATTENTION).add(class_name)


def register_projector(attribute_name: str) -> None:
    """Teach the detector the attribute name of a vision-language projector."""
    global PROJECTOR_NAMES
    PROJECTOR_NAMES = (*PROJECTOR_NAMES, attribute_name)


@dataclass
class SPModelInfo:
    """What :func:`detect_model_sp_info` found. Names are dotted module names in the model."""
    vit_attn_modules: list = field(default_factory=list)    # [(name, module)]
    llm_attn_modules: list = field(default_factory=list)    # [(name, module)]
    vision_projection_module: tuple | None = None          # (name, module)
    blocks: dict = field(default_factory=dict)              # block name -> (block, side, [attention names])

    def summary(self) -> str:
        proj = self.vision_projection_module[0] if self.vision_projection_module else None
        return (f"{len(self.vit_attn_modules)} vision attention, {len(self.llm_attn_modules)} language "
                f"attention in {len(self.blocks)} blocks; projector: {proj}")


def _side(module: nn.Module) -> str | None:
    declared = getattr(type(module), "autosp_attention", None)
    if declared in ("vision", "language"):
        return declared
    name = type(module).__name__
    if name in VISION_ATTENTION:
        return "vision"
    if name in LANGUAGE_ATTENTION:
        return "language"
    return None


def _block_of(model: nn.Module, name: str) -> str | None:
    """The nearest enclosing module of ``name`` (itself included) that is a numbered item of an
    ``nn.ModuleList``, else of an ``nn.Sequential`` (timm's ``blocks``)."""
    parts = name.split(".")
    modules = dict(model.named_modules())
    for holder in (nn.ModuleList, nn.Sequential):
        for cut in range(len(parts), 0, -1):
            parent = modules[".".join(parts[:cut - 1])]
            if isinstance(parent, holder) and parts[cut - 1].isdigit():
                return ".".join(parts[:cut])
    return None


def detect_model_sp_info(model: nn.Module) -> SPModelInfo:
    """Scan ``model`` for vision attention, language attention and the projector."""
    info = SPModelInfo()
    taken: list[str] = []
    for name, module in model.named_modules():
        side = _side(module)
        if side is None or any(name.startswith(t + ".") for t in taken):
            continue  # nested attention classes (ViTAttention > ViTSelfAttention) count once
        taken.append(name)
        (info.vit_attn_modules if side == "vision" else info.llm_attn_modules).append((name, module))
        block = _block_of(model, name)
        if block is None:
            raise AutoSPError(f"{side} attention {name!r} ({type(module).__name__}) is neither an item of an "
                              "nn.ModuleList or nn.Sequential nor inside one: AutoSP shards the sequence per "
                              "layer (a numbered item of such a list) and found none to shard")
        entry = info.blocks.setdefault(block, (model.get_submodule(block), side, []))
        entry[2].append(name)
    for name, module in model.named_modules():
        if name.split(".")[-1] in PROJECTOR_NAMES:
            info.vision_projection_module = (name, module)
            break
    return info


def describe_unknown(model: nn.Module) -> str:
    """The message for a model with nothing to wrap: what it holds and how to register it."""
    classes = sorted({type(m).__name__ for _, m in model.named_modules()
                      if "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()})
    found = ", ".join(classes) or "no module whose class name mentions attention"
    return (f"{type(model).__name__}: no known vision or language attention module (found: {found}). "
            "Register the class with autosp.multimodal.register_attention('ClassName', 'vision' or "
            "'language'), or give it a class attribute autosp_attention = 'vision' / 'language'; a "
            "projector with autosp.multimodal.register_projector('attribute_name').")
