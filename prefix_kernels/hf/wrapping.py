"""Wrapping a model, in two steps: :func:`plan` decides everything -- the refusals, the probe's
findings (each attention layer's shapes and mask, :mod:`prefix_kernels.hf.probe`), where the
prefixes go, the table layout, the modules that train, the hooks each module needs -- and changes
nothing on the model (the probe forward routes its attention for that forward only); then
:func:`install` makes the changes -- attention routed to prefix_kernels, weights frozen, hooks on --
and returns an :class:`Installation` whose :meth:`~Installation.remove` undoes them all: it is what
``unload()`` calls, and the rollback when installing (or loading an adapter after it) fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from prefix_kernels.hf import checkpoint, internals, legacy, probe, routing
from prefix_kernels.hf.attention import ATTN_IMPLEMENTATION, register
from prefix_kernels.hf.probe import LayerAttention
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




@dataclass(frozen=True, eq=False)
class WrapPlan:
    """What wrapping a model does, decided before anything changes.

    ``attention_layers``: slot -> what the layer takes and which table layer it reads; ``slots``:
    attention module -> slot; ``handover``: attention modules that get the call's prefix by a pre-hook
    (those whose layers do not forward the model's keyword arguments, and an encoder's); ``encoder``: an encoder-decoder's
    encoder (hooked for ``generate()``, which runs it alone); ``position_modules``: embeddings that
    count positions from the cache length (the wrapper then passes no position_ids), of which
    ``shifted_positions`` get ``position_offset`` added."""

    spec: PrefixSpec
    attention_layers: Mapping[int, LayerAttention]
    slots: Mapping[nn.Module, int]
    trainable_modules: tuple[str, ...]
    handover: tuple[nn.Module, ...]
    encoder: nn.Module | None
    position_modules: tuple[nn.Module, ...]
    shifted_positions: tuple[nn.Module, ...]
    position_offset: int


def plan(model: nn.Module, num_virtual_tokens: int, *, num_prefixes: int = 1, projection_hidden: int | None = None,
         init="random", position_offset: str = "peft", backend: str = "auto", num_frozen_tokens: int = 0,
         placement: str | None = None, trainable_modules=None) -> WrapPlan:
    """The :class:`WrapPlan` of :func:`prefix_kernels.hf.model.add_prefix_tuning`'s arguments (see
    there); raises for what cannot be served. Changes nothing on ``model``."""
    _check_routable(model)
    trainable = _trainable_modules(model, trainable_modules)
    placement = _check_options(model, num_virtual_tokens, num_prefixes, projection_hidden, init, position_offset,
                               num_frozen_tokens, placement)
    _warn_about_dropout(model)
    register()
    probed = probe.probe_model(model, backend)
    layers = routing.place_prefixes(probed.layers, placement, model_geometry(model.config)[0])
    spec = spec_for(model.config, num_virtual_tokens, num_prefixes, projection_hidden, position_offset,
                    layer_shapes={layer.table_layer: layer.shape for layer in layers.values()
                                  if layer.table_layer is not None},
                    num_frozen_tokens=num_frozen_tokens, placement=placement)
    # an encoder-decoder's encoder runs alone in generate(), without the model's keyword arguments
    handover = tuple(probed.modules[slot] for slot, layer in layers.items()
                     if not layer.forwards_kwargs or layer.role == "encoder")
    _check_handover(model, handover)
    offset = num_virtual_tokens if position_offset == "peft" else 0
    positions = tuple(routing.cache_length_position_modules(model))
    return WrapPlan(
        spec=spec, attention_layers=layers, slots={module: slot for slot, module in probed.modules.items()},
        trainable_modules=trainable, handover=handover,
        encoder=model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None,
        position_modules=positions, shifted_positions=_shifted_positions(model, layers, positions) if offset else (),
        position_offset=offset)


def _check_options(model, num_virtual_tokens, num_prefixes, projection_hidden, init, position_offset,
                   num_frozen_tokens, placement) -> str | None:
    """Refuses bad arguments, naming them; returns the placement (``"paper"`` for an encoder-decoder
    model when not given)."""
    if getattr(model.config, "is_encoder_decoder", False):
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
    if projection_hidden is not None and not (isinstance(init, str) and init == "random"):
        raise ValueError("init from text/token ids needs projection_hidden=None (an MLP output cannot be set)")
    return placement


def _warn_about_dropout(model) -> None:
    text = model.config.get_text_config()
    for field in _DROPOUT_FIELDS:
        if getattr(text, field, 0) or 0:
            warnings.warn(f"{model.config.model_type} config has {field}={getattr(text, field)}: the fused kernel "
                          "has no attention dropout, so training mode raises; set it to 0.0", stacklevel=5)


def _check_handover(model, modules) -> None:
    """Attention modules that get the call's prefix by a pre-hook must take keyword arguments (and
    forward them to attention, as transformers' modules do); hf/legacy.py's forwards take them."""
    if legacy.supported(model):
        return
    for module in modules:
        if not internals.takes_keyword_arguments(module):
            raise NotImplementedError(
                f"model type {model.config.model_type!r} ({type(module).__name__}): its layers do not forward the "
                "model's keyword arguments to attention and its attention module takes none, so the prefix cannot "
                "reach its attention")


def _shifted_positions(model, layers, positions) -> tuple[nn.Module, ...]:
    """The position embeddings whose positions move by the prefix: a decoder's, and an encoder's only
    where its self-attention has a prefix."""
    roles = probe.attention_roles(model) or {}
    prefixed = {layer.role for layer in layers.values() if layer.table_layer is not None} | {"self", "decoder"}
    return tuple(module for module in positions if roles.get(id(module), "self") in prefixed)


class Installation:
    """What :func:`install` changed on a model; :meth:`remove` undoes it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.previous_attention = None  # what the text attention was routed to, once it is routed
        self.requires_grad: list[bool] | None = None  # the parameters' flags, once they are frozen
        self.hooks: list = []

    def remove(self, *, restore_trainable: bool = False) -> None:
        """Removes the hooks and gives the model its attention back; ``restore_trainable``: its
        parameters' ``requires_grad`` flags too (otherwise the frozen weights stay frozen and the
        trainable modules trained). Idempotent."""
        for hook in reversed(self.hooks):
            hook.remove()
        self.hooks.clear()
        if self.previous_attention is not None:
            routing.set_text_attention(self.model, self.previous_attention)
            self.previous_attention = None
        if restore_trainable and self.requires_grad is not None:
            for p, flag in zip(self.model.parameters(), self.requires_grad):
                p.requires_grad_(flag)
            self.requires_grad = None


