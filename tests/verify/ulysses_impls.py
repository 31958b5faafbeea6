"""A hand-written Ulysses impl of tiny_model.TinyLM (the verifier's known-good target), and
deliberately broken variants the verifier must catch (the negative controls).

Every rank reads its rank from the group at run time, takes its contiguous shard of ids,
positions and (already shifted) labels, runs attention on all positions for its heads via an
autograd all-to-all, and returns a token-weighted global mean loss and its logits shard.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def shift_labels(labels):
    """The model's HF-5 shift (tiny_model.shift_labels); kept here so this file loads by path too."""
    return F.pad(labels, (0, 1), value=-100)[..., 1:]


class SeqNotDivisible(Exception):
    autosp_unsupported = True  # a refusal: the verifier reports "unsupported"


def _a2a(x, group, scatter, gather):
    """[.., scatter dim split over ranks, .., local gather dim] -> gathered along `gather`."""
    send = torch.stack(x.chunk(group.size(), dim=scatter)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # gloo has no list all_to_all
    return torch.cat(recv.unbind(0), dim=gather)


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, scatter, gather):
        ctx.args = (group, scatter, gather)
        return _a2a(x, group, scatter, gather)

    @staticmethod
    def backward(ctx, grad):
        group, scatter, gather = ctx.args
        return _a2a(grad, group, gather, scatter), None, None, None


class SumIdentityBackward(torch.autograd.Function):
    """All-reduce sum forward; identity backward, so each rank's grads carry only its own tokens
    and their sum over ranks is the full gradient."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ulysses_core(q, k, v, group, gather_back=True, gather_dim=1, differentiable=True):
    # [B, N, S/P, D] -> [B, N/P, S, D]: all positions, this rank's heads.
    if differentiable:
        q, k, v = (AllToAll.apply(t, group, 1, 2) for t in (q, k, v))
    else:  # the bug: a plain collective, so no gradient reaches q, k, v through attention
        q, k, v = (_a2a(t.detach(), group, 1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    # gather_dim != 1 is the bug of gathering the heads back along the wrong dim.
    return AllToAll.apply(o, group, 2, gather_dim) if gather_back else o


def make_ulysses(*, gather_back=True, global_loss=True, shift_before_shard=True, gather_dim=1,
                 differentiable=True, local_positions=False, truncate=False):
    def impl(model, group):
        for m in model.modules():
            if hasattr(m, "core"):  # tiny_model.Attention, whichever module object defined it
                m.core = lambda q, k, v: _ulysses_core(q, k, v, group, gather_back, gather_dim, differentiable)

        def step(input_ids, labels, position_ids=None, **_):
            p, rank = group.size(), dist.get_rank(group)  # read at run time, never baked in
            b, s = input_ids.shape
            if s % p and not truncate:  # truncate: the bug of dropping the last S mod P positions
                raise SeqNotDivisible(f"sequence length {s} is not divisible by {p} ranks")
            shard = slice(rank * (s // p), (rank + 1) * (s // p))
            if position_ids is None:
                position_ids = torch.arange(s).unsqueeze(0).expand(b, s)
            if local_positions:  # the bug: positions counted from 0 on every rank's shard
                position_ids = torch.arange(s // p).unsqueeze(0).expand(b, s // p).repeat(1, p)
            if local_positions == "broadcast":  # the same, one row for the batch: [1, S/P] on a rank
                position_ids = torch.arange(s // p).unsqueeze(0).repeat(1, p)
            if local_positions == "flat":  # the same, as a vector: [S/P] on a rank
                position_ids = torch.arange(s // p).repeat(p).unsqueeze(0)
            if shift_before_shard:
                local_labels = shift_labels(labels)[:, shard]
            else:  # the bug: each shard loses the target of its last token
                local_labels = shift_labels(labels[:, shard])
            local_positions_ = position_ids[:, shard]
            if local_positions == "flat":
                local_positions_ = local_positions_[0]
            logits = model(input_ids=input_ids[:, shard], position_ids=local_positions_)["logits"]
            flat = local_labels.flatten()
            if not global_loss:  # the bug: every rank reports the mean over its own tokens
                return {"loss": F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-100), "logits": logits}
            loss_sum = F.cross_entropy(logits.flatten(0, 1), flat, ignore_index=-100, reduction="sum")
            count = (flat != -100).sum().to(loss_sum.dtype)
            dist.all_reduce(count, group=group)
            return {"loss": SumIdentityBackward.apply(loss_sum, group) / count, "logits": logits}

        return step

    return impl


ulysses = make_ulysses()
# Negative controls: each must be reported as a mismatch.
skip_output_a2a = make_ulysses(gather_back=False)  # (1) no all-to-all after attention
per_rank_mean = make_ulysses(global_loss=False)  # (2) loss = this rank's mean
shard_then_shift = make_ulysses(shift_before_shard=False)  # (3) labels sharded before the shift
wrong_gather_dim = make_ulysses(gather_dim=3)  # (4) heads gathered back along the head size
local_positions = make_ulysses(local_positions=True)  # (5) positions from the local length
no_grad_all_to_all = make_ulysses(differentiable=False)  # (6) a non-differentiable all-to-all
broadcast_local_positions = make_ulysses(local_positions="broadcast")  # (5b) [1, S/P] against [B, S]
flat_local_positions = make_ulysses(local_positions="flat")  # (5c) [S/P, H] against [B, S, H]
truncated_tail = make_ulysses(truncate=True)  # (7) S mod P positions dropped: the shards do not add up
