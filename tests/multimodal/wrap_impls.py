"""Negative controls for autosp-wrap (each a bug planted in autosp.multimodal for the duration of a
test, with pytest's monkeypatch; the threaded simulator runs the ranks in this process), and
``UlyssesSPViTAttention`` used by hand (shard, wrapped attention, gather)."""
import torch
import torch.nn.functional as F

from autosp import collectives
from autosp.collectives import ChunkLayout
from autosp.multimodal import UlyssesSPViTAttention, fusion, lazy, ulysses, wrap
from autosp.multimodal.fusion import IGNORE_INDEX


def local_attention(monkeypatch):
    """Attention over this rank's chunk only (the all-to-alls left out)."""
    def sdpa(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if k.shape[1] != q.shape[1]:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal or ctx.causal_hint, scale=scale)
    monkeypatch.setattr(ulysses, "ulysses_sdpa", sdpa)


def every_rank_counts(monkeypatch):
    """Replicated outputs' gradients kept on every rank (so summed P times)."""
    monkeypatch.setattr(collectives, "count_once", lambda x, group: x)


class _OwnGradOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, layout, group):
        ctx.dim, ctx.layout = dim, layout
        with torch.no_grad():
            return collectives.gather(x, dim % x.dim(), layout.length, collectives.group_key(group), layout.world_size)

    @staticmethod
    def backward(ctx, grad):
        layout = ctx.layout
        own = collectives.pad_to(grad, ctx.dim, layout.padded_len).narrow(ctx.dim, layout.start, layout.local_len)
        return own, None, None, None


def gather_without_reduce(monkeypatch):
    """The gather's backward keeps this rank's own gradient, without the other ranks' parts."""
    monkeypatch.setattr(collectives, "gather_chunks", lambda x, dim, layout, group: _OwnGradOnly.apply(x, dim, layout, group))


def no_image_boundaries(monkeypatch):
    """Qwen2-VL's vision layers run as one sequence: attention crosses from one image to the next."""
    def adapter(kwargs, layout):
        wrap._qwen2_vl_vision(kwargs, layout)
        return None
    monkeypatch.setitem(wrap.BLOCK_ADAPTERS, "Qwen2VLVisionBlock", adapter)


def padding_reaches_loss(monkeypatch):
    """The fusion adapter labels the padding positions with a real token id (0)."""
    def sharded_loss(self, model, logits, labels, layout):
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        local = collectives.shard_chunk(shifted, 1, layout, self.state.group, 0)  # padding labelled as token 0
        part = model.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                                   shift_labels=local,
                                   num_items_in_batch=(shifted != IGNORE_INDEX).sum())
        return collectives.group_sum(part, collectives.group_key(self.state.group))
    monkeypatch.setattr(fusion.ModalityFusionSPAdapter, "sharded_loss", sharded_loss)


def outside_reader_gets_own_chunk(monkeypatch):
    """A layer output read outside the layers is this rank's chunk repeated to the full length
    (the shape fits; the other ranks' positions are missing) instead of the gathered value."""
    def own_chunk(chunk, seq_dim, layout, group):
        copies = [1] * chunk.dim()
        copies[seq_dim] = layout.world_size
        return chunk.repeat(*copies).narrow(seq_dim, 0, layout.length)
    monkeypatch.setattr(lazy, "gather_full", own_chunk)


def stale_chunk_after_inplace(monkeypatch):
    """The next layer takes the previous layer's chunk even after the gathered value was modified
    in place (the version check left out)."""
    def local(self, seq_dim, layout, group):
        return self.chunk
    monkeypatch.setattr(lazy.LazyGathered, "local", local)


BUGS = {f.__name__: f for f in (local_attention, every_rank_counts, gather_without_reduce, no_image_boundaries,
                                 padding_reaches_loss, outside_reader_gets_own_chunk, stale_chunk_after_inplace)}


def manual_vit_attention(model, group, has_cls_token=False):
    """For one_attention_model.py: shard after the embedding (class token included, an ordinary
    position), UlyssesSPViTAttention around the attention, gather before the head."""
    attn = UlyssesSPViTAttention(model.attn, group, has_cls_token=has_cls_token)

    def step(x, labels):
        full = model.embed(x)
        layout = ChunkLayout.of(full.shape[1], group)
        chunk = attn(collectives.shard_chunk(full, 1, layout, group), length=layout.length)
        hidden = collectives.gather_chunks(chunk, 1, layout, group)
        return {"loss": collectives.count_once(model.loss(hidden, labels), group)}
    return step


def manual_vit_attention_deepspeed_layout(model, group, has_cls_token=True, pass_length=True):
    """DeepSpeed's layout: the class token first on every rank, then this rank's chunk of the patches."""
    attn = UlyssesSPViTAttention(model.attn, group, has_cls_token=has_cls_token)

    def step(x, labels):
        full = model.embed(x)
        patches = ChunkLayout.of(full.shape[1] - 1, group)
        local = torch.cat([full[:, :1], collectives.shard_chunk(full[:, 1:], 1, patches, group)], 1)
        out = attn(local, length=patches.length) if pass_length else attn(local)
        hidden = torch.cat([out[:, :1], collectives.gather_chunks(out[:, 1:], 1, patches, group)], 1)
        return {"loss": collectives.count_once(model.loss(hidden, labels), group)}
    return step


def deepspeed_layout_cls_ignored(model, group):
    """Negative control: DeepSpeed's layout with has_cls_token=False and no length (as DeepSpeed is
    called): attention sees the class token P times."""
    return manual_vit_attention_deepspeed_layout(model, group, has_cls_token=False, pass_length=False)


def sharded_cls_taken_for_replicated(model, group):
    """Bad input: the class token sharded as an ordinary position, has_cls_token=True."""
    return manual_vit_attention(model, group, has_cls_token=True)
