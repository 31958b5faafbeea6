"""Token-wise modules: a module whose output for each token depends on that token's inputs alone,
whatever it does inside. Mixture-of-experts layers are the case: transformers' experts
(``@use_experts_implementation``: Mixtral, Qwen2/3-MoE, OLMoE, Granite-MoE, ...) sort the tokens
by expert, count them per expert, run each expert on its group (``grouped_mm``) and put them back
in order. Op by op that mixes the sequence (a sort, a histogram, a scatter); as a whole it maps
token t to output t with the same weights for every token.

So the layout analysis does not apply the per-op rules inside such a module: it runs on this
rank's tokens as it would on all of them, every size inside it that carries the sequence is this
rank's (``local_sizes``: ``arange(num_tokens)`` counts this rank's tokens), and only values
carrying the sequence leave it (a count per expert, which differs from rank to rank, may not).
Other modules of this kind are registered by class name: ``autosp.register_token_wise("MyExperts")``.
A module registered wrongly (one that mixes tokens) makes wrong numbers, which the verifier
catches; HF's experts are token-wise by construction (no capacity limit drops a token).
"""
from __future__ import annotations

import torch

from autosp.errors import AutoSPError

REGISTERED: set[str] = set()
RULE, REGION = "token_wise", "autosp_token_wise_module"


def register_token_wise(class_name: str) -> None:
    """Treat every module of this class as token-wise (see the module docstring)."""
    if not isinstance(class_name, str) or not class_name:
        raise AutoSPError(f"register_token_wise takes a class name, got {class_name!r}")
    REGISTERED.add(class_name)


def _is_token_wise(cls) -> bool:
    if not isinstance(cls, type):
        return False
    hf_experts = hasattr(cls, "_apply_gate") and hasattr(cls.forward, "__wrapped__")  # use_experts_implementation
    return hf_experts or cls.__name__ in REGISTERED


def region_of(node) -> str | None:
    """The path of the outermost token-wise module a node was traced in (None: none)."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if _is_token_wise(cls):
            return path
    return None


def check_exits(nodes, dims_of) -> int:
    """Refuse a value of a token-wise module, other than one carrying the sequence, read outside
    it; return how many such modules the graph calls."""
    regions = {}
    for node in nodes:
        if REGION in node.meta:
            regions.setdefault(node.meta[REGION], set()).add(node)
    for path, members in regions.items():
        for node in members:
            outside = [u for u in node.users if u not in members]
            value = node.meta.get("example_value", node.meta.get("val"))
            if outside and isinstance(value, torch.Tensor) and not dims_of(node):
                raise AutoSPError(f"the token-wise module {path} hands {node.name} {tuple(value.shape)} to "
                                  f"{outside[0].name} outside it: a value without the sequence computed from "
                                  f"this rank's tokens only (e.g. a count per expert) differs from rank to rank")
    return len(regions)
