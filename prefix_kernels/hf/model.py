"""``add_prefix_tuning``: a frozen transformers model (decoder-only causal LM, encoder with its head,
or encoder-decoder) with one trainable prefix per attention layer, its attention routed through
the fused kernel.

Wrapping runs one probe forward (:mod:`prefix_kernels.hf.probe`) that finds each attention layer's
shapes and mask and refuses what the kernel cannot serve exactly. The prefixes are stored in PEFT's
layout, ``[T, P, L * 2 * Hkv * D]`` (T prefixes in a bank, P virtual tokens; per token: layer,
key/value, kv head, head dim), so a PEFT adapter's ``prompt_embeddings`` is one row of the bank;
models whose layers differ in shape use the per-layer layout of :mod:`prefix_kernels.hf.spec`. A
forward pre-hook on the wrapped model puts this call's prefixes (a
:class:`~prefix_kernels.hf.attention.PrefixKV`) into its keyword arguments and shifts the
positions; the hook also serves ``generate()``, which calls the wrapped model directly.

Positions. ``position_offset="peft"`` (default) places the real tokens at P..P+N-1 with unrotated
prefix keys, as PEFT does (its prefix sits in the KV cache), so PEFT checkpoints give the same
outputs; ``"none"`` keeps 0..N-1. Positions that are not given are counted over the attention
mask (``cumsum - 1``, as ``generate()`` counts them), so a left-padded row gets the positions it
would have unpadded; explicit ``position_ids`` are taken as positions in the real text and shifted.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from prefix_kernels.functional import check_prefix_ids
from prefix_kernels.hf import checkpoint, compat, internals, legacy, probe, routing
from prefix_kernels.hf.attention import ATTN_IMPLEMENTATION, PrefixKV, register
from prefix_kernels.hf.spec import POSITION_OFFSETS, PrefixSpec, model_geometry, spec_for

_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def _check_routable(model: nn.Module) -> None:
    """Refusals that the config alone decides (the probe forward decides the rest)."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"add_prefix_tuning needs a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = model.config.model_type
    if internals.attends_over_shared_kv_states(model):
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}): an assistant (draft) model attends over its target "
            "model's keys/values (shared_kv_states), so there is no attention of its own to prefix: prefix-tune the "
            "target model")
    if not legacy.supported(model) and not _text_model_can_route(model):
        import transformers

        # the version is named: a family may route in one transformers and compute attention by hand in
        # another (GPT-J and CodeGen by hand in 5.17, through the interface in 5.24)
        raise NotImplementedError(
            f"model type {model_type!r} ({type(model).__name__}) does not route attention through transformers' "
            f"AttentionInterface in this transformers ({transformers.__version__}), so prefix_kernels cannot "
            "replace its attention"
        )
    text = model.config.get_text_config()
    if getattr(text, "indexer_n_heads", None):
        raise NotImplementedError(
            f"model type {model_type!r}: query-sparse attention over the keys a token indexer picks (indexer_n_heads="
            f"{text.indexer_n_heads}, budget {getattr(text, 'indexer_budget', None)}) is not implemented by the "
            "prefix_kernels kernel")
    if getattr(text, "index_topk", None):
        raise NotImplementedError(
            f"model type {model_type!r}: sparse attention over the top {text.index_topk} keys picked by an indexer "
            "(DeepSeek sparse attention) is not implemented by the prefix_kernels kernel"
        )


def _text_model_can_route(model: nn.Module) -> bool:
    """Whether the text model routes attention through the AttentionInterface (transformers' own test:
    the source of its modeling module). In a multimodal wrapper that is the language model's class, not
    the wrapper's: a vision tower that computes attention by hand keeps it (only text attention is ours)."""
    from transformers import PreTrainedModel

    if internals.routes_attention_through_interface(model):
        return True
    text = model.config.get_text_config()
    if text is model.config:
        return False
    return any(isinstance(m, PreTrainedModel) and m.config is text and internals.routes_attention_through_interface(m)
               for m in model.modules())


