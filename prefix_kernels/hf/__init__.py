"""Hugging Face transformers integration: prefix tuning of causal LMs through the fused kernel."""

from prefix_kernels.hf.attention import ATTN_IMPLEMENTATION, PrefixKV, padding_mask, prefix_tuned_attention, register
from prefix_kernels.hf.checkpoint import load_peft_adapter, load_prefix, save_peft_adapter, save_prefix
from prefix_kernels.hf.model import PrefixTuningModel, add_prefix_tuning, from_peft_adapter
from prefix_kernels.hf.spec import PrefixSpec, model_geometry

__all__ = [
    "ATTN_IMPLEMENTATION", "PrefixKV", "PrefixSpec", "PrefixTuningModel", "add_prefix_tuning", "from_peft_adapter",
    "load_peft_adapter", "load_prefix", "model_geometry", "padding_mask", "prefix_tuned_attention", "register",
    "save_peft_adapter", "save_prefix",
]
