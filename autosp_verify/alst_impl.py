"""DeepSpeed's ALST Ulysses for HF models (``UlyssesSPAttentionHF``, deepspeed 0.19.8) as an impl.

Runs ALST the way its documentation and its own test (``tests/unit/ulysses_alst/``) use it:

* the batch is what ``UlyssesSPDataLoaderAdapter`` makes of it: every [B, S] tensor cut into P
  contiguous chunks, rank r keeping chunk r; ``labels`` replaced by ``shift_labels`` (shifted
  left, padded with -100) before the cut. ALST requires ``position_ids`` in every batch; a batch
  without them gets ``arange(S)``, the value its error message tells users to add;
* HF's attention function for the model's ``attn_implementation`` is replaced by
  ``UlyssesSPAttentionHF`` (all-to-all, the core attention on the whole sequence, all-to-all
  back), which drops any [B, 1, S, S] mask the model built and relies on ``is_causal``;
* the loss: ``model.loss_function(logits, labels=None, shift_labels=...)`` per rank, then the
  token-count-weighted mean over ranks through ``torch.distributed.nn.functional.all_gather``.

What differs from a DeepSpeed training job, and why:

* ``register_with_transformers`` writes one process-global table entry and one global SP group
  (``parallel_state_sp``). The in-process simulators run every rank in one process, so each rank
  builds its own ``UlyssesSPAttentionHF`` on its own group with the arguments
  ``register_with_transformers`` would pass, and the table entry is routed to the calling rank's
  instance only while its ``step`` runs (the reference and other code see HF's own function).
  The mask handling of ``register_with_transformers``' wrapper (drop every tensor mask) is kept.
* The engine averages gradients over the SP group; the verifier sums them (see the impl
  protocol), so the loss handed back has ALST's value and 1/P of its gradient.
* ALST's exchange op finds its group by name in a process-global dict; in-process simulators give
  every rank the same name, so there its lookups go through torch's per-thread registry.
"""
from __future__ import annotations

import contextlib
import threading
import warnings

import torch
import torch.distributed as dist

from autosp_verify.deepspeed_impl import DeepSpeedRefused, _import_deepspeed

# ALST's loss recipe uses it (its own test does); torch 2.13 deprecates it
warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_gather is deprecated")
_LOCK = threading.Lock()
_LOCAL = threading.local()  # .wrapper: this thread's ALST attention while its step runs
_ACTIVE: dict[str, list] = {}  # attn implementation -> [steps routing it now, the entry it replaced]


def _ulysses_sp():
    _import_deepspeed()  # the accelerator set before deepspeed is imported
    from deepspeed.runtime.sequence_parallel import ulysses_sp
    return ulysses_sp


class _ThreadGroups(dict):
    """ALST's name -> group registry, answered from the calling thread's own torch registry."""

    def __getitem__(self, name):
        from torch.distributed import distributed_c10d as c10d
        return c10d._resolve_process_group(name)


def _route_groups_per_thread():
    import deepspeed.sequence.layer as layer
    with _LOCK:
        if not isinstance(layer._all_to_all_groups, _ThreadGroups):
            layer._all_to_all_groups = _ThreadGroups()


def _hf_attention(attn_impl: str):
    """The attention function the table holds for ``attn_impl`` outside ALST steps."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    with _LOCK:
        routed = _ACTIVE.get(attn_impl)
        if routed is not None:
            return routed[1] or type(ALL_ATTENTION_FUNCTIONS)._global_mapping[attn_impl]
        if attn_impl not in ALL_ATTENTION_FUNCTIONS:
            raise DeepSpeedRefused(f"alst refused: {attn_impl!r} is not a valid attn_implementation")
        return ALL_ATTENTION_FUNCTIONS[attn_impl]


def _dispatcher(own):
    def dispatch(module, query, key, value, attention_mask, *args, **kwargs):
        wrapper = getattr(_LOCAL, "wrapper", None)
        return (wrapper or own)(module, query, key, value, attention_mask, *args, **kwargs)
    return dispatch


@contextlib.contextmanager
def _routed(attn_impl: str, wrapper):
    """HF's attention table entry ``attn_impl`` runs ``wrapper`` on this thread during the block;
    other threads (and everything after the last step) get HF's own function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    local = ALL_ATTENTION_FUNCTIONS._local_mapping  # where item assignment writes
    with _LOCK:
        if attn_impl not in _ACTIVE:
            _ACTIVE[attn_impl] = [0, local.get(attn_impl)]
            ALL_ATTENTION_FUNCTIONS[attn_impl] = _dispatcher(ALL_ATTENTION_FUNCTIONS[attn_impl])
        _ACTIVE[attn_impl][0] += 1
    _LOCAL.wrapper = wrapper
    try:
        yield
    finally:
        _LOCAL.wrapper = None
        with _LOCK:
            _ACTIVE[attn_impl][0] -= 1
            if _ACTIVE[attn_impl][0] == 0:
                replaced = _ACTIVE.pop(attn_impl)[1]
                if replaced is None:
                    del local[attn_impl]
                else:
                    local[attn_impl] = replaced


