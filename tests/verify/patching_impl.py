"""An impl whose module patches torch at import, as SP libraries that register attention
functions do: here it drops ``is_causal`` from every SDPA call in the process, the reference's
included. Otherwise it is autosp's eager impl (exact against whatever the model computes)."""
import torch.nn.functional as F

from autosp_verify.impls import autosp_impl

_sdpa = F.scaled_dot_product_attention


def _bidirectional(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    return _sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=False, **kwargs)


F.scaled_dot_product_attention = _bidirectional  # the test restores it
patched = autosp_impl("eager")
