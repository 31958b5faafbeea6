"""Four pre-norm attention layers in an ``nn.ModuleList``, and code between and after them that
reads their outputs in the ways a model may (``Readers(read)``): the residual stream should stay
sharded from layer to layer, and every outside reader should get the exact full value.

``read``:
- ``"last"``: only the final norm reads the last layer's output;
- ``"metadata"``: between layers, shape, dtype, device, len, requires_grad (no data read);
- ``"recorded"``: every layer's output is kept in a list (as HF's output recorders do); the
  loss also reads layer 1's (as LLaVA's ``vision_feature_layer`` does);
- ``"inplace"``: layer 1's output is scaled in place, and a view of layer 2's written to, before
  the next layer takes it (the next layer must see the modified value);
- ``"no_grad_first"``: layer 1's output is first read under ``no_grad``, then by the loss.
"""
import torch
import torch.nn as nn

from .sequential_vit_model import DIM, Attention  # a ViT's attention, 16 wide, 4 heads

LAYERS = 4


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.attn, self.mlp = nn.LayerNorm(DIM), Attention(), nn.Linear(DIM, DIM)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(x).tanh()


class Readers(nn.Module):
    def __init__(self, read: str):
        super().__init__()
        self.read = read
        self.embed, self.norm = nn.Linear(6, DIM), nn.LayerNorm(DIM)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x):
        x, recorded, extra = self.embed(x), [], 0.0
        for i, layer in enumerate(self.layers):
            x = layer(x)
            recorded.append(x)
            extra = extra + self._between(i, x)
        return {"loss": self.norm(x).square().mean() + extra}

    def _between(self, i, x):
        if self.read == "metadata":
            assert x.shape[-1] == DIM and x.dim() == 3 and len(x) == x.size(0) and x.requires_grad
            assert x.dtype.is_floating_point and x.device.type == "cpu" and x.numel() > 0
        if self.read == "recorded" and i == 1:
            return x[:, 1:].sin().mean()
        if self.read == "inplace" and i == 1:
            x.mul_(0.5)
        if self.read == "inplace" and i == 2:
            x[:, 0] = 0.0
        if self.read == "no_grad_first" and i == 1:
            with torch.no_grad():
                scale = float(x.abs().amax()) + 1.0
            return (x / scale).cos().mean()
        return 0.0


def inputs_fn(batch, seq_len, generator):
    return {"x": torch.randn(batch, seq_len, 6, generator=generator)}
