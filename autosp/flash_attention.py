"""``autosp::cpu_flash_attention``: torch's CPU flash-attention kernel, its output held once.

Torch's own attention saves its output for the backward, which reads it only for
D = rowsum(dO * O). After Ulysses' all-to-all the output also lives sequence-sharded as the output
projection's input, so it would be held twice. This op saves q, k, v and the log-sum-exp only, and
takes D as the gradient of its log-sum-exp from ``autosp::attention_to_seq`` (the all-to-all it is
always handed to: ``autosp.collectives.ops``). Torch's backward kernel is then given a stand-in
output O' = dO * D / rowsum(dO * dO), for which rowsum(dO * O') = D (to a rounding), the one thing
it reads the output for. Same kernels forward and backward as ``scaled_dot_product_attention``
on CPU; no dropout, no mask (those keep torch's attention or ``autosp::masked_attention``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from autosp.errors import AutoSPError

FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
FLASH_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def runs(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether this op can run attention of these q, k, v (real or fake tensors)."""
    return (q.device.type == "cpu" and q.dtype in DTYPES and q.dim() == k.dim() == v.dim() == 4
            and q.shape[-1] == k.shape[-1] == v.shape[-1])


@torch.library.custom_op("autosp::cpu_flash_attention", mutates_args=())
def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float | None) -> tuple[Tensor, Tensor]:
    """(output [B, H, S, Dv], log-sum-exp [B, H, S]) of ``scaled_dot_product_attention(q, k, v,
    is_causal=is_causal, scale=scale)``; k and v may have fewer heads than q (grouped)."""
    out, lse = FLASH(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse


@cpu_flash_attention.register_fake
def _(q, k, v, is_causal, scale):
    return FLASH(q, k, v, 0.0, is_causal, scale=scale)


def standin_output(grad: Tensor, delta: Tensor) -> Tensor:
    """O' with rowsum(grad * O') == delta (rows where grad is zero: zeros, and delta is 0 there)."""
    g = grad.to(delta.dtype)
    norm = (g * g).sum(-1)
    coeff = torch.where(norm > 0, delta / torch.where(norm > 0, norm, 1), 0)
    return (g * coeff.unsqueeze(-1)).to(grad.dtype)


def _setup(ctx, inputs, output):
    q, k, v, ctx.is_causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, output[1])


@torch.library.custom_op("autosp::cpu_flash_attention_backward", mutates_args=())
def cpu_flash_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, lse: Tensor, delta: Tensor,
                                 is_causal: bool, scale: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) from torch's backward kernel, handed the stand-in output. One op, so that a
    compiled backward traces one node here, as it does for torch's attention, not each of the
    stand-in's ops."""
    return FLASH_BACKWARD(grad, q, k, v, standin_output(grad, delta), lse, 0.0, is_causal, scale=scale)


@cpu_flash_attention_backward.register_fake
def _(grad, q, k, v, lse, delta, is_causal, scale):
    return FLASH_BACKWARD(grad, q, k, v, grad, lse, 0.0, is_causal, scale=scale)  # shapes only: grad as the output


def _backward(ctx, grad, delta):
    if delta is None:
        raise AutoSPError("autosp::cpu_flash_attention: no rowsum(dO * O) arrived as its log-sum-exp's "
                          "gradient; its output must go to autosp::attention_to_seq")
    q, k, v, lse = ctx.saved_tensors
    dq, dk, dv = cpu_flash_attention_backward(grad, q, k, v, lse, delta, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None


cpu_flash_attention.register_autograd(_backward, setup_context=_setup)
