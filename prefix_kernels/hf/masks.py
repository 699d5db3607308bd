"""What a transformers mask means, in the kernel's terms, and the mask function we register.

transformers (5.x) builds every attention mask through ``ALL_MASK_ATTENTION_FUNCTIONS``, handing
the mask function a ``mask_function(batch, head, q_idx, kv_idx) -> bool`` composed from a few
building blocks in ``transformers.masking_utils`` (causal, bidirectional, sliding-window and
chunked overlays, packed sequences, ``and_masks`` / ``or_masks``). :func:`mask_semantics` reads
that composition (the closures themselves, recognised by their code objects through
:mod:`prefix_kernels.hf.internals`; no tensor work) and maps it onto the kernel's
arguments: ``causal`` and ``sliding_window``. A term the kernel cannot express (chunked attention,
packed sequences, bidirectional blocks, an unknown function) raises ``NotImplementedError`` naming
the model type and the term: a mask term is never dropped silently.

Our mask function returns only the padding, as a ``[B, 1, 1, kv_length]`` bool tensor (True =
attend; 4-D so that models which slice ``mask[:, :, :, :M]`` keep working), or ``None``: the kernel
applies causality and the window itself. Which semantics each attention layer has is found once,
when a model is wrapped, by the probe's mask function (:mod:`prefix_kernels.hf.probe`), which
records each mask built through :func:`padding_and_semantics` and matches the mask objects the
layers receive with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefix_kernels.hf import internals


@dataclass(frozen=True)
class MaskSemantics:
    """Key j is visible from query i (positions) iff ``i - lower <= j <= i + upper``; None = unbounded."""

    lower: int | None = None
    upper: int | None = None

    def intersect(self, other: MaskSemantics) -> MaskSemantics:
        def tighter(a, b):
            return b if a is None else a if b is None else min(a, b)

        return MaskSemantics(tighter(self.lower, other.lower), tighter(self.upper, other.upper))

    def kernel_arguments(self, model_type: str) -> tuple[bool, int | None]:
        """(causal, sliding_window) for :func:`prefix_kernels.prefix_attention`."""
        if self.upper == 0:
            return True, None if self.lower is None else self.lower + 1
        if self.upper is None and self.lower is None:
            return False, None
        if self.upper is not None and self.upper == self.lower:
            return False, self.upper + 1
        raise NotImplementedError(f"model type {model_type!r}: an attention mask with keys from i - {self.lower} to "
                                  f"i + {self.upper} (neither causal nor a symmetric window) is not implemented")


CAUSAL = MaskSemantics(upper=0)
BIDIRECTIONAL = MaskSemantics()


def mask_semantics(mask_function, model_type: str) -> MaskSemantics:
    """The kernel semantics of a transformers ``mask_function``; raises NotImplementedError for a
    term the kernel cannot express."""
    kind = internals.mask_blocks().get(internals.function_code(mask_function))
    if kind is None:
        name = getattr(mask_function, "__qualname__", type(mask_function).__name__)
        raise NotImplementedError(f"model type {model_type!r}: its attention mask uses {name}, a mask function "
                                  "prefix_kernels does not know, so it cannot map it onto the kernel")
    cells = internals.closure_cells(mask_function)
    if kind == "causal":
        return CAUSAL
    if kind == "bidirectional":
        return BIDIRECTIONAL
    if kind == "sliding_window":
        return MaskSemantics(lower=int(cells["sliding_window"]) - 1)
    if kind == "sliding_window_bidirectional":
        w = int(cells["sliding_window"])
        return MaskSemantics(lower=w, upper=w)
    if kind in ("and", "or"):
        functions = cells["mask_functions"]
        if kind == "or":  # a bidirectional-block overlay over text only (every block id -1) adds nothing
            functions = [f for f in functions if not _empty_block_overlay(f)]
        parts = [mask_semantics(f, model_type) for f in functions]
        if kind == "and":
            out = BIDIRECTIONAL
            for part in parts:
                out = out.intersect(part)
            return out
        if BIDIRECTIONAL in parts:
            return BIDIRECTIONAL
        if all(part == parts[0] for part in parts):
            return parts[0]
        raise NotImplementedError(f"model type {model_type!r}: a union of different attention masks ({parts}) "
                                  "is not implemented")
    if kind == "chunked attention":
        kind = f"chunked attention (chunk size {cells.get('chunk_size')})"
    raise NotImplementedError(f"model type {model_type!r}: its attention mask uses {kind}, which the prefix_kernels "
                              "kernel does not implement")


def _empty_block_overlay(mask_function) -> bool:
    """Whether ``mask_function`` is transformers' ``blockwise_overlay`` with no block (all ids < 0: text
    only), which unmasks nothing. Reads the ids (one host sync; only multimodal models build it)."""
    if internals.mask_blocks().get(internals.function_code(mask_function), "").startswith("bidirectional blocks"):
        ids = internals.closure_cells(mask_function).get("block_sequence_ids")
        return isinstance(ids, torch.Tensor) and not bool((ids >= 0).any())
    return False


class MaskRegistry:
    """While a model is probed: the masks built by :func:`padding_mask`, by object, with their semantics."""

    def __init__(self):
        self.masks: dict[int, tuple[torch.Tensor, MaskSemantics]] = {}

    def add(self, mask: torch.Tensor, semantics: MaskSemantics) -> torch.Tensor:
        self.masks[id(mask)] = (mask, semantics)  # the tensor is kept alive, so its id stays unique
        return mask

    def semantics_of(self, mask) -> MaskSemantics | None:
        entry = self.masks.get(id(mask))
        return entry[1] if entry is not None and entry[0] is mask else None


def padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, config=None, **kwargs):
    """transformers mask interface: the padding mask [B, 1, 1, kv_length] (True = attend), or None;
    checks that the kernel can express ``mask_function`` and that queries and keys are aligned
    at the end (the kernel's convention: a dynamic cache, not a static one)."""
    return padding_and_semantics(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, config)[0]


def padding_and_semantics(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                          config) -> tuple[torch.Tensor | None, MaskSemantics]:
    """What :func:`padding_mask` returns, and the semantics of ``mask_function`` (the probe's mask
    function, :func:`prefix_kernels.hf.probe.probe_padding_mask`, records them)."""
    model_type = getattr(config, "model_type", "?")
    if mask_function is not None and not torch.compiler.is_compiling():
        semantics = mask_semantics(mask_function, model_type)
    else:
        semantics = CAUSAL
    if semantics != BIDIRECTIONAL and all(isinstance(x, int) for x in (q_length, kv_length, q_offset, kv_offset)) \
            and q_offset - kv_offset != kv_length - q_length:
        raise NotImplementedError(
            f"model type {model_type!r}: queries at {q_offset}.. and {kv_length} keys from {kv_offset} are not aligned "
            "at the end (a static or pre-allocated cache?): prefix_kernels needs the default dynamic cache")
    if attention_mask is not None:
        if kv_length is not None:
            if attention_mask.shape[-1] < kv_length:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[-1]} positions but attention sees {kv_length} keys "
                    "(a static or pre-allocated cache is not supported with prefix_kernels; use the default dynamic "
                    "cache)")
            attention_mask = attention_mask[:, -kv_length:]
        attention_mask = attention_mask.to(torch.bool)[:, None, None, :]
    return attention_mask, semantics


