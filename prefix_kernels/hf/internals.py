"""Every read of transformers' internals -- private attributes, code objects, closure cells, a
modeling file's module globals, the parameter names of a transformers forward -- in one place,
one function per assumption. Public API renames (``cache=`` vs ``past_key_values=``, activation
checkpointing names) are in :mod:`prefix_kernels.hf.compat`; what is here is what transformers
never promised, so a new release may break it without notice.

Each function either returns what the assumption gives or reports that the installed transformers
lacks the feature (None / False / an empty table), never guessing. tests/test_hf_internals.py holds
one contract test per function, run on the installed transformers: a release that breaks an
assumption fails there with a sentence naming the version, the assumption and the module that
must learn the change, before it shows up as a refusal (or a wrong answer) in a model.
"""

from __future__ import annotations

import functools
import inspect
import sys

# ---- masks (prefix_kernels.hf.masks) -----------------------------------------------------------
# The mask function transformers hands a mask interface is composed of closures from
# ``transformers.masking_utils``; every closure one factory makes shares the factory's inner code
# object, so the composition is read by code object. Name -> (how to make one closure, what it means).
MASK_BLOCKS: dict[str, tuple] = {
    "causal_mask_function": (None, "causal"),
    "bidirectional_mask_function": (None, "bidirectional"),
    "and_masks": (lambda mu: (mu.causal_mask_function,), "and"),
    "or_masks": (lambda mu: (mu.causal_mask_function,), "or"),
    "sliding_window_overlay": (lambda mu: (1,), "sliding_window"),
    "sliding_window_bidirectional_overlay": (lambda mu: (1,), "sliding_window_bidirectional"),
    "chunked_overlay": (lambda mu: (1, None), "chunked attention"),
    "padding_mask_function": (lambda mu: (None,), "a padding mask inside the mask function"),
    "packed_sequence_mask_function": (lambda mu: (None,), "packed sequences (position_ids that restart)"),
    "remap_positions_for_packed_sequence": (lambda mu: (mu.causal_mask_function, None),
                                            "packed sequences (position_ids that restart)"),
    "blockwise_overlay": (lambda mu: (None,), "bidirectional blocks (blockwise_overlay, e.g. image tokens)"),
}
# the blocks every transformers 5.x has (the rest came later and may be absent)
REQUIRED_MASK_BLOCKS = ("causal_mask_function", "bidirectional_mask_function", "and_masks", "or_masks",
                        "sliding_window_overlay", "chunked_overlay", "padding_mask_function",
                        "packed_sequence_mask_function")
# the closure variables hf/masks.py reads, per kind
MASK_CELLS = {"sliding_window": "sliding_window", "sliding_window_bidirectional": "sliding_window",
              "and": "mask_functions", "or": "mask_functions", "chunked attention": "chunk_size",
              "bidirectional blocks (blockwise_overlay, e.g. image tokens)": "block_sequence_ids"}


def mask_block_code(name: str):
    """The code object shared by the closures ``masking_utils.<name>`` makes (the function's own for
    a plain mask function); None where this transformers has no such block."""
    from transformers import masking_utils as mu

    block = getattr(mu, name, None)
    if block is None:
        return None
    make, _ = MASK_BLOCKS[name]
    return function_code(block if make is None else block(*make(mu)))


@functools.cache
def mask_blocks() -> dict:
    """code object -> kind (a :data:`MASK_BLOCKS` meaning) of every block this transformers has."""
    blocks = {mask_block_code(name): kind for name, (_, kind) in MASK_BLOCKS.items()}
    blocks.pop(None, None)
    return blocks


def function_code(function):
    """The code object of a mask function (None for an object that is not a Python function)."""
    return getattr(function, "__code__", None)


def closure_cells(function) -> dict:
    """The variables a mask closure captured, by name (``sliding_window``, ``mask_functions``, ...)."""
    return inspect.getclosurevars(function).nonlocals


# ---- attention implementation (prefix_kernels.hf.model / routing / legacy) ---------------------
def attn_implementation(config) -> str | None:
    """The attention implementation a (sub)config routes to (``config._attn_implementation``)."""
    return config._attn_implementation


