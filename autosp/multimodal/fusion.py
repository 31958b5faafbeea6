"""Fusion adapters: keep the language model's tail (final norm, lm_head, loss) sequence-sharded.

On a wrapped vision-language model the visual tokens are spliced into the text by the model's own
code on the full sequence (every rank holds it outside the layers), so image features and image
tokens always match, and positions (including Qwen2-VL's 3-D mrope ids) and masks are computed for
the full sequence before each layer takes its chunk. What remains full is the tail: logits of
shape [B, S, vocab] on every rank. An adapter leaves the last language layer's output sharded, so
the final norm and lm_head run on this rank's chunk, and computes the loss itself: the labels are
shifted on the full sequence, then sharded with the same layout, padding positions labelled
``ignore_index`` (padding never reaches the loss); each rank's sum over its targets is divided by
the number of targets in the whole batch and summed over the group. The returned ``logits`` are
this rank's chunk of the sequence (without padding; chunks in rank order).
"""
from __future__ import annotations

import torch.nn.functional as F

from autosp import collectives
from autosp.errors import AutoSPError

IGNORE_INDEX = -100


class ModalityFusionSPAdapter:
    """Shard the language tail of a model wrapped by :func:`auto_wrap_model_for_sp`.

    ``language_model``: dotted name of the text decoder (its last layer stays sharded);
    ``lm_head``: dotted name of the output projection. Subclasses name them for an architecture.
    The model must take ``labels=`` as a keyword and compute logits ``[B, S, vocab]`` from the
    decoder's last hidden state with position-wise ops only.
    """
    language_model = "model.language_model"
    lm_head = "lm_head"
    architectures: tuple = ()

    def __init__(self, model, process_group=None, language_model: str | None = None, lm_head: str | None = None,
                 image_token_id: int | None = None):
        state = getattr(model, "_autosp_sp_state", None)
        if state is None or image_token_id is not None:
            raise AutoSPError(f"{type(self).__name__}: takes the model wrapped by auto_wrap_model_for_sp (got "
                              f"{type(model).__name__}{' and image_token_id' if image_token_id is not None else ''}"
                              "). DeepSpeed's signature (the projector, the group, image_token_id) is not this "
                              "one: auto_wrap_model_for_sp(model, group) installs the adapter for known "
                              "architectures itself (fusion=True), with the placeholder token the model's "
                              "config names")
        self.language_model = language_model or self.language_model
        self.lm_head = lm_head or self.lm_head
        for path in (self.language_model, self.lm_head):
            try:
                model.get_submodule(path)
            except AttributeError:
                raise AutoSPError(f"{type(self).__name__}: {type(model).__name__} has no module {path!r}") from None
        blocks = [name for name, (_, side, _) in state.info.blocks.items()
                  if name.startswith(self.language_model + ".")]
        if not blocks:
            raise AutoSPError(f"{type(self).__name__}: no attention layer found under {self.language_model!r}")
        self.state, self.last_block = state, blocks[-1]
        state.keep_sharded.add(self.last_block)
        state.handles.append(model.register_forward_pre_hook(self._take_labels, with_kwargs=True, prepend=True))
        state.handles.append(model.register_forward_hook(self._loss, prepend=True))

    def _take_labels(self, model, args, kwargs):
        self.labels = kwargs.pop("labels", None)
        return args, kwargs

    def _loss(self, model, args, output):
        layout = self.state.tail_layout
        if layout is None:
            raise AutoSPError(f"{type(self).__name__}: the language model's last layer {self.last_block!r} did not run")
        logits = output["logits"]
        if logits.shape[1] != layout.local_len:
            raise AutoSPError(f"{type(self).__name__}: logits {tuple(logits.shape)} are not this rank's "
                              f"{layout.local_len} positions; lm_head does not follow the last layer position-wise")
        if self.labels is not None:
            output["loss"] = self.sharded_loss(model, logits, self.labels, layout)
            self.state.sharded_outputs.add(id(output["loss"]))
        output["logits"] = logits[:, :layout.valid_local]
        self.state.sharded_outputs.add(id(output["logits"]))
        self.labels = None
        return output

    def sharded_loss(self, model, logits, labels, layout):
        """The causal-LM loss of the whole batch, from this rank's chunk of the logits."""
        if labels.shape[1] != layout.length:
            raise AutoSPError(f"{type(self).__name__}: labels {tuple(labels.shape)} do not match the fused "
                              f"sequence of {layout.length} positions")
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        local = collectives.shard_chunk(shifted, 1, layout, self.state.group, IGNORE_INDEX)
        count = (shifted != IGNORE_INDEX).sum()
        loss_function = getattr(model, "loss_function", None)
        if loss_function is not None:
            part = loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                                 shift_labels=local, num_items_in_batch=count)
        else:
            part = F.cross_entropy(logits.flatten(0, 1), local.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum") / count
        return collectives.group_sum(part, collectives.group_key(self.state.group))


class LlavaFusionAdapter(ModalityFusionSPAdapter):
    """HF ``LlavaForConditionalGeneration``: the image's tokens are ``image_token_id`` runs."""
    architectures = ("LlavaForConditionalGeneration",)


class Qwen2VLFusionAdapter(ModalityFusionSPAdapter):
    """HF ``Qwen2VLForConditionalGeneration``: 3-D mrope position ids are computed by the model on the
    full sequence (from ``image_grid_thw``/``mm_token_type_ids``) and sharded per layer with cos/sin."""
    architectures = ("Qwen2VLForConditionalGeneration",)


class InternVLFusionAdapter(ModalityFusionSPAdapter):
    """HF ``InternVLForConditionalGeneration``: ``<IMG_CONTEXT>`` tokens replaced 1-to-1."""
    architectures = ("InternVLForConditionalGeneration",)


ADAPTERS = {arch: cls for cls in (LlavaFusionAdapter, Qwen2VLFusionAdapter, InternVLFusionAdapter)
            for arch in cls.architectures}


def adapter_for(model) -> type | None:
    return ADAPTERS.get(type(model).__name__)
