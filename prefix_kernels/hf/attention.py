"""The transformers side of the op: an attention function and a mask function registered under
``"prefix_kernels"``, and the per-call container that carries the prefixes down to them.

transformers (5.x) routes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and builds masks through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the same name. Ours:

- the mask function (:func:`prefix_kernels.hf.masks.padding_mask`) returns only the padding mask
  and checks that the kernel can express the model's mask (causal, sliding window, ...);
- the attention function takes this layer's prefix from the ``prefix_kv`` keyword argument (a
  :class:`PrefixKV`, injected by :class:`~prefix_kernels.hf.model.PrefixTuningModel` into every
  forward call; transformers passes model keyword arguments down to attention -- for the few
  models whose layers do not, a pre-hook on the attention module passes it as a keyword argument
  there, :mod:`prefix_kernels.hf.calls`) and calls
  :func:`prefix_kernels.prefix_attention` on the sequence/cache keys and the prefix, without a
  concatenation, with the layer's causality and window as found when the model was wrapped
  (:mod:`prefix_kernels.hf.probe`) and its softcap and sinks as the model passes them. The cache
  therefore holds only real tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from torch import nn

from prefix_kernels.functional import prefix_attention
from prefix_kernels.hf import masks, probe
from prefix_kernels.hf.probe import LayerAttention
from prefix_kernels.hf.spec import PrefixSpec

ATTN_IMPLEMENTATION = "prefix_kernels"
padding_mask = masks.padding_mask


@dataclass
class PrefixKV:
    """This forward call's prefixes, all layers: ``keys[l]``/``values[l]`` are [T, Hkv, P, Dk/Dv];
    ``attention[l]`` says what layer l sees (causality, window).

    Deliberately not a tensor: ``generate()`` expands tensor keyword arguments for beams, and must
    leave these alone (``prefix_ids`` [B], which it must expand, travels as its own argument).

    ``slots``: each attention module's slot (the key of ``attention``; a module that serves several
    slots names its slot per call instead, ``prefix_slot``).

    ``prefix_ids_checked``: ``prefix_ids`` passed :func:`prefix_kernels.functional.check_prefix_ids`
    against this bank's T (``PrefixTuningModel.prefix_kv`` checks them once per model forward), so
    the layers skip the range check, a host sync per layer on CUDA.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    prefix_ids: torch.Tensor | None = None
    backend: str = "auto"
    prefix_ids_checked: bool = False
    attention: Mapping[int, LayerAttention] = field(default_factory=dict)
    slots: Mapping[nn.Module, int] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: torch.Tensor, spec: PrefixSpec, **kw) -> PrefixKV:
        """``table`` is [T, P, width] in ``spec``'s layout (PEFT's: per token layer, key/value, head, dim)."""
        t, p = table.shape[:2]
        if spec.peft_layout:
            layers = table.view(t, p, 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim).permute(2, 0, 3, 1, 4)
            layers = layers.unbind(0)
            return cls(keys=layers[0::2], values=layers[1::2], **kw)
        keys, values, offset = [], [], 0
        for hkv, dk, dv in spec.shapes():
            for out, d in ((keys, dk), (values, dv)):
                out.append(table[..., offset:offset + hkv * d].unflatten(-1, (hkv, d)).transpose(1, 2))
                offset += hkv * d
        return cls(keys=tuple(keys), values=tuple(values), **kw)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``idx`` of the table, [T, Hkv, P, D] each. With T = 1 and no prefix_ids the op shares
        the prefix across rows as it is (no [Hkv, P, D] select, whose backward would cost a zero fill
        and a copy per layer)."""
        return self.keys[idx], self.values[idx]


def _unsupported(module, what: str) -> NotImplementedError:
    model_type = getattr(getattr(module, "config", None), "model_type", "?")
    return NotImplementedError(f"prefix_kernels attention ({model_type}, {type(module).__name__}): {what}")


def prefix_tuned_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    prefix_kv: PrefixKV | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    prefix_slot: int | None = None,
    own_window: int | None = None,
    **kwargs,
):
    """transformers attention interface: query [B, Hq, N, Dk], key/value [B, Hkv, M, Dk/Dv] (cache
    included) -> ([B, N, Hq, Dv], None). Everything it knows of the call comes in its arguments:
    ``prefix_kv`` (this call's prefixes, with what each layer sees), ``prefix_slot`` (the slot of a
    module serving several, :func:`prefix_kernels.hf.routing.cache_slot_hooks`). ``sliding_window`` /
    ``is_causal`` / ``own_window`` keyword arguments are not read: the layer's mask, seen when the model
    was wrapped, says what it sees (as for SDPA)."""
    if prefix_kv is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) uses attn_implementation="
            f"{ATTN_IMPLEMENTATION!r} but received no prefix: call the PrefixTuningModel that add_prefix_tuning() "
            "returned (or its base_model, which it hooks), not a copy of the model; with activation checkpointing, "
            "this model's layers do not forward keyword arguments, so recomputation cannot find the prefix"
        )
    if kwargs:
        masks.check_attention_kwargs(kwargs, module)
    slot = prefix_kv.slots.get(module) if prefix_slot is None else prefix_slot
    layer = prefix_kv.attention.get(slot)
    if layer is None:
        raise _unsupported(module, "this attention module did not run when the model was wrapped, so its prefix and "
                                   "mask are unknown")
    if dropout:
        raise _unsupported(
            module, f"attention dropout p={dropout} is not implemented by the fused kernel; load the model with "
            "attention dropout 0 (e.g. attn_pdrop=0.0 / attention_dropout=0.0) or call model.eval()"
        )
    if layer.table_layer is None:  # an encoder-decoder's attention without a prefix in this placement
        prefix_k, prefix_v = key.new_empty(1, key.shape[1], 0, key.shape[3]), value.new_empty(1, key.shape[1], 0,
                                                                                               value.shape[3])
        prefix_ids = None
    else:
        prefix_k, prefix_v = prefix_kv.layer(layer.table_layer)
        if layer.kv_repeat > 1:  # the layer repeats its cache's heads (JetMoE): so does its prefix
            prefix_k, prefix_v = prefix_k.repeat(1, layer.kv_repeat, 1, 1), prefix_v.repeat(1, layer.kv_repeat, 1, 1)
        prefix_ids = prefix_kv.prefix_ids
    out = prefix_attention(
        query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype),
        causal=layer.causal, scale=scaling, key_padding_mask=masks.key_padding(attention_mask, key.shape[2], module),
        prefix_ids=prefix_ids, prefix_ids_checked=prefix_kv.prefix_ids_checked,
        sliding_window=layer.sliding_window, softcap=softcap, sinks=s_aux, backend=prefix_kv.backend,
    )
    return out.transpose(1, 2), None


def register() -> None:
    """Registers the attention and mask functions with transformers under ``"prefix_kernels"``, and the
    probe's under ``"prefix_kernels_probe"`` (:mod:`prefix_kernels.hf.probe`; idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_tuned_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)
    AttentionInterface.register(probe.PROBE_IMPLEMENTATION, probe.probe_attention)
    AttentionMaskInterface.register(probe.PROBE_IMPLEMENTATION, probe.probe_padding_mask)