def install(model: nn.Module, plan: WrapPlan, scope) -> Installation:
    """Makes ``plan``'s changes on ``model``, with the hooks of ``scope`` (a
    :class:`~prefix_kernels.hf.calls.CallScope`); on any failure what was done is removed again."""
    done = Installation(model)
    try:
        done.previous_attention = routing.route(model, ATTN_IMPLEMENTATION)
        done.hooks += routing.cache_slot_hooks(model)
        done.requires_grad = [p.requires_grad for p in model.parameters()]
        model.requires_grad_(False)
        for name in plan.trainable_modules:  # ... except the head (or other modules) asked for
            model.get_submodule(name).requires_grad_(True)
        done.hooks.append(model.register_forward_pre_hook(scope.before_call, with_kwargs=True))
        done.hooks.append(model.register_forward_hook(scope.after_call, always_call=True))
        done.hooks += [m.register_forward_pre_hook(scope.hand_over, with_kwargs=True) for m in plan.handover]
        if plan.encoder is not None:
            done.hooks.append(plan.encoder.register_forward_pre_hook(scope.before_encoder, with_kwargs=True))
            done.hooks.append(plan.encoder.register_forward_hook(scope.after_call, always_call=True))
        shift = scope.position_shift(plan.position_offset)
        done.hooks += [m.register_forward_pre_hook(shift, with_kwargs=True) for m in plan.shifted_positions]
    except BaseException:
        done.remove(restore_trainable=True)
        raise
    return done
