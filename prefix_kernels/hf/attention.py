"""The transformers side of the op: an attention function and a mask function registered under
``"prefix_kernels"``, and the per-call container that carries the prefixes down to them.

transformers (5.x) routes attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and builds masks through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the same name. Ours:

- the mask function returns the 2-D padding mask [B, M] (True = attend) and never an [N, M] mask:
  the kernel applies causality itself;
- the attention function takes this layer's prefix from the ``prefix_kv`` keyword argument (a
  :class:`PrefixKV`, injected by :class:`~prefix_kernels.hf.model.PrefixTuningModel` into every
  forward call; transformers passes model keyword arguments down to attention) and calls
  :func:`prefix_kernels.prefix_attention` on the sequence/cache keys and the prefix, without a
  concatenation. The cache therefore holds only real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_kernels.functional import prefix_attention

ATTN_IMPLEMENTATION = "prefix_kernels"


@dataclass
class PrefixKV:
    """This forward call's prefixes, all layers: ``keys[l]``/``values[l]`` are [T, Hkv, P, D].

    Deliberately not a tensor: ``generate()`` expands tensor keyword arguments for beams, and must
    leave these alone (``prefix_ids`` [B], which it must expand, travels as its own argument).

    ``prefix_ids_checked``: ``prefix_ids`` passed :func:`prefix_kernels.functional.check_prefix_ids`
    against this bank's T (``PrefixTuningModel.prefix_kv`` checks them once per model forward), so
    the layers skip the range check, a host sync per layer on CUDA.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    prefix_ids: torch.Tensor | None = None
    backend: str = "auto"
    prefix_ids_checked: bool = False

    @classmethod
    def from_table(cls, table: torch.Tensor, num_layers: int, num_kv_heads: int, head_dim: int, **kw) -> PrefixKV:
        """``table`` is PEFT's layout [T, P, L * 2 * Hkv * D] (per token: layer, key/value, head, dim)."""
        t, p = table.shape[:2]
        layers = table.view(t, p, 2 * num_layers, num_kv_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return cls(keys=layers[0::2], values=layers[1::2], **kw)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, Hkv, P, D] each. With T = 1 and no prefix_ids the op shares the prefix across rows
        as it is (no [Hkv, P, D] select, whose backward would cost a zero fill and a copy per layer)."""
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
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
):
    """transformers attention interface: query [B, Hq, N, D], key/value [B, Hkv, M, D] (cache
    included) -> ([B, N, Hq, D], None)."""
    layer_idx = getattr(module, "layer_idx", None)
    if prefix_kv is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {layer_idx}) uses attn_implementation={ATTN_IMPLEMENTATION!r} but "
            "received no prefix: call the PrefixTuningModel that add_prefix_tuning() returned (or its "
            "base_model, which it hooks), not a copy of the model"
        )
    if layer_idx is None:
        raise _unsupported(module, "the attention module has no layer_idx, so its prefix cannot be chosen")
    if dropout:
        raise _unsupported(
            module, f"attention dropout p={dropout} is not implemented by the fused kernel; load the model with "
            "attention dropout 0 (e.g. attn_pdrop=0.0 / attention_dropout=0.0) or call model.eval()"
        )
    if softcap is not None:
        raise _unsupported(module, f"attention logit softcapping ({softcap}) is not implemented")
    if s_aux is not None:
        raise _unsupported(module, "attention sinks (s_aux) are not implemented")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise _unsupported(
            module, f"{key.shape[2]} keys exceed the sliding window of {sliding_window}; sliding-window "
            "attention is not implemented (sequences within the window are fine)"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError(
            f"prefix_kernels attention expects a [B, M] padding mask (from its registered mask function), got "
            f"attention_mask of shape {tuple(attention_mask.shape)}: pass a 2-D attention_mask to the model"
        )
    prefix_k, prefix_v = prefix_kv.layer(layer_idx)
    out = prefix_attention(
        query, key, value, prefix_k.to(query.dtype), prefix_v.to(query.dtype),
        causal=getattr(module, "is_causal", True), scale=scaling,
        key_padding_mask=attention_mask, prefix_ids=prefix_kv.prefix_ids,
        prefix_ids_checked=prefix_kv.prefix_ids_checked, backend=prefix_kv.backend,
    )
    return out.transpose(1, 2), None


def padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, **kwargs):
    """transformers mask interface: the 2-D padding mask [B, kv_length] (True = attend), or None."""
    if attention_mask is None:
        return None
    if kv_length is not None:
        if attention_mask.shape[-1] < kv_length:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but attention sees {kv_length} keys "
                "(a static or pre-allocated cache is not supported with prefix_kernels; use the default dynamic cache)"
            )
        attention_mask = attention_mask[:, -kv_length:]
    return attention_mask.to(torch.bool)


def register() -> None:
    """Registers both functions with transformers under ``"prefix_kernels"`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_tuned_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)