def key_padding(attention_mask, num_keys: int, module) -> torch.Tensor | None:
    """The [B, M] padding of a mask built by :func:`padding_mask`, or a clear error for any other."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool and attention_mask.shape[-1] == num_keys:
        if attention_mask.dim() == 2:
            return attention_mask
        if attention_mask.dim() == 4 and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1:
            return attention_mask[:, 0, 0]
    model_type = getattr(getattr(module, "config", None), "model_type", "?")
    raise NotImplementedError(
        f"model type {model_type!r} ({type(module).__name__}): its attention received a mask of shape "
        f"{tuple(attention_mask.shape)} and dtype {attention_mask.dtype}, not the [B, 1, 1, {num_keys}] padding mask "
        "prefix_kernels builds: the model changes the mask itself (a bias or a custom mask), which the kernel cannot "
        "apply")


# keyword arguments that change attention scores or probabilities, whatever their shape
_SCORE_TERMS = frozenset({"position_bias", "attention_bias", "attn_bias", "alibi", "head_mask", "layer_head_mask"})


def check_attention_kwargs(kwargs: dict, module) -> None:
    """Refuses a tensor the model hands attention that the kernel would ignore (a relative position
    bias as T5's ``position_bias``, a ``head_mask``, any tensor of 3 or more dims, shaped like scores):
    ignoring it would be a silent wrong answer. Position ids, cache positions and loss counts
    (Trainer's ``num_items_in_batch``) pass."""
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and (value.dim() >= 3 or name in _SCORE_TERMS):
            model_type = getattr(getattr(module, "config", None), "model_type", "?")
            raise NotImplementedError(
                f"model type {model_type!r} ({type(module).__name__}): its attention receives {name!r} (a tensor of "
                f"shape {tuple(value.shape)}, e.g. a position bias added to the scores), which the prefix_kernels "
                "kernel does not apply")
