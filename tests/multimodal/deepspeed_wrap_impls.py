"""DeepSpeed's own multimodal AutoSP (``deepspeed.sequence.auto_sp.auto_wrap_model_for_sp``) as an
impl, unchanged: it replaces every recognised ViT attention module by DeepSpeed's
``UlyssesSPViTAttention`` (all-gather, full attention on every rank, slice) in place, and the step
calls the model on the full batch, exactly as DeepSpeed's usage docstring does after wrapping.

``deepspeed.comm`` is pointed at the simulator's torch.distributed world the way
autosp_verify/deepspeed_impl.py does it, not with ``deepspeed.init_distributed`` (which JIT-builds
a g++ op, ~40 s).

``deepspeed_auto_wrap_mask_by_keyword`` is the same wrap with one call-convention shim (the
attention mask, which transformers 5.x passes positionally, handed to DeepSpeed's wrapper by
keyword), so that DeepSpeed's wrapper runs at all and its numbers can be checked.
"""
from autosp_verify.deepspeed_impl import _import_deepspeed, _install_comm_backend

_WRAPPED_CLASS = "UlyssesSPViTAttention"


def _install():
    _import_deepspeed()  # DS_ACCELERATOR=cpu without a GPU
    _install_comm_backend()


def _step(model):
    def step(**batch):
        return model(**batch)
    return step


def deepspeed_auto_wrap(model, group):
    _install()
    from deepspeed.sequence.auto_sp import auto_wrap_model_for_sp
    auto_wrap_model_for_sp(model, process_group=group)
    return _step(model)


def attention_class_names(model):
    """The model's attention module class names (what DeepSpeed's detector matches against)."""
    return sorted({type(m).__name__ for m in model.modules()
                   if type(m).__name__.endswith("Attention") and type(m).__name__ != _WRAPPED_CLASS})


def _accept_positional_mask(wrapper):
    """transformers 5.x's ``ViTLayer`` calls ``self.attention(hidden_states, attention_mask, **kwargs)``
    (the mask positionally); DeepSpeed's ``UlyssesSPViTAttention.forward(hidden_states, **kwargs)``
    has no second positional parameter. Pass the mask on by keyword instead, this instance only."""
    forward = wrapper.forward

    def forward_with_mask(hidden_states, attention_mask=None, **kwargs):
        return forward(hidden_states, attention_mask=attention_mask, **kwargs)
    wrapper.forward = forward_with_mask


def deepspeed_auto_wrap_mask_by_keyword(model, group):
    """DeepSpeed's wrap, then every ``UlyssesSPViTAttention`` it inserted given the mask by keyword
    (see ``_accept_positional_mask``): DeepSpeed's wrapper itself, able to run under HF 5.x."""
    step = deepspeed_auto_wrap(model, group)
    for module in model.modules():
        if type(module).__name__ == _WRAPPED_CLASS:
            _accept_positional_mask(module)
    return step
