"""AutoSP's one runtime: the only code that calls ``torch.distributed``, for the compiled passes and
the eager path (``autosp.multimodal``) alike.

- ``groups``: a process group is named in a graph by a key made of its ranks (``"ranks:0,1,2,3"``)
  and found again at run time through torch's own registry of groups, in the process, from any
  thread (the way torch's functional collectives find a group by its ranks and tag): a compiled
  graph runs its backward on CUDA's autograd threads, two models on two groups never share one,
  and one compiled graph serves every rank of a group. Also the per-rank collective counters and
  the device check (a tensor handed to a group that cannot take it is an ``AutoSPError``).
- ``layout``: how a sequence of S positions is split over P ranks (``ChunkLayout``), how far
  key/value heads are repeated so that every rank holds the kv heads of its query heads, and past
  the head count how P splits into Ulysses blocks and gathered kv blocks (``sp_degrees``).
- ``ops``: the custom ops with autograd (shard, all-to-alls between sequence- and head-sharded,
  within Ulysses blocks too, keys and values gathered over the blocks, group sum, gather with a
  reduce-scatter backward; ``head_chunk``, a rank's heads of a per-head value; ``attention_to_seq``,
  the all-to-all after an attention whose output is held once) and the eager helpers.
- ``halo``: a chunk with the positions before and after it that a convolution along the
  sequence reads, sent by the ranks holding them.
"""
from autosp.collectives.groups import (WORLD, check_device, collective_counts, count, group_key,
                                       reset_collective_counts, resolve_group)
from autosp.collectives.layout import ChunkLayout, kv_heads_sent, kv_repeats, output_held_once, sp_degrees
from autosp.collectives.ops import (attention_to_seq, count_once, gather, gather_chunks, gather_kv, gather_sequence, group_sum,
                                    head_chunk, head_to_seq, mask_padding, pad_to, seq_to_head, shard, shard_chunk,
                                    strip_padding, unshard_grad)

__all__ = ["WORLD", "ChunkLayout", "attention_to_seq", "check_device", "collective_counts", "count", "count_once", "gather",
           "gather_chunks", "gather_kv", "gather_sequence", "group_key", "group_sum", "head_chunk", "head_to_seq",
           "kv_heads_sent", "kv_repeats", "mask_padding", "output_held_once", "pad_to", "reset_collective_counts", "resolve_group",
           "seq_to_head", "shard", "shard_chunk", "sp_degrees", "strip_padding", "unshard_grad"]
