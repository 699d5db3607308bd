"""Where a wrapped model's prefixes go: which table layer each attention slot reads (decoder-only,
encoder, encoder-decoder placements), which sub-model's attention is routed (a multimodal
wrapper's text model only), the cache-slot hooks of modules serving several cache slots, and
which position embeddings count positions from the cache length. Used by
:mod:`prefix_kernels.hf.wrapping` and the probe.
"""

from __future__ import annotations

import contextlib
import dataclasses

from torch import nn

from prefix_kernels.hf import internals, legacy

PLACEMENTS = ("paper", "peft")


def place_prefixes(layers: dict, placement: str | None, table_layers: int) -> dict:
    """Which table layer each attention slot reads. Decoder-only and encoder models: its layer_idx
    (PEFT's layout). Encoder-decoder models, slots in call order (encoder self-attention, then per
    decoder layer self- and cross-attention): ``"paper"`` (Li & Liang) gives every one its own
    prefix; ``"peft"`` only the decoder's self-attention, exactly as PEFT 0.21's SEQ_2_SEQ_LM prefix
    tuning: its table has the config's ``table_layers`` layers, and decoder layer d reads layer
    2d mod ``table_layers`` (PEFT concatenates the table with itself and splits it in groups of four
    key/value tensors, self then cross, and then empties the cross-attention cache: half of a PEFT
    seq2seq table is never read)."""
    if placement is None:
        return {slot: dataclasses.replace(layer, table_layer=slot) for slot, layer in layers.items()}
    placed, count = {}, 0
    for slot in sorted(layers):
        layer = layers[slot]
        if placement == "paper":
            placed[slot] = dataclasses.replace(layer, table_layer=count)
            count += 1
        elif layer.role == "decoder":
            placed[slot] = dataclasses.replace(layer, table_layer=(2 * count) % table_layers)
            count += 1
        else:
            placed[slot] = layer
    return placed


def _sub_configs(model) -> dict:
    return {key: sub for key in getattr(model.config, "sub_configs", {})
            if (sub := getattr(model.config, key, None)) is not None}


def set_text_attention(model, implementation) -> None:
    """Routes the text model's attention to ``implementation`` (a name, or what :func:`text_attention`
    returned): the top-level model's and the text sub-model's only -- a vision/audio tower, a depth
    decoder keeps its own. A family of :mod:`prefix_kernels.hf.legacy` gets its attention modules'
    forward replaced (or given back)."""
    if legacy.supported(model):
        legacy.install(model, implementation)
        return
    if isinstance(implementation, dict):
        model.set_attn_implementation(implementation)
        return
    subs = _sub_configs(model)
    if not subs:
        model.set_attn_implementation(implementation)
        return
    text = model.config.get_text_config()
    model.set_attn_implementation({"": implementation, **{key: implementation if sub is text else
                                                           internals.attn_implementation(sub)
                                                           for key, sub in subs.items()}})


def route(model, implementation: str):
    """Routes the text model's attention to ``implementation`` (one of ours) and returns what it was
    routed to before (for :func:`set_text_attention`); a model that does not take it is left as it
    was and refused."""
    previous = text_attention(model)
    set_text_attention(model, implementation)
    if internals.attn_implementation(model.config.get_text_config()) != implementation:
        set_text_attention(model, previous)
        raise NotImplementedError(f"model type {model.config.model_type!r} refused "
                                  f"attn_implementation={implementation!r}")
    return previous


@contextlib.contextmanager
def routed(model, implementation: str):
    """The text model's attention routed to ``implementation``, with :func:`cache_slot_hooks`, for the
    duration of the ``with`` block; both given back after it."""
    previous = route(model, implementation)
    hooks = cache_slot_hooks(model)
    try:
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        set_text_attention(model, previous)


def cache_slot_hooks(model) -> list:
    """Attention modules that serve several cache slots (HRM: one stack of layers run in cycles, the
    slot ``layer_idx + cycle_offset``; Dory's loops, ``layer_idx + cache_offset``) get a forward pre-hook
    that passes this call's slot to their attention function as the ``prefix_slot`` keyword argument
    (these modules forward their keyword arguments to it); the probe and the attention function key
    the prefix by it, so each slot has its own (PEFT's layout: one per cache layer). Two calls on one
    slot (Dory's loops sharing the last loop's cache) stay refused. Returns the hooks' handles."""
    return [module.register_forward_pre_hook(_name_cache_slot, with_kwargs=True) for module in model.modules()
            if internals.cache_slot_offsets(module) and getattr(module, "layer_idx", None) is not None]


def _name_cache_slot(module, args, kwargs):
    offset = next((kwargs[name] for name in internals.CACHE_SLOT_OFFSETS if kwargs.get(name) is not None), 0)
    return args, {**kwargs, "prefix_slot": module.layer_idx + int(offset)}


def text_attention(model):
    """The model's attention implementations, as :func:`set_text_attention` takes them back."""
    subs = _sub_configs(model)
    if not subs:
        return internals.attn_implementation(model.config)
    return {"": internals.attn_implementation(model.config),
            **{key: internals.attn_implementation(sub) for key, sub in subs.items()}}


def cache_length_position_modules(model) -> list[nn.Module]:
    """Embeddings that count positions from the cache length themselves: BART-like decoders,
    Whisper, MusicGen (their models take no position_ids), OPT, BioGPT, XGLM (over the attention
    mask), BERT, and RoBERTa-likes, whose positions start past the padding index and skip padding.
    Our cache holds no prefix, so they get the prefix offset added to the cache length here (the
    argument :func:`~prefix_kernels.hf.internals.cache_length_parameter` names; and to position_ids
    a caller passes) -- positions as PEFT's prefix in the cache gives them, each model
    by its own rule -- and the wrapper passes no position_ids of its own."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        positional = "Positional" in name or name.endswith("Embeddings")
        if positional and internals.counts_positions_from_cache_length(module):
            found.append(module)
    return found
