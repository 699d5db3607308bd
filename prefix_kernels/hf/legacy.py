"""Families whose attention modules compute eager attention by hand instead of calling
transformers' AttentionInterface, but whose models build their masks through ``masking_utils``
(so the mask function we register still sees, and checks, every mask term).

A family listed here whose installed modeling code calls the AttentionInterface after all (Falcon
from transformers 5.25) goes the normal path, decided from the code (a feature, not a version);
its configurations the kernel lacks stay refused either way.

For these, the attention modules' ``forward`` is replaced, on the instances only, by one that
computes the module's own queries, keys and values (its projections, rotary embedding and cache
update, exactly as the original) and hands them to the prefix_kernels attention function. The
families are listed by model type with the module classes that change; each is checked by the
architecture sweep (tests/hf_sweep.py) against PEFT or an independent reference. Anything else
that does not route attention through the AttentionInterface stays refused.

Two shapes of module are covered:

- BERT-style self-attention (``query`` / ``key`` / ``value`` projections, scores scaled by
  1/sqrt(head size), RoFormer's sinusoidal rotary on queries and keys -- and values where the
  config says so): MegatronBERT, RemBERT, BigBird (full attention only), RoFormer;
- BART-style attention (``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj``, the query scaled
  by ``module.scaling``): XGLM, TrOCR, MVP (without its own prompts: ``use_prompt`` is refused);
- and two of their own: GPT-Neo (unscaled scores; its "local" layers add a causal window of
  ``config.window_size`` keys inside the module, which becomes the kernel's ``sliding_window``;
  its modules call their index ``layer_id``) and GPT-NeoX-Japanese (fused QKV, partial rotary,
  the output bias returned apart), Falcon with rotary positions (its three QKV layouts, split by the
  module's ``_split_heads``; ALiBi refused).

Cross-attention (a decoder given encoder states) is refused at the call, naming the module: these
models are served as causal LMs.
"""

from __future__ import annotations

import functools
import types

import torch
from torch import nn

from prefix_kernels.hf import compat, internals

# model type -> the attention module classes whose forward changes, and how
_BERT, _BART, _GPT_NEO, _NEOX_JAPANESE, _FALCON = "bert", "bart", "gpt_neo", "gpt_neox_japanese", "falcon"
FAMILIES: dict[str, dict[str, str]] = {
    "falcon": {"FalconAttention": _FALCON},
    "gpt_neo": {"GPTNeoSelfAttention": _GPT_NEO},
    "gpt_neox_japanese": {"GPTNeoXJapaneseAttention": _NEOX_JAPANESE},
    "megatron-bert": {"MegatronBertSelfAttention": _BERT},
    "rembert": {"RemBertSelfAttention": _BERT},
    "big_bird": {"BigBirdSelfAttention": _BERT},
    "roformer": {"RoFormerSelfAttention": _BERT},
    "xglm": {"XGLMAttention": _BART},
    "mvp": {"MvpAttention": _BART},
    "trocr": {"TrOCRAttention": _BART},
}


# families that compute attention by hand with a term the kernel lacks (or have none): refused naming it
REFUSED = {
    "bloom": "ALiBi (a linear position bias added to the attention scores) is not implemented by the kernel",
    "mpt": "its hand-written attention (ALiBi, a linear position bias on the scores, by default) is not served",
    "cpmant": "a learned relative position bias added to the attention scores is not implemented by the kernel",
    "xlnet": "two-stream relative attention with segment terms is not implemented by the kernel",
    "reformer": "LSH / chunked local attention is not implemented by the kernel",
    "prophetnet": "n-stream self-attention with relative position buckets is not implemented by the kernel",
    "rwkv": "it has no attention (a recurrent time mix), so there is no attention to add a prefix to",
}


