"""The transformers 5.x API renames this package meets, each detected from the installed
transformers itself (a feature, not a version number), so that older 5.x keeps working and newer
5.x sees only its current API (no FutureWarning from our calls):

- the KV cache: newer transformers take ``cache=`` and return ``output.cache``; ``past_key_values``
  is deprecated there (a FutureWarning per call, removal announced for 5.40; reading it from an
  output logs a deprecation). Older 5.x (e.g. 5.17) know only ``past_key_values``. Detected from the
  model's ``forward`` signature (what to pass) and from the output's declared fields (what to read).
- activation checkpointing: newer transformers have ``activation_checkpointing_enable`` /
  ``is_activation_checkpointing`` and deprecate the ``gradient_checkpointing`` names (a
  FutureWarning per call); older 5.x have only the latter. Detected by the attribute.

Tests force the older path by monkeypatching :func:`cache_name` and :func:`has_activation_checkpointing`.
"""

from __future__ import annotations

import inspect

from torch import nn

CACHE_NAMES = ("cache", "past_key_values")  # current, older


def cache_name(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes (and its output returns) the KV cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache in ``output`` (a forward output, called with ``use_cache=True``), read under the name
    its class declares: newer transformers keep ``past_key_values`` as a deprecated alias (a warning
    per read) on outputs that declare ``cache``, whatever name the model's forward takes (BERT's heads
    take neither), so the name comes from the output, not from the forward."""
    declared = getattr(output, "__dataclass_fields__", None)
    if declared is None:  # a plain tuple (return_dict=False): no named cache
        return None
    return next((getattr(output, name) for name in CACHE_NAMES if name in declared), None)


def passed_cache(kwargs: dict):
    """The KV cache a forward call was given under either name (a caller may use the older one)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def has_activation_checkpointing(model: nn.Module) -> bool:
    """Whether ``model`` has the current ``activation_checkpointing_*`` API."""
    return hasattr(model, "activation_checkpointing_enable")


def enable_activation_checkpointing(model: nn.Module, options: dict, **kwargs) -> None:
    """Activation checkpointing of ``model``'s layers with ``options`` (torch.utils.checkpoint's keyword
    arguments), through whichever API the installed transformers has."""
    if has_activation_checkpointing(model):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options, **kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options, **kwargs)


def is_activation_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on in ``model``."""
    if has_activation_checkpointing(model):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing
