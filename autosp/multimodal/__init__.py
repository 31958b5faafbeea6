"""Module-level sequence parallelism for vision-language models (DeepSpeed-compatible names).

``auto_wrap_model_for_sp(model, group)`` shards every vision and language attention layer along
the sequence in place (see ``wrap.py``); ``detect_model_sp_info`` says what it would wrap.
"""
from autosp.multimodal.detect import (
                                      SPModelInfo,
                                      detect_model_sp_info,
                                      register_attention,
                                      register_projector,
)
from autosp.multimodal.ulysses import UlyssesSPViTAttention
from autosp.multimodal.wrap import (
                                      auto_wrap_model_for_sp,
                                      register_block_adapter,
                                      sp_info,
                                      unwrap_model_for_sp,
)

__all__ = ["SPModelInfo", "UlyssesSPViTAttention", "auto_wrap_model_for_sp",
           "detect_model_sp_info", "register_attention", "register_block_adapter", "register_projector",
           "sp_info", "unwrap_model_for_sp"]