def _attention(model, group):
    """``attn_impl`` and ``wrapper(batch_size)``: ``UlyssesSPAttentionHF`` as
    ``register_with_transformers`` builds it for that micro batch size, on ``group``, behind its
    wrapper (tensor masks dropped); or a refusal with ALST's own message."""
    ulysses_sp = _ulysses_sp()
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise DeepSpeedRefused("alst refused: ALST wraps HF transformers models (it reads model.config); "
                          f"got a {type(model).__name__}")
    from transformers.loss.loss_utils import ForCausalLMLoss
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        raise DeepSpeedRefused(f"alst refused: ALST shifts labels for a causal LM loss; {type(model).__name__}'s loss is "
                          f"{getattr(model, 'loss_type', None) or 'not a causal LM loss'}")
    attn_impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if attn_impl in ("eager", "paged|eager"):
        raise DeepSpeedRefused(f"alst refused: {attn_impl} attn_implementation isn't currently supported by Ulysses "
                          "sequence parallelism (it needs a 4D attention_mask)")
    text = config.get_text_config()
    core = _hf_attention(attn_impl)
    built = {}

    def wrapper(batch_size):
        if batch_size not in built:
            try:
                uattn = ulysses_sp.UlyssesSPAttentionHF(
                    attn=core, batch_size=batch_size, attn_head_count=text.num_attention_heads,
                    attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                    kv_head_count=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
                    num_hidden_layers=text.num_hidden_layers, process_group=group, seq_length_is_variable=True)
            except ValueError as exc:  # its deliberate checks (head counts against P)
                raise DeepSpeedRefused(f"alst refused: {exc}") from None
            uattn.core_attn_implementation = attn_impl

            def masks_dropped(module, query, key, value, attention_mask, *args, **kwargs):
                return uattn(module, query, key, value, None, *args, **kwargs)
            built[batch_size] = masks_dropped
        return built[batch_size]
    wrapper(1)  # its head-count checks refuse at prepare time, as registration does
    return attn_impl, wrapper


def _shard(batch, rank, world):
    """What ``UlyssesSPDataLoaderAdapter`` hands rank ``rank`` for this batch."""
    batch = dict(batch)
    ids = batch.get("input_ids")
    if ids is None or batch.get("labels") is None:
        raise DeepSpeedRefused(f"alst refused: ALST needs input_ids and labels (the batch has {sorted(batch)})")
    seq_len = ids.shape[1]
    if seq_len % world:
        raise DeepSpeedRefused(f"alst refused: batch's seqlen={seq_len} isn't divisible by sp-size={world}")
    if batch.get("position_ids") is None:
        batch["position_ids"] = torch.arange(seq_len, device=ids.device).expand(ids.shape[0], seq_len)
    labels = torch.nn.functional.pad(batch.pop("labels"), (0, 1), value=-100)
    batch["shift_labels"] = labels[..., 1:].contiguous()
    chunk = seq_len // world
    for name, value in batch.items():
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == seq_len:
            batch[name] = value[:, chunk * rank:chunk * (rank + 1)].contiguous()  # its .cpu() copy
    return batch


def _weighted_loss(local_loss, shift_labels, group):
    """ALST's loss: each rank's mean weighted by its count of real targets, summed over ranks."""
    from torch.distributed.nn.functional import all_gather
    world = dist.get_world_size(group)
    losses = all_gather(local_loss, group=group)
    counts = all_gather((shift_labels != -100).sum(), group=group)
    total = sum(losses[r] * counts[r] for r in range(world))
    loss = total / sum(counts)
    return loss.detach() + (loss - loss.detach()) / world  # the engine's mean over the SP group


def alst_impl(model, group):
    from autosp.deepspeed import _install_comm_backend
    _install_comm_backend()  # deepspeed.comm over the simulator's world (no shm op build)
    if dist.get_backend(group) in ("threaded", "fake"):
        _route_groups_per_thread()
    attn_impl, wrapper = _attention(model, group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)

    def step(**batch):
        shard = _shard(batch, rank, world)
        shift_labels = shard.pop("shift_labels")
        with _routed(attn_impl, wrapper(batch["input_ids"].shape[0])):
            out = model(**shard)
        local = model.loss_function(logits=out.logits, labels=None, shift_labels=shift_labels,
                                    vocab_size=model.config.get_text_config().vocab_size)
        return {"loss": _weighted_loss(local, shift_labels, group), "logits": out.logits}
    return step
