"""One forward of a few tokens, when a model is wrapped, that finds what each attention layer takes.

The model's text attention is routed, for that forward only, to the probe's own implementation
(:data:`PROBE_IMPLEMENTATION`: :func:`probe_attention` and :func:`probe_padding_mask`), which runs
the kernel with an empty prefix (P = 0, so the result is the model's own attention). For every
attention call it records, by ``layer_idx``: the kv heads and the key/value head dims (so the
prefix is sized per layer from what the layer really receives, MLA and per-layer geometries
included), the mask semantics (causal / sliding window, matched by object with the masks its
mask function built: the mask is the model's own statement of what each layer sees) and whether
the layer forwarded the model's keyword arguments down to attention. Anything the kernel cannot serve exactly is
refused here, before the model is changed, as a ``NotImplementedError`` naming the model
type and the feature: a module without ``layer_idx``, a layer that runs attention more than once
per forward (modules reused across cache slots, attention split into several calls), a mask the
model built or changed itself, a mask term the kernel lacks. With ``capture=True`` it also keeps
each layer's keys and values (the text initialization of a prefix).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass

import torch

from prefix_kernels.functional import prefix_attention
from prefix_kernels.hf import masks

PROBE_IMPLEMENTATION = "prefix_kernels_probe"


@dataclass(frozen=True)
class LayerAttention:
    """What one attention layer takes (found by :func:`probe_model`). ``role``: "self" (a decoder-only
    or encoder model), or in an encoder-decoder "encoder", "decoder" (self-attention) or "cross";
    ``table_layer``: which layer of the prefix table it reads (None: no prefix here); ``kv_repeat``:
    the layer attends over its cache's kv heads repeated that many times (JetMoE's
    ``keys.repeat(1, top_k, 1, 1)``), so its prefix has the cache's heads (PEFT's layout) and is
    repeated alike."""

    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    causal: bool
    sliding_window: int | None
    forwards_kwargs: bool
    role: str = "self"
    table_layer: int | None = None
    kv_repeat: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.num_kv_heads, self.head_dim, self.head_dim_v


class Probe:
    """The records of one probe forward, filled by :func:`probe_attention` and :func:`probe_padding_mask`."""

    def __init__(self, model_type: str, backend: str, capture: bool = False, roles: dict | None = None):
        self.model_type, self.backend, self.capture = model_type, backend, capture
        # encoder-decoder models: id(module) -> role; their layers are numbered in call order
        # (their layer_idx restarts in each stack), the others by layer_idx
        self.roles = roles
        self.slots: dict[int, int] = {}  # id(module) -> slot
        self.modules: dict[int, torch.nn.Module] = {}  # slot -> module
        self.layers: dict[int, LayerAttention] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.masks = masks.MaskRegistry()
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> the keys/values attention got
        self.output = None  # the probe forward's output

    def refuse(self, module, what: str) -> NotImplementedError:
        return NotImplementedError(f"model type {self.model_type!r} ({type(module).__name__}): {what}")

    def attend(self, module, query, key, value, attention_mask, scaling, softcap, s_aux, prefix_kv, prefix_slot,
               own_window, kwargs):
        slot = getattr(module, "layer_idx", None) if self.roles is None else len(self.slots)
        if prefix_slot is not None:  # a module serving several cache slots (HRM), or one naming its index itself
            slot = prefix_slot
        if self.roles is None and slot is None:
            raise self.refuse(module, "the attention module has no layer_idx, so its prefix cannot be chosen")
        masks.check_attention_kwargs(kwargs, module)
        if (id(module) in self.slots and prefix_slot is None) or slot in self.layers:
            raise self.refuse(module, f"attention layer {slot} runs more than once per forward (a module reused across "
                                      "cache slots, or attention split into several calls): one prefix per layer "
                                      "cannot be placed")
        if attention_mask is None:  # the model built no mask: its module's flags say what it sees
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
            window = kwargs.get("sliding_window")
        else:
            semantics = self.masks.semantics_of(attention_mask)
            if semantics is None:
                masks.key_padding(attention_mask, key.shape[2], module)  # raises for a mask not of ours
                raise self.refuse(module, "its attention received a mask other than the one built for it (the model "
                                          "sliced or rebuilt it), so what the layer may see is unknown")
            causal, window = semantics.kernel_arguments(self.model_type)
        if own_window is not None:  # a window the module applies itself (hf/legacy.py: GPT-Neo's local layers)
            window = own_window if window is None else min(window, own_window)
        self.slots[id(module)], self.modules[slot] = slot, module
        role = "self" if self.roles is None else self.roles.get(id(module), "decoder")
        self.layers[slot] = LayerAttention(key.shape[1], key.shape[-1], value.shape[-1], causal, window,
                                           forwards_kwargs=prefix_kv is not None, role=role)
        self.seen[slot] = key.detach(), value.detach()
        if self.capture:
            self.keys[slot], self.values[slot] = key.detach(), value.detach()
        empty_k = key.new_empty(1, key.shape[1], 0, key.shape[-1])
        empty_v = value.new_empty(1, value.shape[1], 0, value.shape[-1])
        padding = masks.key_padding(attention_mask, key.shape[2], module)
        out = prefix_attention(query, key, value, empty_k, empty_v, causal=causal, scale=scaling,
                               key_padding_mask=padding, sliding_window=window, softcap=softcap, sinks=s_aux,
                               backend=self.backend)
        return out.transpose(1, 2), None


# The probe in progress. Its attention and mask functions (registered as their own implementation,
# PROBE_IMPLEMENTATION, which a model is routed to for the one probe forward only) find it here:
# transformers calls a mask function with no argument of the caller's, and a layer that does not
# forward the model's keyword arguments would not hand its attention the probe. The value is
# call-scoped, set and reset by :func:`probing` around that one forward, in this thread and context
# only; the attention function that serves a wrapped model never reads it.
_probing: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("prefix_kernels_probe", default=None)


@contextlib.contextmanager
def probing(probe: Probe):
    """Makes ``probe`` the one that :func:`probe_attention` and :func:`probe_padding_mask` record into,
    for the duration of the ``with`` block."""
    token = _probing.set(probe)
    try:
        yield probe
    finally:
        _probing.reset(token)


def _current(what: str) -> Probe:
    probe = _probing.get()
    if probe is None:
        raise RuntimeError(f"the {what} of attn_implementation={PROBE_IMPLEMENTATION!r} runs only inside a probe "
                           "forward (prefix_kernels.hf.probe.probe_model)")
    return probe


def probe_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_kv=None, softcap=None,
                    s_aux=None, prefix_slot=None, own_window=None, **kwargs):
    """transformers attention interface while a model is probed: records what the layer takes and
    computes its attention with an empty prefix. ``prefix_slot``: the layer's slot when the module
    names it (cache slots, :func:`prefix_kernels.hf.routing.cache_slot_hooks`); ``own_window``: a
    window the module applies itself."""
    return _current("attention function").attend(module, query, key, value, attention_mask, scaling, softcap, s_aux,
                                                 prefix_kv, prefix_slot, own_window, kwargs)


def probe_padding_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                       attention_mask=None, config=None, **kwargs):
    """transformers mask interface while a model is probed: :func:`~prefix_kernels.hf.masks.padding_mask`'s
    mask (all ones where that is None), a new object per call, recorded with its semantics."""
    probe = _current("mask function")
    mask, semantics = masks.padding_and_semantics(q_length, kv_length, q_offset, kv_offset, mask_function,
                                                  attention_mask, config)
    if mask is None:
        mask = torch.ones(batch_size, 1, 1, kv_length or q_length or 1, dtype=torch.bool, device=kwargs.get("device"))
    return probe.masks.add(mask.clone(), semantics)


def capture_keys_values(model, ids: torch.Tensor, backend: str = "auto",
                        chunk_tokens: int = 512) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Every attention layer's keys and values ({slot: [1, Hkv, L, D]}) of token ids ``ids`` [L] read
    at positions 0..L-1, ``chunk_tokens`` at a time through the model's own KV cache (hybrid and
    sliding-window caches included): each chunk's attention call contributes the keys of its new
    tokens, the last ``chunk`` of the keys it sees."""
    from prefix_kernels.hf import compat

    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise NotImplementedError(f"model type {model.config.model_type!r}: a prefix initialized from text is for "
                                  "decoder-only and encoder models; an encoder-decoder model starts from init='random'")
    ids = ids.reshape(1, -1)
    keys: dict[int, list] = {}
    values: dict[int, list] = {}
    cache = None
    for start in range(0, ids.shape[1], chunk_tokens):
        chunk = ids[:, start:start + chunk_tokens]
        extra = {"use_cache": True} if cache is None else {compat.cache_name(model): cache, "use_cache": True}
        probe = probe_model(model, backend, ids=chunk, capture=True, extra=extra)
        cache = compat.output_cache(probe.output)
        if cache is None and start + chunk_tokens < ids.shape[1]:
            raise NotImplementedError(f"model type {model.config.model_type!r}: it returns no KV cache, so a text "
                                      f"longer than chunk_tokens={chunk_tokens} cannot be read in chunks")
        for slot in probe.keys:
            keys.setdefault(slot, []).append(probe.keys[slot][:, :, -chunk.shape[1]:])
            values.setdefault(slot, []).append(probe.values[slot][:, :, -chunk.shape[1]:])
    return ({slot: torch.cat(parts, 2) for slot, parts in keys.items()},
            {slot: torch.cat(parts, 2) for slot, parts in values.items()})