def supported(model: nn.Module) -> bool:
    """Whether ``model``'s attention is served through :func:`install` (a listed family whose installed
    modeling code computes attention by hand; one whose code calls the AttentionInterface goes the
    normal path); raises ``NotImplementedError`` for a listed family in a configuration the kernel
    does not cover, whichever path its modeling code takes."""
    model_type = model.config.model_type
    if model_type in REFUSED:
        raise NotImplementedError(f"model type {model_type!r} ({type(model).__name__}): {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        return False
    _refuse_configuration(model)
    if internals.routes_attention_through_interface(type(model)):
        return False
    if model_type == "falcon":
        attention = next((type(m) for m in modules(model)), None)
        if attention is not None and not internals.falcon_splits_heads(attention):
            import transformers

            raise NotImplementedError(
                f"model type {model_type!r} ({type(model).__name__}): {attention.__name__} has no _split_heads in this "
                f"transformers ({transformers.__version__}) and does not route attention through transformers' "
                "AttentionInterface, so prefix_kernels can neither replace its attention function nor compute its "
                "queries, keys and values as the module does")
    return True


def _refuse_configuration(model: nn.Module) -> None:
    """Configurations of a listed family with an attention term the kernel lacks (refused whether the
    module computes attention by hand or calls the interface: in the latter, Falcon's ALiBi reaches
    attention added to the mask)."""
    model_type = model.config.model_type
    attention_type = getattr(model.config, "attention_type", None)
    if model_type == "big_bird" and attention_type != "original_full":
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}): attention_type={attention_type!r} (BigBird's block-"
            "sparse attention) is not implemented by the prefix_kernels kernel; load the model with "
            "attention_type='original_full'")
    if model_type == "falcon" and getattr(model.config, "alibi", False):
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}): alibi=True (ALiBi, a linear position bias added to "
            "the attention scores) is not implemented by the prefix_kernels kernel")
    if model_type == "mvp" and getattr(model.config, "use_prompt", False):
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}): use_prompt=True (MVP's own per-layer prompts, "
            "concatenated to the keys/values inside its attention) is not served by prefix_kernels; load it with "
            "use_prompt=False")


def modules(model: nn.Module) -> list[nn.Module]:
    classes = FAMILIES.get(model.config.model_type, {})
    return [m for m in model.modules() if type(m).__name__ in classes]


def install(model: nn.Module, implementation: str) -> None:
    """Routes ``model``'s attention to ``implementation``: one of prefix_kernels' (the run's attention
    function, or the probe's) puts our forward on every attention module of the family, calling that
    function; anything else gives the modules their own forward back."""
    from prefix_kernels.hf.attention import ATTN_IMPLEMENTATION, prefix_tuned_attention
    from prefix_kernels.hf.probe import PROBE_IMPLEMENTATION, probe_attention

    attention = {ATTN_IMPLEMENTATION: prefix_tuned_attention, PROBE_IMPLEMENTATION: probe_attention}
    kinds = FAMILIES[model.config.model_type]
    for module in modules(model):
        if implementation in attention:
            forward = functools.partial(_FORWARDS[kinds[type(module).__name__]], attention=attention[implementation])
            module.forward = types.MethodType(forward, module)
        else:
            module.__dict__.pop("forward", None)
    internals.set_attn_implementation_field(model.config, implementation)


# ---- the forwards ------------------------------------------------------------------------------

# keyword arguments prefix_kernels' hooks hand an attention module for its attention function
_OURS = ("prefix_kv", "prefix_slot")


def _arguments(module, args, kwargs) -> tuple[dict, dict]:
    """The original forward's named arguments and its ``**kwargs`` (with prefix_kernels' own), bound
    as the original would."""
    ours = {name: kwargs.pop(name) for name in _OURS if name in kwargs}
    bound = internals.forward_signature(type(module)).bind(module, *args, **kwargs).arguments
    extra = {**bound.pop("kwargs", {}), **ours}
    bound.pop("self", None)
    # the cache under either name: a named parameter of older modules, or caught by **kwargs
    bound["cache"] = compat.passed_cache({**extra, **bound})
    bound.pop("past_key_values", None)
    extra.pop("past_key_values", None)
    return bound, extra


def _refuse_cross(module, states) -> None:
    if states is not None:
        model_type = getattr(getattr(module, "config", None), "model_type", None) or "?"
        raise NotImplementedError(f"prefix_kernels attention ({model_type}, {type(module).__name__}): cross-attention "
                                  "to encoder states is not served for this family (it is served as a causal LM)")


def _update_cache(cache, key, value, layer: int):
    if cache is None:
        return key, value
    from transformers.cache_utils import EncoderDecoderCache

    layer_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    return layer_cache.update(key, value, layer)


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _attend(module, attention, query, key, value, attention_mask, scaling, dropout, extra) -> torch.Tensor:
    out, _ = attention(module, query, key, value, attention_mask, scaling=scaling,
                       dropout=dropout if module.training else 0.0, **extra)
    return out.flatten(2)  # [B, N, H * Dv]


