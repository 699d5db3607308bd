"""``add_prefix_tuning``: a frozen transformers model (decoder-only causal LM, encoder with its head,
or encoder-decoder) with one trainable prefix per attention layer, its attention routed through
the fused kernel.

Wrapping runs one probe forward (:mod:`prefix_kernels.hf.probe`) that finds each attention layer's
shapes and mask and refuses what the kernel cannot serve exactly. The prefixes are stored in PEFT's
layout, ``[T, P, L * 2 * Hkv * D]`` (T prefixes in a bank, P virtual tokens; per token: layer,
key/value, kv head, head dim), so a PEFT adapter's ``prompt_embeddings`` is one row of the bank;
models whose layers differ in shape use the per-layer layout of :mod:`prefix_kernels.hf.spec`. A
forward pre-hook on the wrapped model (:mod:`prefix_kernels.hf.calls`) puts this call's prefixes (a
:class:`~prefix_kernels.hf.attention.PrefixKV`) into its keyword arguments and shifts the
positions; the hook also serves ``generate()``, which calls the wrapped model directly. Wrapping
is a plan, then an install (:mod:`prefix_kernels.hf.wrapping`).

Positions. ``position_offset="peft"`` (default) places the real tokens at P..P+N-1 with unrotated
prefix keys, as PEFT does (its prefix sits in the KV cache), so PEFT checkpoints give the same
outputs; ``"none"`` keeps 0..N-1. Positions that are not given are counted over the attention
mask (``cumsum - 1``, as ``generate()`` counts them), so a left-padded row gets the positions it
would have unpadded; explicit ``position_ids`` are taken as positions in the real text and shifted.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from prefix_kernels.functional import check_prefix_ids
from prefix_kernels.hf import checkpoint, compat, probe, wrapping
from prefix_kernels.hf.attention import PrefixKV
from prefix_kernels.hf.calls import CallScope
from prefix_kernels.hf.spec import PrefixSpec
from prefix_kernels.hf.wrapping import match_modules

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
    """A frozen causal LM plus trainable prefixes; see :func:`add_prefix_tuning`. Wrapping is
    :func:`prefix_kernels.hf.wrapping.plan` (decides, changes nothing), the prefix parameters, then
    :func:`~prefix_kernels.hf.wrapping.install` (whose handle ``unload()`` removes)."""

    def __init__(self, model: nn.Module, num_virtual_tokens: int, *, num_prefixes: int = 1,
                 projection_hidden: int | None = None, init="random", position_offset: str = "peft",
                 backend: str = "auto", tokenizer=None, num_frozen_tokens: int = 0, placement: str | None = None,
                 trainable_modules=None):
        super().__init__()
        plan = wrapping.plan(model, num_virtual_tokens, num_prefixes=num_prefixes,
                             projection_hidden=projection_hidden, init=init, position_offset=position_offset,
                             backend=backend, num_frozen_tokens=num_frozen_tokens, placement=placement,
                             trainable_modules=trainable_modules)
        self.base_model = model
        self.backend = backend
        self.plan = plan
        self.spec = plan.spec
        self.attention_layers = plan.attention_layers
        self.trainable_modules = plan.trainable_modules
        self._init_prefix(init, tokenizer)
        self._scope = CallScope(self)
        self._installation = wrapping.install(model, plan, self._scope)

    # ---- the prefixes -------------------------------------------------------------------------
    def _init_prefix(self, init, tokenizer) -> None:
        """The prefix parameters: the MLP's, or the table's (frozen tokens are a parameter without
        gradient, saved and moved with the model, never touched by an optimizer -- not even by weight
        decay; the rest is the trainable one)."""
        spec = self.spec
        model_dtype = next(self.base_model.parameters()).dtype
        dtype = model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32
        device = next(self.base_model.parameters()).device
        self.frozen_prefix = self.prefix_embedding = self.prefix_encoder = None
        if spec.projection_hidden is not None:
            self.prefix_encoder = PrefixEncoder(spec, dtype, device)
            return
        table = self._initial_table(init, tokenizer, dtype, device)
        k = spec.num_frozen_tokens
        self.prefix_embedding = nn.Parameter(table[:, k:].clone())
        if k:
            self.frozen_prefix = nn.Parameter(table[:, :k].clone(), requires_grad=False)

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
                  prefix_ids_checked: bool = False, table: torch.Tensor | None = None) -> PrefixKV:
        """This call's prefixes for every layer (of ``table``, default :meth:`prefix_table`). ``prefix_ids``
        are range-checked here, once for all layers (``prefix_ids_checked=True``: the caller did it
        with ``check_prefix_ids``)."""
        table = self.prefix_table() if table is None else table
        if dtype is not None:
            table = table.to(dtype)
        spec = self.spec
        if prefix_ids is None and spec.num_prefixes > 1:
            raise ValueError(f"this model holds a bank of {spec.num_prefixes} prefixes: pass prefix_ids [B]")
        if prefix_ids is not None and not prefix_ids_checked:
            prefix_ids = check_prefix_ids(prefix_ids, table.shape[0])
        return PrefixKV.from_table(table, spec, prefix_ids=prefix_ids, prefix_ids_checked=prefix_ids is not None,
                                   backend=self.backend, attention=self.attention_layers,
                                   slots=self.plan.slots)

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
        with self._scope.generating(self.prefix_table().detach().to(self.base_model.dtype), prefix_ids):
            return self.base_model.generate(*args, **kwargs)

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
        """Removes the hooks and restores the model's attention implementation; returns the model. The
        ``trainable_modules`` (a trained head) stay in the model as trained, the rest stays frozen."""
        self._installation.remove()
        return self.base_model

    def __getattr__(self, name: str):
        """The wrapper stands in for the wrapped model: an attribute it does not have itself is the
        wrapped model's (``config``, ``device``, ``dtype``, ``generation_config``, ``main_input_name``,
        ... -- what Trainer, generation and user code read from a model)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
        base = self.base_model
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(f"neither {type(self).__name__} nor its wrapped model {type(base).__name__} has an "
                                 f"attribute {name!r}") from None

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
    wrapper = add_prefix_tuning(model, num_virtual_tokens, **kwargs)
    try:
        checkpoint.load_peft_adapter(wrapper, directory)
    except BaseException:
        wrapper._installation.remove(restore_trainable=True)
        raise
    _warn_if_windows_differ_from_peft(wrapper)
    return wrapper
