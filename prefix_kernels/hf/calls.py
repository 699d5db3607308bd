"""The per-call state of one wrapped model and the hooks that hand it down.

A :class:`CallScope` belongs to one :class:`~prefix_kernels.hf.model.PrefixTuningModel`; nothing of
it is global or written onto transformers' modules, so two wrapped models with different prefixes,
banks or windows run interleaved in one process. Its hooks (installed by
:func:`prefix_kernels.hf.wrapping.install`):

- on the wrapped model, a forward pre-hook builds this call's :class:`~prefix_kernels.hf.attention.PrefixKV`
  and passes it as the ``prefix_kv`` keyword argument (transformers forwards model keyword arguments
  to the attention function), with the shifted positions; a forward hook ends the call;
- on the attention modules of layers that do not forward keyword arguments, a forward pre-hook
  passes the call in progress to the module as ``prefix_kv`` (it forwards its own to attention);
- on an encoder-decoder's encoder, the same pair, for ``generate()``, which runs the encoder alone;
- on position embeddings that count positions from the cache length, the prefix offset.

The calls in progress are a stack (the encoder's call runs inside the model's); ``generate()`` sets
the table and prefix ids of its steps for its duration (:meth:`CallScope.generating`), as
``generate()`` refuses model keyword arguments it does not know.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch

from prefix_kernels.hf import compat, internals, probe
from prefix_kernels.hf.attention import PrefixKV


@dataclass(frozen=True)
class Generation:
    """What every step of one ``generate()`` reads: the prefix table, evaluated and cast once, and the
    prefix ids (checked once, one per input row)."""

    table: torch.Tensor
    prefix_ids: torch.Tensor | None


class CallScope:
    """The calls in progress of one wrapped model, and its hooks; see the module docstring."""

    def __init__(self, wrapper):
        self.wrapper = wrapper
        self.signature = inspect.signature(wrapper.base_model.forward)
        self.calls: list = []  # the prefix_kv of each forward in progress, innermost last
        self.generation: Generation | None = None

    @property
    def current(self) -> PrefixKV | None:
        """The prefixes of the innermost call in progress (None outside a call, and in a probe's)."""
        call = self.calls[-1] if self.calls else None
        return call if isinstance(call, PrefixKV) else None

    @contextlib.contextmanager
    def generating(self, table: torch.Tensor, prefix_ids: torch.Tensor | None):
        """``table`` and ``prefix_ids`` serve the calls inside the ``with`` block (one ``generate()``)."""
        self.generation = Generation(table, prefix_ids)
        try:
            yield
        finally:
            self.generation = None

    def _prefix_kv(self, prefix_ids, dtype, checked: bool) -> PrefixKV:
        table = self.generation.table if self.generation is not None else None
        return self.wrapper.prefix_kv(prefix_ids, dtype=dtype, prefix_ids_checked=checked, table=table)

    # ---- the wrapped model --------------------------------------------------------------------
    def before_call(self, module, args, kwargs):
        self.calls.append(None)  # popped by after_call, which runs whatever happens here
        if "prefix_kv" in kwargs:  # the caller's own (or a probe's): passed on as it is
            self.calls[-1] = kwargs["prefix_kv"]
            return None
        kwargs = self._bind(args, kwargs)
        ref = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds",
                                        "labels", "input_features") if kwargs.get(k) is not None), None)
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds (or input_features to an audio encoder-decoder)")
        batch, length = ref.shape[:2]
        batch //= probe.codebook_rows(module.config)  # MusicGen: [B * codebooks, L] ids, B rows attend
        prefix_ids, checked = self._prefix_ids(kwargs.pop("prefix_ids", None), batch, ref.device)
        embeds = kwargs.get("inputs_embeds")
        dtype = embeds.dtype if embeds is not None else module.dtype
        kwargs["prefix_kv"] = self.calls[-1] = self._prefix_kv(prefix_ids, dtype, checked)
        if not self.wrapper.plan.position_modules:
            kwargs["position_ids"] = self._positions(kwargs, batch, length, ref.device)
        return (), kwargs

    def _bind(self, args, kwargs) -> dict:
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        # a None the forward does not name (input_ids=None to Whisper, which takes input_features) is not passed on
        extra = {k: v for k, v in bound.pop("kwargs", {}).items() if v is not None}
        return {**bound, **extra}

    def _prefix_ids(self, prefix_ids, batch: int, device) -> tuple[torch.Tensor | None, bool]:
        """This call's prefix ids [B] and whether they are range-checked already (by generate())."""
        checked = False
        if prefix_ids is None and self.generation is not None and self.generation.prefix_ids is not None:
            prefix_ids, checked = self.generation.prefix_ids, True
            if prefix_ids.dim() == 1 and prefix_ids.numel() and batch % prefix_ids.numel() == 0:
                # generate() repeats each row for beams / return sequences: repeat its prefix id alike
                prefix_ids = prefix_ids.repeat_interleave(batch // prefix_ids.numel())
        if prefix_ids is not None:
            prefix_ids = torch.as_tensor(prefix_ids, device=device)
            if prefix_ids.dim() == 0:
                prefix_ids = prefix_ids.expand(batch)
            if prefix_ids.shape != (batch,):
                raise ValueError(f"prefix_ids must be [B={batch}], got shape {tuple(prefix_ids.shape)}")
        return prefix_ids, checked

    def _positions(self, kwargs, batch, length, device) -> torch.Tensor:
        spec = self.wrapper.spec
        offset = spec.num_virtual_tokens if spec.position_offset == "peft" else 0
        pos = kwargs.get("position_ids")
        if pos is None:
            cache = compat.passed_cache(kwargs)
            past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == past + length:
                pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -length:]
            else:
                pos = torch.arange(past, past + length, device=device)[None].expand(batch, -1)
        return pos + offset

    def after_call(self, module, args, output):
        if self.calls:
            self.calls.pop()

    # ---- an encoder-decoder's encoder, run alone by generate() ---------------------------------
    def before_encoder(self, module, args, kwargs):
        self.calls.append(None)
        if self.calls[:-1]:  # inside the model's forward: the same call
            self.calls[-1] = self.calls[-2]
            return None
        ref = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        prefix_ids = self.generation.prefix_ids if self.generation is not None else None
        if prefix_ids is not None and ref is not None and prefix_ids.numel() not in (1, ref.shape[0]):
            raise ValueError(f"prefix_ids must be [B={ref.shape[0]}], got shape {tuple(prefix_ids.shape)}")
        self.calls[-1] = self._prefix_kv(prefix_ids, self.wrapper.base_model.dtype, prefix_ids is not None)
        return None

    # ---- attention modules of layers that do not forward keyword arguments ---------------------
    def hand_over(self, module, args, kwargs):
        call = self.current
        if call is None or kwargs.get("prefix_kv") is not None:
            return None
        return args, {**kwargs, "prefix_kv": call}

    # ---- position embeddings that count from the cache length -----------------------------------
    def position_shift(self, offset: int):
        """A pre-hook adding ``offset`` to the positions of a call with a prefix (not a probe's: the probe
        and the text initialization see the model's own positions)."""

        def shift(module, args, kwargs):
            if self.current is None:
                return None
            bound = internals.forward_signature(type(module)).bind(module, *args, **kwargs)
            arguments = bound.arguments
            if arguments.get("position_ids") is not None:
                arguments["position_ids"] = arguments["position_ids"] + offset
            else:
                name = internals.cache_length_parameter(module)
                arguments[name] = arguments.get(name, 0) + offset
            return bound.args[1:], bound.kwargs

        return shift