def match_modules(model: nn.Module, names, *, missing_ok: bool = False) -> tuple[str, ...]:
    """The paths of ``model``'s submodules named by ``names``, PEFT's rule for ``modules_to_save``:
    a name matches the module at that dotted path or at any path ending in ``"." + name``; a match
    inside another match is dropped (it trains with it). A name that matches nothing raises
    ValueError, unless ``missing_ok``."""
    paths = [path for path, _ in model.named_modules() if path]
    found, unknown = [], []
    for name in dict.fromkeys(names):
        hits = [path for path in paths if path == name or path.endswith("." + name)]
        found += hits
        if not hits:
            unknown.append(name)
    if unknown and not missing_ok:
        top = [path for path in paths if "." not in path]
        raise ValueError(f"trainable_modules: no submodule of {type(model).__name__} is named {unknown} (a name is a "
                         f"dotted path as in named_modules(), or its last parts; top-level modules: {top})")
    found = sorted(set(found), key=paths.index)
    return tuple(p for p in found if not any(p.startswith(q + ".") for q in found))


def _trainable_modules(model: nn.Module, names) -> tuple[str, ...]:
    """``trainable_modules`` resolved to module paths (None: the head PEFT's task type saves), checked
    not to share a parameter with a frozen module (tied weights would train that module too)."""
    if names is None:
        paths = match_modules(model, checkpoint.head_modules(type(model).__name__), missing_ok=True)
    elif isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"trainable_modules must be None or a list of module names (str), got {names!r}")
    else:
        paths = match_modules(model, names)
    owned = {id(p): path for path in paths for p in model.get_submodule(path).parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        path = owned.get(id(p))
        if path is not None and not any(name.startswith(q + ".") for q in paths):
            raise ValueError(f"trainable_modules: {path!r} shares a parameter with {name!r} (tied weights), which "
                             "would then train too; untie the weights or leave the module out")
    return paths


class PrefixEncoder(nn.Module):
    """Li & Liang's reparameterization: table = MLP(embedding), embedding [T, P, Hkv * D]."""

    def __init__(self, spec: PrefixSpec, dtype: torch.dtype, device):
        super().__init__()
        token_dim = spec.num_kv_heads * spec.head_dim
        self.embedding = nn.Parameter(torch.randn(spec.num_prefixes, spec.num_virtual_tokens, token_dim,
                                                  dtype=dtype, device=device))
        self.transform = nn.Sequential(
            nn.Linear(token_dim, spec.projection_hidden, dtype=dtype, device=device),
            nn.Tanh(),
            nn.Linear(spec.projection_hidden, spec.width, dtype=dtype, device=device),
        )

    def forward(self) -> torch.Tensor:
        return self.transform(self.embedding)


class PrefixTuningModel(nn.Module):
    """A frozen causal LM plus trainable prefixes; see :func:`add_prefix_tuning`."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, num_prefixes: int = 1,
                 projection_hidden: int | None = None, init="random", position_offset: str = "peft",
                 backend: str = "auto", tokenizer=None, num_frozen_tokens: int = 0, placement: str | None = None,
                 trainable_modules=None):
        super().__init__()
        _check_routable(model)
        self.trainable_modules = _trainable_modules(model, trainable_modules)
        seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        if seq2seq:
            placement = "paper" if placement is None else placement
            if placement not in routing.PLACEMENTS:
                raise ValueError(f"placement must be one of {routing.PLACEMENTS} for an encoder-decoder model, got "
                                 f"{placement!r}")
        elif placement is not None:
            raise ValueError(f"placement={placement!r} is for encoder-decoder models; model type "
                             f"{model.config.model_type!r} ({type(model).__name__}) has one kind of attention")
        if position_offset not in POSITION_OFFSETS:
            raise ValueError(f"position_offset must be one of {POSITION_OFFSETS}, got {position_offset!r}")
        for name, value in (("num_virtual_tokens", num_virtual_tokens), ("num_prefixes", num_prefixes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if projection_hidden is not None and (not isinstance(projection_hidden, int) or projection_hidden < 1):
            raise ValueError(f"projection_hidden must be None or a positive int, got {projection_hidden!r}")
        if isinstance(num_frozen_tokens, bool) or not isinstance(num_frozen_tokens, int) or \
                not 0 <= num_frozen_tokens <= num_virtual_tokens:
            raise ValueError(f"num_frozen_tokens must be an int in [0, num_virtual_tokens={num_virtual_tokens}], got "
                             f"{num_frozen_tokens!r}")
        if num_frozen_tokens and projection_hidden is not None:
            raise ValueError("num_frozen_tokens keeps prefix values fixed, which an MLP reparameterization does not "
                             "have: use projection_hidden=None")
        self.backend = backend
        self.base_model = model
        text = model.config.get_text_config()
        model_type = model.config.model_type
        for field in _DROPOUT_FIELDS:
            if getattr(text, field, 0) or 0:
                warnings.warn(f"{model_type} config has {field}={getattr(text, field)}: the fused kernel "
                              "has no attention dropout, so training mode raises; set it to 0.0", stacklevel=3)

        register()
        self._previous_attn = routing.text_attention(model)
        routing.set_text_attention(model, ATTN_IMPLEMENTATION)
        if internals.attn_implementation(model.config.get_text_config()) != ATTN_IMPLEMENTATION:
            raise NotImplementedError(f"model type {model_type!r} refused attn_implementation={ATTN_IMPLEMENTATION!r}")
        try:
            probed = probe.probe_model(model, backend)
        except BaseException:
            routing.set_text_attention(model, self._previous_attn)
            raise
        self.attention_layers = routing.place_prefixes(probed.layers, placement, model_geometry(model.config)[0])
        self._slot_modules = probed.modules
        for slot, module in self._slot_modules.items():
            module.prefix_kernels_slot = slot
        self.spec = spec_for(model.config, num_virtual_tokens, num_prefixes, projection_hidden, position_offset,
                             layer_shapes={layer.table_layer: layer.shape for layer in self.attention_layers.values()
                                           if layer.table_layer is not None},
                             num_frozen_tokens=num_frozen_tokens, placement=placement)

        model_dtype = next(model.parameters()).dtype
        dtype = model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32
        device = next(model.parameters()).device
        self.frozen_prefix = None
        try:
            if projection_hidden is None:
                table = self._initial_table(init, tokenizer, dtype, device)
                # frozen tokens are a parameter without gradient (saved and moved with the model, never
                # touched by an optimizer -- not even by weight decay), the rest the trainable one
                self.prefix_embedding = nn.Parameter(table[:, num_frozen_tokens:].clone())
                if num_frozen_tokens:
                    self.frozen_prefix = nn.Parameter(table[:, :num_frozen_tokens].clone(), requires_grad=False)
                self.prefix_encoder = None
            else:
                if not (isinstance(init, str) and init == "random"):
                    raise ValueError("init from text/token ids needs projection_hidden=None (an MLP output cannot be "
                                     "set)")
                self.prefix_embedding = None
                self.prefix_encoder = PrefixEncoder(self.spec, dtype, device)
        except BaseException:
            routing.set_text_attention(model, self._previous_attn)
            for module in self._slot_modules.values():
                del module.prefix_kernels_slot
            raise

        for p in model.parameters():  # frozen only once the model is accepted
            p.requires_grad_(False)
        for name in self.trainable_modules:  # ... except the head (or other modules) asked for
            model.get_submodule(name).requires_grad_(True)
        self._signature = inspect.signature(model.forward)
        self._frozen_table = None
        self._generation_prefix_ids = None
        # layers that do not forward keyword arguments get the call's prefix through their module
        self._handover = [self._slot_modules[slot] for slot, layer in self.attention_layers.items()
                          if not layer.forwards_kwargs]
        self._hooks = [model.register_forward_pre_hook(self._inject, with_kwargs=True)]
        if self._handover:
            self._hooks.append(model.register_forward_hook(self._end_call, always_call=True))
        if seq2seq:  # generate() runs the encoder on its own: it gets the prefix through its modules
            self._encoder_modules = [self._slot_modules[slot] for slot, layer in self.attention_layers.items()
                                     if layer.role == "encoder"]
            encoder = model.get_encoder()
            self._hooks.append(encoder.register_forward_pre_hook(self._inject_encoder, with_kwargs=True))
            self._hooks.append(encoder.register_forward_hook(self._end_encoder, always_call=True))
        offset = num_virtual_tokens if position_offset == "peft" else 0
        # a decoder that counts positions from its cache gets the offset at its position embedding,
        # and no position_ids from us (it may pass them on to that embedding: no double shift);
        # an encoder's positions move only where its self-attention has a prefix
        self._position_modules = routing.cache_length_position_modules(model)
        roles = probe.attention_roles(model) or {}
        prefixed_roles = {layer.role for layer in self.attention_layers.values() if layer.table_layer is not None}
        for module in self._position_modules if offset else []:
            if roles.get(id(module), "self") in prefixed_roles | {"self", "decoder"}:
                self._hooks.append(module.register_forward_pre_hook(routing.position_shift(offset), with_kwargs=True))

    # ---- the prefixes -------------------------------------------------------------------------
    def _initial_table(self, init, tokenizer, dtype, device) -> torch.Tensor:
        spec = self.spec
        shape = (spec.num_prefixes, spec.num_virtual_tokens, spec.width)
        if isinstance(init, str) and init == "random":
            return torch.randn(shape, dtype=dtype, device=device)  # PEFT's nn.Embedding default init
        if isinstance(init, str):
            if tokenizer is None:
                raise ValueError("init given as text needs tokenizer=...")
            ids = tokenizer(init, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        else:
            ids = torch.as_tensor(init)
            if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"init must be 'random', text, or 1-D token ids; got tensor {tuple(ids.shape)} {ids.dtype}")
        if ids.numel() != spec.num_virtual_tokens:
            raise ValueError(f"init has {ids.numel()} tokens but num_virtual_tokens={spec.num_virtual_tokens}")
        return self.text_table(ids).to(dtype).expand(shape).clone()

    @torch.no_grad()
    def text_table(self, ids: torch.Tensor, chunk_tokens: int = 512) -> torch.Tensor:
        """[1, P, width]: the keys/values of ``ids`` under the base model at positions 0..P-1 (its own
        attention, before any prefix), in the prefix layout; layers without attention get zeros.
        Read ``chunk_tokens`` at a time through a KV cache, so a corpus of thousands of tokens (a
        cartridge) needs activation memory of one chunk only."""
        keys, values = probe.capture_keys_values(self.base_model, ids, self.backend, chunk_tokens)
        spec = self.spec
        table = torch.zeros(1, spec.num_virtual_tokens, spec.width, device=next(self.base_model.parameters()).device)
        offset = 0
        table_layers = {layer.table_layer: slot for slot, layer in self.attention_layers.items()}
        for layer, (hkv, dk, dv) in enumerate(spec.shapes()):
            for tensors, d in ((keys, dk), (values, dv)):
                layer_slot = table_layers.get(layer)
                if layer_slot in tensors:  # [1, Hkv, P, D] -> [1, P, Hkv * D]
                    table[..., offset:offset + hkv * d] = tensors[layer_slot].transpose(1, 2).flatten(2).float()
                offset += hkv * d
        return table  # for PEFT's layout the same walk: per token layer, key/value, head, dim

    def prefix_table(self) -> torch.Tensor:
        """The prefixes as plain values [T, P, L*2*Hkv*D] (through the MLP when reparameterized; the
        frozen tokens first when there are any: one [T, P, width] copy per forward, not per layer)."""
        if self._frozen_table is not None:
            return self._frozen_table
        if self.prefix_encoder is not None:
            return self.prefix_encoder()
        if self.frozen_prefix is not None:
            return torch.cat([self.frozen_prefix, self.prefix_embedding], 1)
        return self.prefix_embedding

    @torch.no_grad()
    def set_prefix(self, index: int, table: torch.Tensor) -> None:
        """Sets prefix ``index`` of the bank to ``table`` [P, width] (frozen tokens included)."""
        spec = self.spec
        if self.prefix_encoder is not None:
            raise ValueError("a reparameterized prefix is the output of its MLP and cannot be set: call merge() first")
        if tuple(table.shape) != (spec.num_virtual_tokens, spec.width):
            raise ValueError(f"table must be [P={spec.num_virtual_tokens}, width={spec.width}], got {tuple(table.shape)}")
        k = spec.num_frozen_tokens
        if self.frozen_prefix is not None:
            self.frozen_prefix[index].copy_(table[:k].to(self.frozen_prefix.dtype))
        self.prefix_embedding[index].copy_(table[k:].to(self.prefix_embedding.dtype))

    @torch.no_grad()
    def merge(self) -> PrefixTuningModel:
        """Folds the reparameterization MLP into plain prefix tensors (for inference/export)."""
        if self.prefix_encoder is not None:
            table = self.prefix_encoder().detach().clone()
            self.prefix_encoder = None
            self.prefix_embedding = nn.Parameter(table)
            self.spec = PrefixSpec(**{**self.spec.to_dict(), "projection_hidden": None})
        return self

    def prefix_kv(self, prefix_ids: torch.Tensor | None = None, dtype: torch.dtype | None = None, *,
                  prefix_ids_checked: bool = False) -> PrefixKV:
        """This call's prefixes for every layer. ``prefix_ids`` are range-checked here, once for all
        layers (``prefix_ids_checked=True``: the caller did it with ``check_prefix_ids``)."""
        table = self.prefix_table()
        if dtype is not None:
            table = table.to(dtype)
        spec = self.spec
        if prefix_ids is None and spec.num_prefixes > 1:
            raise ValueError(f"this model holds a bank of {spec.num_prefixes} prefixes: pass prefix_ids [B]")
        if prefix_ids is not None and not prefix_ids_checked:
            prefix_ids = check_prefix_ids(prefix_ids, table.shape[0])
        return PrefixKV.from_table(table, spec, prefix_ids=prefix_ids, prefix_ids_checked=prefix_ids is not None,
                                   backend=self.backend, attention=self.attention_layers)

    # ---- the hook on the wrapped model ------------------------------------------------------
    def _inject(self, module, args, kwargs):
        if "prefix_kv" in kwargs:
            return None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        # a None the forward does not name (input_ids=None to Whisper, which takes input_features) is not passed on
        extra = {k: v for k, v in bound.pop("kwargs", {}).items() if v is not None}
        kwargs = {**bound, **extra}
        prefix_ids = kwargs.pop("prefix_ids", None)
        embeds = kwargs.get("inputs_embeds")
        ref = next((kwargs[k] for k in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds",
                                        "labels", "input_features") if kwargs.get(k) is not None), None)
        if ref is None:
            raise ValueError("pass input_ids or inputs_embeds (or input_features to an audio encoder-decoder)")
        batch, length = ref.shape[:2]
        batch //= probe.codebook_rows(self.base_model.config)  # MusicGen: [B * codebooks, L] ids, B rows attend
        checked = False
        if prefix_ids is None and self._generation_prefix_ids is not None:
            prefix_ids, checked = self._generation_prefix_ids, True  # checked once by generate()
            if prefix_ids.dim() == 1 and prefix_ids.numel() and batch % prefix_ids.numel() == 0:
                # generate() repeats each row for beams / return sequences: repeat its prefix id alike
                prefix_ids = prefix_ids.repeat_interleave(batch // prefix_ids.numel())
        if prefix_ids is not None:
            prefix_ids = torch.as_tensor(prefix_ids, device=ref.device)
            if prefix_ids.dim() == 0:
                prefix_ids = prefix_ids.expand(batch)
            if prefix_ids.shape != (batch,):
                raise ValueError(f"prefix_ids must be [B={batch}], got shape {tuple(prefix_ids.shape)}")
        model_dtype = embeds.dtype if embeds is not None else self.base_model.dtype
        kwargs["prefix_kv"] = self.prefix_kv(prefix_ids, dtype=model_dtype, prefix_ids_checked=checked)
        if not self._position_modules:
            kwargs["position_ids"] = self._positions(kwargs, batch, length, ref.device)
        for module in self._handover:
            module.prefix_kernels_call = kwargs["prefix_kv"]
        return (), kwargs

    def _end_call(self, module, args, output):
        for attention in self._handover:
            attention.prefix_kernels_call = None

    def _inject_encoder(self, module, args, kwargs):
        if "prefix_kv" in kwargs or any(getattr(m, "prefix_kernels_call", None) is not None
                                        for m in self._encoder_modules):
            return None  # inside the model's forward: the prefix arrives with it
        ref = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        prefix_ids = self._generation_prefix_ids
        if prefix_ids is not None and ref is not None and prefix_ids.numel() not in (1, ref.shape[0]):
            raise ValueError(f"prefix_ids must be [B={ref.shape[0]}], got shape {tuple(prefix_ids.shape)}")
        call = self.prefix_kv(prefix_ids, dtype=self.base_model.dtype, prefix_ids_checked=prefix_ids is not None)
        for attention in self._encoder_modules:
            attention.prefix_kernels_call = call
        return None

    def _end_encoder(self, module, args, output):
        for attention in self._encoder_modules:  # the encoder is done with them
            attention.prefix_kernels_call = None

    def _positions(self, kwargs, batch, length, device) -> torch.Tensor:
        offset = self.spec.num_virtual_tokens if self.spec.position_offset == "peft" else 0
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

    # ---- the usual entry points -------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                prefix_ids=None, **kwargs):
        """The wrapped model's forward (HF arguments and output) with the prefixes; ``prefix_ids``
        [B] picks each row's prefix from a bank. (Arguments named so that Trainer keeps its columns.)"""
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, prefix_ids=prefix_ids, **kwargs)

    @torch.no_grad()
    def generate(self, *args, prefix_ids=None, **kwargs):
        """``generate()`` of the wrapped model; the KV cache holds real tokens only, the prefix is
        read from the (once-evaluated) prefix table at every step."""
        if prefix_ids is not None:  # checked once here, not at every step (nor in every layer)
            prefix_ids = torch.as_tensor(prefix_ids, device=self.base_model.device)
            prefix_ids = check_prefix_ids(prefix_ids, self.spec.num_prefixes)
        # evaluated (MLP) and cast to the model's dtype once, not at every step
        self._frozen_table = self.prefix_table().detach().to(self.base_model.dtype)
        self._generation_prefix_ids = prefix_ids  # generate() refuses unknown model kwargs: the hook reads it
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self._frozen_table = None
            self._generation_prefix_ids = None

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs):
        """Activation checkpointing of the frozen layers; non-reentrant by default, so gradients reach
        the prefixes without making the frozen inputs require grad (PEFT refuses checkpointing here)."""
        options = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        compat.enable_activation_checkpointing(self.base_model, options, **kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs):
        """The older name of :meth:`activation_checkpointing_enable` (what older transformers' Trainer calls)."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on in the wrapped model."""
        return compat.is_activation_checkpointing(self.base_model)

    def unload(self) -> nn.Module:
        """Removes the hook and restores the model's attention implementation; returns the model. The
        ``trainable_modules`` (a trained head) stay in the model as trained, the rest stays frozen."""
        for hook in self._hooks:
            hook.remove()
        for module in self._slot_modules.values():
            module.__dict__.pop("prefix_kernels_call", None)
            module.__dict__.pop("prefix_kernels_slot", None)
        routing.set_text_attention(self.base_model, self._previous_attn)
        return self.base_model

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- persistence (prefix_kernels.hf.checkpoint) ---------------------------------------------
    def save_prefix(self, directory) -> None:
        checkpoint.save_prefix(self, directory)

    def load_prefix(self, directory) -> PrefixTuningModel:
        checkpoint.load_prefix(self, directory)
        return self

    def save_peft_adapter(self, directory, prefix_index: int = 0, peft_type: str | None = None) -> None:
        checkpoint.save_peft_adapter(self, directory, prefix_index=prefix_index, peft_type=peft_type)

    def load_peft_adapter(self, directory, prefix_index: int = 0) -> PrefixTuningModel:
        checkpoint.load_peft_adapter(self, directory, prefix_index=prefix_index)
        _warn_if_windows_differ_from_peft(self)
        return self


