"""Contract tests of prefix_kernels/hf/internals.py: one per read of transformers' internals, on the
installed transformers. Each assumption either holds, or the detection reports its absence (an older
release without the feature); a release that breaks one fails here with a sentence naming the
version, the assumption and the module that must learn the change.
"""

from __future__ import annotations

import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import VOCAB, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402
from prefix_kernels.hf import internals, legacy, masks, routing  # noqa: E402

VERSION = transformers.__version__


def broken(what: str, fix: str) -> str:
    return f"transformers {VERSION}: {what}: {fix}"


def _causal_lm_class(model_type: str):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    return getattr(transformers, name, None) if name else None


def _modeling_class(model_class, name: str):
    return getattr(sys.modules[model_class.__module__], name, None)


# ---- masks: closures recognised by their code objects ----------------------------------------------
def _other_arguments(mu, name):
    """Arguments other than internals' own for a second closure of the same factory."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    return {"and_masks": lambda: (mu.causal_mask_function, mu.bidirectional_mask_function),
            "or_masks": lambda: (mu.bidirectional_mask_function, mu.causal_mask_function),
            "sliding_window_overlay": lambda: (7,), "sliding_window_bidirectional_overlay": lambda: (7,),
            "chunked_overlay": lambda: (4, ids), "padding_mask_function": lambda: (ids.bool(),),
            "packed_sequence_mask_function": lambda: (ids,),
            "remap_positions_for_packed_sequence": lambda: (mu.bidirectional_mask_function, ids),
            "blockwise_overlay": lambda: (ids - 1,)}[name]()


@pytest.mark.parametrize("name", list(internals.MASK_BLOCKS))
def test_mask_closures_are_recognised_by_their_code_objects(name):
    from transformers import masking_utils as mu

    block = getattr(mu, name, None)
    if block is None:
        assert name not in internals.REQUIRED_MASK_BLOCKS, broken(
            f"masking_utils.{name} is gone", "hf/masks.py must learn what builds that mask term now")
        assert internals.mask_block_code(name) is None  # absent here (an older release): reported as absent
        return
    make, kind = internals.MASK_BLOCKS[name]
    code = internals.mask_block_code(name)
    message = broken(f"masking_utils.{name} is no longer recognised by its code object",
                     "hf/masks.py must learn the new mask closure")
    assert code is not None and internals.mask_blocks().get(code) == kind, message
    if make is not None:  # every closure of a factory shares its code object, whatever it captured
        assert internals.function_code(block(*_other_arguments(mu, name))) is code, message


@pytest.mark.parametrize("name,arguments,cell", [
    ("sliding_window_overlay", (5,), "sliding_window"),
    ("sliding_window_bidirectional_overlay", (5,), "sliding_window"),
    ("and_masks", "functions", "mask_functions"),
    ("or_masks", "functions", "mask_functions"),
    ("chunked_overlay", (4, None), "chunk_size"),
    ("blockwise_overlay", "ids", "block_sequence_ids"),
])
def test_mask_closures_hold_the_variables_masks_reads(name, arguments, cell):
    from transformers import masking_utils as mu

    block = getattr(mu, name, None)
    if block is None:
        assert name not in internals.REQUIRED_MASK_BLOCKS
        return
    if arguments == "functions":
        arguments = (mu.causal_mask_function, mu.bidirectional_mask_function)
    elif arguments == "ids":
        arguments = (torch.tensor([[-1, 0, 0]]),)
    cells = internals.closure_cells(block(*arguments))
    kind = internals.MASK_BLOCKS[name][1]
    assert internals.MASK_CELLS[kind] == cell
    want = tuple(arguments) if cell == "mask_functions" else arguments[0]
    held = cells.get(cell)
    same = held is want if isinstance(want, torch.Tensor) else held == want
    assert same, broken(f"masking_utils.{name}'s closure no longer holds {cell!r} (it holds {sorted(cells)})",
                        "hf/masks.py must read the window/parts from the new closure")


@pytest.mark.parametrize("family,window", [("llama", None), ("mistral", 4)])
def test_the_masks_models_build_are_recognised(family, window, monkeypatch):
    """The mask functions transformers hands a mask interface are made of the blocks above."""
    seen, semantics = [], masks.mask_semantics

    def recorded(mask_function, model_type):
        seen.append(mask_function)
        return semantics(mask_function, model_type)

    monkeypatch.setattr(masks, "mask_semantics", recorded)
    overrides = {} if window is None else {"sliding_window": window}
    try:
        wrapped = add_prefix_tuning(tiny_model(family, **overrides), 2, backend="reference")
    except NotImplementedError as exc:
        pytest.fail(broken(f"the mask a {family} model builds is not recognised ({exc})",
                           "hf/masks.py must learn the new mask closure"))
    assert seen and all(internals.function_code(f) in internals.mask_blocks() for f in seen)
    windows = {layer.sliding_window for layer in wrapped.attention_layers.values()}
    assert windows == {window}, broken(f"a {family} model's mask reads as windows {windows}, not {window}",
                                       "hf/masks.py must read the window from the new mask closure")


# ---- the attention implementation ---------------------------------------------------------------------
def test_attn_implementation_is_read_and_set_through_the_config():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model = tiny_model("llama")
    model.set_attn_implementation("eager")
    assert internals.attn_implementation(model.config) == "eager", broken(
        "config._attn_implementation does not say what set_attn_implementation set",
        "hf/internals.py must read the implementation elsewhere")
    calls = []

    def attention(module, query, key, value, attention_mask, **kwargs):
        calls.append(module)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("pk_contract", attention)
    AttentionMaskInterface.register("pk_contract", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    internals.set_attn_implementation_field(model.config, "pk_contract")
    assert internals.attn_implementation(model.config) == "pk_contract", broken(
        "config._attn_implementation_internal is no longer the field behind config._attn_implementation",
        "hf/legacy.py must route hand-computing families another way")
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert calls, broken("the modules no longer call the function named by config._attn_implementation_internal",
                         "hf/internals.py must set the implementation another way")


def test_routing_through_the_interface_is_detected():
    assert internals.routes_attention_through_interface(transformers.LlamaForCausalLM), broken(
        "_can_set_attn_implementation no longer says that Llama routes attention through the AttentionInterface",
        "hf/internals.py must find the new test")


@pytest.mark.parametrize("model_type", sorted(legacy.FAMILIES))
def test_routing_detection_agrees_with_the_hand_computing_families_code(model_type):
    """For every family hf/legacy.py serves, the detection says what its attention modules do: call
    the interface (the normal path) or compute attention by hand (the legacy forward)."""
    model_class = _causal_lm_class(model_type)
    if model_class is None:
        pytest.skip(f"transformers {VERSION} has no {model_type} causal LM")
    (attention_name,) = legacy.FAMILIES[model_type]
    attention = _modeling_class(model_class, attention_name)
    assert attention is not None, broken(f"{model_type}'s modeling file has no {attention_name}",
                                         "hf/legacy.py must learn the new module class")
    calls_interface = "ALL_ATTENTION_FUNCTIONS" in attention.forward.__code__.co_names
    assert internals.routes_attention_through_interface(model_class) == calls_interface, broken(
        f"_can_set_attn_implementation of {model_class.__name__} says {not calls_interface} while "
        f"{attention_name}.forward {'calls' if calls_interface else 'does not call'} ALL_ATTENTION_FUNCTIONS",
        "hf/legacy.py must decide the path from the module's own code")


# ---- forward parameters that name a feature ---------------------------------------------------------
def test_cache_length_embeddings_count_positions_from_it():
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16,
                                     decoder_ffn_dim=16, max_position_embeddings=32)
    model = transformers.BartForCausalLM(config).eval()
    embedding = model.model.decoder.embed_positions
    found = routing.cache_length_position_modules(model)
    name = internals.cache_length_parameter(embedding)
    assert name is not None, broken(
        f"{type(embedding).__name__}.forward takes none of {internals.CACHE_LENGTH_PARAMETERS}",
        "hf/internals.py must learn the new name of the cache length (or hf/routing.py another way to shift)")
    assert embedding in found
    ids = torch.ones(1, 7, dtype=torch.long)
    with torch.no_grad():
        whole, shifted = embedding(ids), embedding(ids[:, 4:], **{name: 4})
    assert torch.equal(shifted, whole[:, 4:]), broken(
        f"{type(embedding).__name__}({name}=k) no longer counts positions from k",
        "hf/routing.py must shift positions another way")


@pytest.mark.parametrize("model_type,attention_name,offset", [("hrm_text", "HrmTextAttention", "cycle_offset"),
                                                              ("dory", "DoryAttention", "cache_offset")])
def test_modules_serving_several_cache_slots_are_told_their_offset(model_type, attention_name, offset):
    model_class = _causal_lm_class(model_type)
    attention = _modeling_class(model_class, attention_name) if model_class is not None else None
    if attention is None:
        pytest.skip(f"transformers {VERSION} has no {attention_name}")
    assert internals.cache_slot_offsets(attention) == (offset,), broken(
        f"{attention_name}.forward no longer takes {offset}", "hf/routing.py must learn how it names its cache slot")


@pytest.mark.parametrize("model_type,attention_name", [("nemotron", "NemotronAttention"), ("bart", "BartAttention"),
                                                        ("hrm_text", "HrmTextAttention"), ("dory", "DoryAttention")])
def test_attention_modules_take_the_keyword_arguments_hooks_hand_them(model_type, attention_name):
    """Nemotron's layers drop keyword arguments, a BART encoder runs alone in generate(), HRM / Dory
    are told their cache slot: each attention module gets prefix_kernels' arguments by a pre-hook and
    hands its **kwargs on to the attention function."""
    model_class = _causal_lm_class(model_type)
    attention = _modeling_class(model_class, attention_name) if model_class is not None else None
    if attention is None:
        pytest.skip(f"transformers {VERSION} has no {attention_name}")
    assert internals.takes_keyword_arguments(attention), broken(
        f"{attention_name}.forward no longer takes **kwargs", "hf/calls.py must hand the prefix over another way")
    assert not internals.takes_keyword_arguments(torch.nn.Linear)


def test_assistant_models_are_recognised_by_shared_kv_states():
    assistant = getattr(transformers, "Gemma4AssistantForCausalLM", None)
    if assistant is None:
        pytest.skip(f"transformers {VERSION} has no Gemma4AssistantForCausalLM")
    assert internals.attends_over_shared_kv_states(assistant), broken(
        "Gemma4AssistantForCausalLM.forward no longer takes shared_kv_states",
        "hf/model.py must recognise draft models another way")
    assert not internals.attends_over_shared_kv_states(transformers.LlamaForCausalLM)


# ---- modules computing attention by hand -------------------------------------------------------------
# what each legacy forward reads from the module's arguments, by name (the cache: either name, or **kwargs)
_LEGACY_ARGUMENTS = {
    "bert": ("hidden_states", "attention_mask", "encoder_hidden_states"),
    "bart": ("hidden_states", "attention_mask", "key_value_states"),
    "gpt_neo": ("hidden_states", "attention_mask", "layer_past"),
    "gpt_neox_japanese": ("hidden_states", "attention_mask", "layer_past", "position_embeddings"),
    "falcon": ("hidden_states", "attention_mask", "layer_past", "position_embeddings"),
}


@pytest.mark.parametrize("model_type", sorted(legacy.FAMILIES))
def test_hand_computing_modules_name_the_arguments_legacy_reads(model_type):
    model_class = _causal_lm_class(model_type)
    if model_class is None:
        pytest.skip(f"transformers {VERSION} has no {model_type} causal LM")
    if internals.routes_attention_through_interface(model_class):
        return  # served by the normal path: the legacy forward is not used
    ((attention_name, kind),) = legacy.FAMILIES[model_type].items()
    parameters = internals.forward_signature(_modeling_class(model_class, attention_name)).parameters
    missing = [name for name in _LEGACY_ARGUMENTS[kind] if name not in parameters]
    takes_cache = {"cache", "past_key_values", "layer_past", "kwargs"} & set(parameters)
    assert not missing and takes_cache, broken(
        f"{attention_name}.forward no longer takes {missing or 'a cache'} (it takes {list(parameters)})",
        "hf/legacy.py must read the new argument names")


@pytest.mark.parametrize("model_type", ["gpt_neox_japanese", "falcon"])
def test_rotary_functions_are_found_in_the_modules_modeling_file(model_type):
    model_class = _causal_lm_class(model_type)
    if model_class is None:
        pytest.skip(f"transformers {VERSION} has no {model_type} causal LM")
    if internals.routes_attention_through_interface(model_class):
        return  # served by the normal path: the module applies its rotary itself
    (attention_name,) = legacy.FAMILIES[model_type]
    module = object.__new__(_modeling_class(model_class, attention_name))  # only its class is read
    rotate = internals.modeling_function(module, "apply_rotary_pos_emb")
    assert callable(rotate), broken(f"{model_class.__module__} has no apply_rotary_pos_emb",
                                    "hf/legacy.py must learn where its rotary went")
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    angle = torch.randn(1, 3, 2).repeat(1, 1, 2)
    rotated_q, rotated_k = rotate(q, k, angle.cos(), angle.sin())
    want_q = q * angle.cos()[:, None] + torch.cat((-q[..., 2:], q[..., :2]), -1) * angle.sin()[:, None]
    assert rotated_k.shape == k.shape and torch.allclose(rotated_q, want_q), broken(
        f"{model_class.__module__}.apply_rotary_pos_emb(q, k, cos, sin) no longer rotates as before",
        "hf/legacy.py must call the new rotary")


@pytest.mark.parametrize("overrides", [{}, {"new_decoder_architecture": True, "num_kv_heads": 2},
                                       {"multi_query": False, "num_kv_heads": 4}])
def test_falcon_either_calls_the_interface_or_splits_heads_by_hand(overrides):
    """Falcon's path is decided by these two detections; one of them must hold, and the hand path's
    ``_split_heads`` must give what the legacy forward reshapes."""
    attention = _modeling_class(transformers.FalconForCausalLM, "FalconAttention")
    routes = internals.routes_attention_through_interface(transformers.FalconForCausalLM)
    splits = internals.falcon_splits_heads(attention)
    assert routes or splits, broken("FalconAttention neither calls the AttentionInterface nor has _split_heads",
                                    "hf/legacy.py must learn its new QKV layout")
    if routes:
        return
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                       **overrides)
    module = attention(config, layer_idx=0)
    heads = module.num_heads if module.new_decoder_architecture else module.num_kv_heads
    parts = module._split_heads(torch.randn(2, 5, module.query_key_value.out_features))
    shapes = [tuple(p.shape) for p in parts]
    assert shapes == [(2, 5, 4, 8), (2, 5, heads, 8), (2, 5, heads, 8)], broken(
            f"FalconAttention._split_heads gives shapes {shapes}, not [B, N, heads, D] query, key, value",
            "hf/legacy.py must learn its new QKV layout")


# ---- caches ---------------------------------------------------------------------------------------------
def test_cache_layers_hold_the_keys_and_values_attention_saw(monkeypatch):
    from prefix_kernels.hf import compat

    model = tiny_model("llama")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = compat.output_cache(out)
    keys, values = internals.cache_layer_keys_values(cache, 1)
    want = (1, model.config.num_key_value_heads, 4, model.config.head_dim)
    assert isinstance(keys, torch.Tensor) and tuple(keys.shape) == tuple(values.shape) == want, broken(
        f"{type(cache).__name__}.layers[i].keys / .values are no longer the layer's [B, Hkv, N, D] keys and values",
        "hf/probe.py must read repeated kv heads (JetMoE) another way")
    assert internals.cache_layer_keys_values(None, 0) == (None, None)


# ---- the API renames of hf/compat.py, detected the same way -----------------------------------------------
def test_the_cache_name_detected_is_the_one_the_model_takes_and_returns():
    from prefix_kernels.hf import compat

    model = tiny_model("llama")
    name = compat.cache_name(model)
    assert name in internals.forward_parameters(model)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        step = model(input_ids=torch.tensor([[4]]), use_cache=True, **{name: compat.output_cache(out)})
    assert compat.output_cache(step).get_seq_length() == 4, broken(
        f"the cache passed as {name!r} and read from the output's declared field does not carry on",
        "hf/compat.py must learn the new cache API")