def set_attn_implementation_field(config, implementation: str) -> None:
    """Sets the implementation ``config._attn_implementation`` reads, without transformers' checks
    (``set_attn_implementation`` refuses models that compute attention by hand, whose modules
    :mod:`prefix_kernels.hf.legacy` replaces): the field behind that property."""
    config._attn_implementation_internal = implementation


def routes_attention_through_interface(model_or_class) -> bool:
    """Whether a model class's modeling code calls ``ALL_ATTENTION_FUNCTIONS.get_interface`` (transformers'
    own test, ``_can_set_attn_implementation``; a class without it is taken to route, as before it
    existed)."""
    can_set = getattr(model_or_class, "_can_set_attn_implementation", None)
    return True if can_set is None else bool(can_set())


# ---- forward parameters that name a feature --------------------------------------------------
def forward_parameters(module) -> tuple[str, ...]:
    """The parameter names of ``module.forward`` (empty when it has no inspectable signature)."""
    try:
        return tuple(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return ()


def takes_keyword_arguments(module) -> bool:
    """Whether ``module.forward`` takes ``**kwargs`` (transformers' attention modules hand theirs on to
    the attention function)."""
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


# the argument by which a position embedding is told how many tokens the cache holds: its current
# name first (newer transformers), then the older one (e.g. 5.17); the same rule under either name
CACHE_LENGTH_PARAMETERS = ("cache_length", "past_key_values_length")


def cache_length_parameter(module) -> str | None:
    """The name under which a position embedding module takes the cache length (positions from it on:
    BART-likes, BERT, OPT, ...): ``cache_length``, or ``past_key_values_length`` in older transformers --
    the keyword prefix_kernels shifts by the prefix; None where the module takes neither."""
    parameters = forward_parameters(module)
    return next((name for name in CACHE_LENGTH_PARAMETERS if name in parameters), None)


def counts_positions_from_cache_length(module) -> bool:
    """Whether a position embedding module takes the cache length (:func:`cache_length_parameter`)."""
    return cache_length_parameter(module) is not None


CACHE_SLOT_OFFSETS = ("cycle_offset", "cache_offset")  # HRM's cycles, Dory's loops


def cache_slot_offsets(module) -> tuple[str, ...]:
    """The arguments by which an attention module that serves several cache slots is told its slot
    beyond ``layer_idx`` (HRM: ``cycle_offset``; Dory: ``cache_offset``)."""
    return tuple(name for name in CACHE_SLOT_OFFSETS if name in forward_parameters(module))


def attends_over_shared_kv_states(model) -> bool:
    """Whether ``model`` is an assistant (draft) model attending over its target's keys/values
    (its forward takes ``shared_kv_states``)."""
    return "shared_kv_states" in forward_parameters(model)


# ---- modules computing attention by hand (prefix_kernels.hf.legacy) ----------------------------
@functools.cache
def forward_signature(module_class) -> inspect.Signature:
    """The signature of an attention module class's ``forward`` (its arguments bound as it binds them)."""
    return inspect.signature(module_class.forward)


def modeling_function(module, name: str):
    """The module-level function ``name`` of the modeling file that defines ``module``'s class
    (``apply_rotary_pos_emb``: each file has its own copy, called as the module calls it); None if absent."""
    return getattr(sys.modules.get(type(module).__module__), name, None)


def falcon_splits_heads(attention_class) -> bool:
    """Whether ``FalconAttention`` has ``_split_heads`` (fused QKV -> query, key, value [B, N, heads, D]):
    the Falcon that computes attention by hand; the Falcon that calls the interface splits inline."""
    return callable(getattr(attention_class, "_split_heads", None))


# ---- caches (prefix_kernels.hf.probe) ----------------------------------------------------------
def cache_layer_keys_values(cache, layer: int):
    """(keys, values) that a transformers cache holds for ``layer`` (``cache.layers[i].keys``), or
    (None, None) where the cache is not layered that way."""
    layers = getattr(cache, "layers", None) or []
    cached = layers[layer] if layer < len(layers) else None
    return getattr(cached, "keys", None), getattr(cached, "values", None)