def _warn_if_windows_differ_from_peft(wrapper) -> None:
    windows = sorted({layer.sliding_window for layer in wrapper.attention_layers.values()} - {None})
    if windows:
        w, p = windows[0], wrapper.spec.num_virtual_tokens
        warnings.warn(
            f"{wrapper.spec.model_type} has sliding-window layers (window {w}): PEFT's prefix sits in the KV cache at "
            f"positions 0..{p - 1} and leaves the window of the queries from token {w - p} on, while prefix_kernels "
            f"keeps the prefix visible to every query; outputs equal PEFT's on sequences of at most {max(w - p, 0)} "
            "tokens", stacklevel=3)


def add_prefix_tuning(model: nn.Module, num_virtual_tokens: int, *, num_prefixes: int = 1,
                      projection_hidden: int | None = None, init="random", position_offset: str = "peft",
                      backend: str = "auto", tokenizer=None, num_frozen_tokens: int = 0,
                      placement: str | None = None, trainable_modules=None) -> PrefixTuningModel:
    """Wraps a transformers causal LM for prefix tuning with the fused kernel.

    Args:
        model: a transformers (5.x) causal LM whose attention goes through AttentionInterface
            (Llama, Mistral, Qwen2/3, GPT-2, Gemma, ...). Its weights are frozen in place and its
            attention implementation is switched to ``"prefix_kernels"`` (``unload()`` undoes both).
        num_virtual_tokens: P, the prefix length.
        num_prefixes: T, a bank of prefixes (several tasks in one batch); pick per row with
            ``prefix_ids`` [B] in forward/generate.
        projection_hidden: hidden width of Li & Liang's MLP reparameterization (None: plain tensors).
            ``merge()`` folds it away.
        init: "random" (N(0, 1), as PEFT), text (with ``tokenizer``) or 1-D token ids: the prefix
            starts as the keys/values of that text under the model.
        position_offset: "peft" (real tokens at P..P+N-1, as PEFT) or "none" (0..N-1).
        backend: passed to :func:`prefix_kernels.prefix_attention` ("auto", "triton", "cpu", "reference").
        num_frozen_tokens: k, the first k virtual tokens are not trained (``frozen_prefix``, no
            gradient, saved): Cartridges' attention sink (PEFT's ``CartridgeConfig``).
        placement: encoder-decoder models only: ``"paper"`` (default; Li & Liang: a prefix of its own
            in every encoder self-attention, decoder self-attention and cross-attention layer) or
            ``"peft"`` (the decoder's self-attention only, as PEFT's SEQ_2_SEQ_LM prefix tuning).
        trainable_modules: names of the model's submodules that train with the prefix, PEFT's
            ``modules_to_save`` (a name is a dotted path as in ``named_modules()``, or its last parts,
            PEFT's matching rule; one that matches nothing raises ValueError). Trained in place: their
            parameters stay trainable, in ``parameters()`` and the optimizer, and are saved by
            ``save_prefix`` and, as PEFT saves ``modules_to_save``, by ``save_peft_adapter``;
            ``unload()`` leaves them trained in the model. Default (None): the head PEFT's task type
            trains, ``classifier`` or ``score`` for ``...ForSequenceClassification`` /
            ``...ForTokenClassification``, ``qa_outputs`` for ``...ForQuestionAnswering`` (a freshly
            initialized head is random), none for other models; ``[]``: the prefix alone.
    """
    return PrefixTuningModel(model, num_virtual_tokens, num_prefixes=num_prefixes,
                             projection_hidden=projection_hidden, init=init, position_offset=position_offset,
                             backend=backend, tokenizer=tokenizer, num_frozen_tokens=num_frozen_tokens,
                             placement=placement, trainable_modules=trainable_modules)


def from_peft_adapter(model, directory, **add_prefix_tuning_kwargs) -> PrefixTuningModel:
    """``add_prefix_tuning(model, P, **kwargs)`` with P (and a cartridge's frozen tokens, and as
    ``trainable_modules`` the adapter's ``modules_to_save`` that the model has, unless given) from
    the adapter's config, then the adapter loaded into prefix 0. The adapter's files are read first; its
    sizes are checked against what the model's attention layers take, found when it is wrapped: on
    a mismatch the model is unwrapped again (attention implementation and trainable flags restored)."""
    kwargs = add_prefix_tuning_kwargs
    if "num_virtual_tokens" in kwargs:
        raise ValueError(f"num_virtual_tokens comes from the adapter's {checkpoint.PEFT_CONFIG}; do not pass it")
    if kwargs.get("projection_hidden") is not None:
        raise ValueError("a PEFT adapter holds the prefix values themselves: projection_hidden must be None")
    placement = kwargs.get("placement")
    if getattr(model.config, "is_encoder_decoder", False) and placement is None:
        placement = "peft"  # PEFT's only placement for encoder-decoder models
    num_virtual_tokens, frozen = checkpoint.peft_adapter_size(directory, kwargs.get("num_frozen_tokens"))
    kwargs = {**kwargs, "num_frozen_tokens": frozen, "placement": placement}
    if kwargs.get("trainable_modules") is None:
        kwargs["trainable_modules"] = match_modules(model, checkpoint.peft_adapter_modules(directory), missing_ok=True)
    trainable = [p.requires_grad for p in model.parameters()]
    wrapper = add_prefix_tuning(model, num_virtual_tokens, **kwargs)
    try:
        checkpoint.load_peft_adapter(wrapper, directory)
    except BaseException:
        wrapper.unload()
        for p, flag in zip(model.parameters(), trainable):
            p.requires_grad_(flag)
        raise
    _warn_if_windows_differ_from_peft(wrapper)
    return wrapper