class _Marker:
    """Stands in for the prefix keyword argument during a probe: seeing it in attention proves the
    layer forwards the model's keyword arguments."""


def _token_ids(config, length: int) -> list[int]:
    text = config.get_text_config()
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or 100
    special = {getattr(c, name) for c in (config, text) for name in dir(c)
               if name.endswith(("token_id", "token_index")) and isinstance(getattr(c, name, None), int)}
    return [i for i in range(1, vocab) if i not in special][:length]


def _silence(model) -> torch.Tensor:
    """Zero input features [1, mel bins, frames] of the length the encoder requires (Whisper: twice its
    positions, for its two convolutions)."""
    config = model.config
    frames = 2 * config.max_source_positions
    p = next(model.parameters())
    return torch.zeros(1, config.num_mel_bins, frames, dtype=p.dtype, device=p.device)


_CODEBOOK_ROWS = ("musicgen_decoder", "musicgen_melody_decoder")


def codebook_rows(config) -> int:
    """Id rows per attention batch row: MusicGen's decoders read [B * codebooks, L] ids (a Moshi config
    has codebooks too, but reads [B, L] text ids); 1 for every other model."""
    text = config.get_text_config()
    return text.num_codebooks if text.model_type in _CODEBOOK_ROWS else 1


def attention_roles(model) -> dict[int, str] | None:
    """For an encoder-decoder model, id(module) -> "encoder" / "decoder" / "cross" for every module,
    from where it sits (cross-attention modules are named encoder_attn, crossattention, ...); None
    for any other model."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return None
    roles = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if any(p in ("encoder_attn", "crossattention", "cross_attn", "EncDecAttention") for p in parts):
            roles[id(module)] = "cross"
        elif "encoder" in parts and "decoder" not in parts:
            roles[id(module)] = "encoder"
        else:
            roles[id(module)] = "decoder"
    return roles


def probe_model(model, backend: str = "auto", ids: torch.Tensor | None = None, capture: bool = False,
                extra: dict | None = None) -> Probe:
    """Runs the probe forward (``ids`` [B, L], default a few tokens; ``extra`` more forward arguments)
    on ``model`` and returns the :class:`Probe` with its records. The model's text attention is
    routed to :data:`PROBE_IMPLEMENTATION` for that forward and given back after it, as are its
    training mode and the cache-slot hooks: the model is left as it was found."""
    from prefix_kernels.hf import routing

    config = model.config
    codebooks = codebook_rows(config)
    if ids is None:
        ids = torch.tensor([_token_ids(config, 3)] * codebooks, device=next(model.parameters()).device)
    probe = Probe(config.model_type, backend, capture, attention_roles(model))
    if probe.roles is not None and not extra:  # an encoder-decoder: a decoder input too
        extra = {"decoder_input_ids": ids[:, :2]}
    with routing.routed(model, PROBE_IMPLEMENTATION), probing(probe):
        probe.output = _probe_forward(model, ids, extra or {}, codebooks)
    if not probe.layers:
        raise NotImplementedError(f"model type {config.model_type!r} ({type(model).__name__}): no attention layer went "
                                  "through transformers' AttentionInterface, so there is no attention to add a prefix "
                                  "to")
    _fold_repeated_heads(probe, model)
    return probe


def _probe_forward(model, ids: torch.Tensor, extra: dict, codebooks: int):
    """One forward of ``model`` in eval mode without gradients; a failure that is not already a refusal
    becomes one, naming the model."""
    device = next(model.parameters()).device
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if extra and "decoder_input_ids" not in extra:  # text init: the model builds the mask over its cache
                return model(input_ids=ids.to(device), prefix_kv=_Marker(), **extra)
            extra = {k: v.to(device) for k, v in extra.items()}
            if getattr(model, "main_input_name", "input_ids") == "input_features":  # Whisper: audio features in
                return model(input_features=_silence(model), prefix_kv=_Marker(), **extra)
            mask = torch.ones(ids.shape[0] // codebooks, ids.shape[1], dtype=torch.long, device=device)
            return model(input_ids=ids.to(device), attention_mask=mask, prefix_kv=_Marker(), **extra)
    except NotImplementedError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any failure here means we cannot serve the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise NotImplementedError(f"model type {model.config.model_type!r} ({type(model).__name__}): a forward of "
                                  f"{tuple(ids.shape)} tokens through prefix_kernels' attention failed "
                                  f"({type(exc).__name__}: {first}); the model may read the attention mask itself "
                                  "(prefix_kernels hands it only the padding) or need inputs other than token ids"
                                  ) from exc
    finally:
        model.train(was_training)


def _fold_repeated_heads(probe: Probe, model) -> None:
    """Layers whose attention heads are their cache's kv heads repeated (``keys.repeat(1, r, 1, 1)``
    after the cache update, JetMoE's mixture of attention heads) get the cache's heads and
    ``kv_repeat=r``: the prefix then has PEFT's layout (the cache's shape) and is repeated alike."""
    from prefix_kernels.hf import compat, internals

    if probe.roles is not None:
        return
    cache = compat.output_cache(probe.output)
    for slot, layer in list(probe.layers.items()):
        keys, values = internals.cache_layer_keys_values(cache, slot)
        if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor) and keys.dim() == 4):
            continue
        heads = keys.shape[1]
        seen_k, seen_v = probe.seen[slot]
        if heads >= layer.num_kv_heads or layer.num_kv_heads % heads or seen_k.shape[2] != keys.shape[2]:
            continue
        repeat = layer.num_kv_heads // heads
        if torch.equal(seen_k, keys.repeat(1, repeat, 1, 1)) and torch.equal(seen_v, values.repeat(1, repeat, 1, 1)):
            probe.layers[slot] = dataclasses.replace(layer, num_kv_heads=heads, kv_repeat=repeat)
            if slot in probe.keys:
                probe.keys[slot], probe.values[slot] = probe.keys[slot][:, :heads], probe.values[slot][:, :heads]