def _bert_forward(self, *args, attention, **kwargs):
    a, extra = _arguments(self, args, kwargs)
    _refuse_cross(self, a.get("encoder_hidden_states"))
    hidden = a["hidden_states"]
    d = self.attention_head_size
    query, key, value = (_heads(proj(hidden), d) for proj in (self.query, self.key, self.value))
    rotary = a.get("sinusoidal_pos")
    if rotary is not None:  # RoFormer
        if getattr(self, "rotary_value", False):
            query, key, value = self.apply_rotary_position_embeddings(rotary, query, key, value)
        else:
            query, key = self.apply_rotary_position_embeddings(rotary, query, key)
    key, value = _update_cache(a.get("cache"), key, value, self.layer_idx)
    out = _attend(self, attention, query, key, value, a.get("attention_mask"), d ** -0.5, self.dropout.p, extra)
    return out, None


def _bart_forward(self, *args, attention, **kwargs):
    a, extra = _arguments(self, args, kwargs)
    _refuse_cross(self, a.get("key_value_states"))
    hidden = a["hidden_states"]
    query = _heads(self.q_proj(hidden) * self.scaling, self.head_dim)
    key, value = _heads(self.k_proj(hidden), self.head_dim), _heads(self.v_proj(hidden), self.head_dim)
    key, value = _update_cache(a.get("cache"), key, value, self.layer_idx)
    out = _attend(self, attention, query, key, value, a.get("attention_mask"), 1.0, self.dropout, extra)
    return self.out_proj(out), None


def _gpt_neo_forward(self, *args, attention, **kwargs):
    a, extra = _arguments(self, args, kwargs)
    hidden = a["hidden_states"]
    query, key, value = (_heads(proj(hidden), self.head_dim) for proj in (self.q_proj, self.k_proj, self.v_proj))
    key, value = _update_cache(a.get("layer_past"), key, value, self.layer_id)
    # the module's index is layer_id; its "local" layers add a causal window of config.window_size keys
    extra = {**extra, "prefix_slot": self.layer_id}
    if self.attention_type == "local":
        extra["own_window"] = self.config.window_size
    out = _attend(self, attention, query, key, value, a.get("attention_mask"), 1.0, self.attn_dropout.p, extra)
    return self.resid_dropout(self.out_proj(out)), None


def _neox_japanese_forward(self, *args, attention, **kwargs):
    a, extra = _arguments(self, args, kwargs)
    hidden = a["hidden_states"]
    d, r = self.head_size, self.rotary_ndims
    qkv = self.query_key_value(hidden).view(*hidden.shape[:-1], self.num_attention_heads, 3 * d).transpose(1, 2)
    query, key, value = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    cos, sin = a["position_embeddings"]
    rotate = internals.modeling_function(self, "apply_rotary_pos_emb")
    query_rot, key_rot = rotate(query[..., :r], key[..., :r], cos, sin)
    query, key = torch.cat((query_rot, query[..., r:]), -1), torch.cat((key_rot, key[..., r:]), -1)
    key, value = _update_cache(a.get("layer_past"), key, value, self.layer_idx)
    out = _attend(self, attention, query, key, value, a.get("attention_mask"), 1.0 / self.norm_factor,
                  self.attention_dropout.p, extra)
    return self.dense(out), None, self.dense_bias


def _falcon_forward(self, *args, attention, **kwargs):
    a, extra = _arguments(self, args, kwargs)
    hidden = a["hidden_states"]
    b, n = hidden.shape[:2]
    kv_heads = self.num_heads if self.new_decoder_architecture else self.num_kv_heads
    query, key, value = self._split_heads(self.query_key_value(hidden))  # [B, N, heads, D] each
    query = query.transpose(1, 2).reshape(b, self.num_heads, n, self.head_dim)
    key, value = (x.transpose(1, 2).reshape(b, kv_heads, n, self.head_dim) for x in (key, value))
    cos, sin = a["position_embeddings"]
    query, key = internals.modeling_function(self, "apply_rotary_pos_emb")(query, key, cos, sin)
    key, value = _update_cache(a.get("layer_past"), key, value, self.layer_idx)
    out = _attend(self, attention, query, key, value, a.get("attention_mask"), self.head_dim ** -0.5,
                  self.attention_dropout.p, extra)
    return self.dense(out), None


_FORWARDS = {_BERT: _bert_forward, _BART: _bart_forward, _GPT_NEO: _gpt_neo_forward,
             _NEOX_JAPANESE: _neox_japanese_forward, _FALCON: _falcon_forward}
