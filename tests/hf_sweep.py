"""Every causal-LM architecture of the installed transformers, as a tiny random model, through the
drop-in -- against PEFT prefix tuning where PEFT works, else against an independent reference.

Per architecture (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``): a tiny config (2 layers, hidden 64, 4 heads /
2 kv heads, vocab 100, a mix of layer kinds), a seeded fp32 model, P = 5 virtual tokens.

- PEFT route: ``peft.get_peft_model`` with random prefix values, saved with ``save_pretrained`` and
  loaded into ours with ``prefix_kernels.from_peft_adapter``. Compared on a padded batch (full,
  right-padded, left-padded rows; both get position_ids counted over the mask): logits at valid
  positions, loss, prefix gradients, and greedy tokens of our ``generate`` against greedy decoding
  by full forwards of PEFT (PEFT's own ``generate`` drops the prefix under transformers 5.x); and
  the logits of a right-padded batch without position_ids (each side's default positions).
- Where PEFT fails, a reference built without prefix_kernels:
  ``cache``: our prefix values written by hand into the model's own ``DynamicCache`` (per layer, per
  row; the layout is PEFT's, per layer ``[Hkv * Dk]`` keys then ``[Hkv * Dv]`` values, with the shapes
  read from the base model's own cache; recurrent/SSM states start empty), mask with P ones in
  front, positions shifted by P, the base model's eager attention -- what PEFT does, rebuilt;
  ``text``: where the cache cannot hold it, ``add_prefix_tuning(init=<P token ids>)`` against the
  base model reading those tokens first (eager; a right-padded batch, default positions on both
  sides): exact logits for pure attention models; for hybrids (recurrent/SSM layers do not see a
  prefix) only the hidden states before the first non-attention layer are exact, and only those
  are compared.
- ``--window``: configs with ``sliding_window`` get a window of 4 on 10 tokens (and a mix of sliding
  and full layers where the model has both), chunked attention chunks of 4. Our prefix stays
  visible under the window (PEFT's falls out of it: it sits in the cache's first slots), so those
  are compared against the same references with the model's own mask functions (causal, window,
  chunks, padding, per layer kind) or'ed with "the first P slots are visible to later queries"
  (``prefix_always_visible``).
- MusicGen's decoders (``[B * codebooks, N]`` ids, attention batch B) take their own route: the
  ``cache`` reference with codebook batches, logits and prefix gradients (``codebook_route``).
- Also, wherever a route matched: ``init=<P token ids>`` against the text read first (the ``text``
  reference). PEFT counts as working only where its prefix changes the logits and two identical
  calls agree; the tiny base model must run the padded batch itself (else ``harness_error``).

Classes: match_peft, match_reference, refused (add_prefix_tuning / from_peft_adapter raised
NotImplementedError/ValueError naming the model type), refused_late (the same at forward/generate),
mismatch, crash (any other exception, or a refusal not naming the model type), harness_error (no
tiny model or no reference could be built).

    python tests/hf_sweep.py [--only llama,gpt2] [--window] [--out tests/hf_sweep] [--jobs 2]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py: the Triton backend runs on CPU
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from tiny_models import padded_batch, positions  # noqa: E402

P = 5
VOCAB = 100
LENGTH = 9
WINDOW, WINDOW_LENGTH = 4, 10
GEN_STEPS = 4
LOGITS_RTOL, GRAD_RTOL = 1e-5, 1e-4
TIMEOUT_S = 180
CLASSES = ("match_peft", "match_reference", "refused", "refused_late", "mismatch", "crash", "harness_error")
OK_CLASSES = ("match_peft", "match_reference", "refused")
CODEBOOK_MODELS = ("musicgen", "musicgen_melody")  # decoders of audio codebooks, not of text

# ---- tiny configs ------------------------------------------------------------------------------

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers",
           "num_decoder_layers", "num_encoder_layers")
_FIXED = {
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "n_embed", "word_embed_proj_dim"), 64),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "encoder_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"), 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "decoder_ffn_dim", "encoder_ffn_dim",
                     "ffn_hidden_size", "d_ff", "ff_dim"), 128),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"), 256),
    "vocab_size": VOCAB, "head_dim": 16, "kv_channels": 16, "adapter_in_dim": 64, "adapter_out_dim": 64,
    "adapter_input_size": 64,
    # MoE
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "num_selected_experts"), 2),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group", "num_expert_group"), 1),
    "num_experts_per_token": 2,
    "first_k_dense_replace": 1,
    # MLA: query/key head dim (16 + 8) != value head dim (16)
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "kv_lora_rank": 32, "q_lora_rank": 32,
    "qk_head_dim": 24,
    # SSM / conv / linear attention
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_n_heads", "linear_num_value_heads", "linear_num_key_heads", "mamba_num_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim", "linear_key_head_dim", "linear_value_head_dim"), 16),
    **dict.fromkeys(("mamba_n_groups", "n_groups", "mamba_ngroups"), 1),
    "mamba_expand": 1, "expand": 1, "mamba_chunk_size": 16, "chunk_size": 16, "mamba_d_ssm": 64,
    # Token ids valid for the tiny vocabulary
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
}
# an assistant shares every layer's K/V with its target model (0: all layers, as its config demands)
_GEMMA4_ASSISTANT = {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0,
                                     "enable_moe_block": False, "use_double_wide_mlp": False,
                                     "num_kv_shared_layers": 0}}
# the odd ones: config kwargs applied after the generic shrink (a dict for a sub-config updates it)
OVERRIDES: dict[str, dict] = {
    "cohere_compass_text": {"rope_parameters": {kind: {"rope_type": "default", "rope_theta": 10000.0}
                                                for kind in ("full_attention", "sliding_attention")}},
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma4_assistant": _GEMMA4_ASSISTANT,
    "gemma4_unified_assistant": _GEMMA4_ASSISTANT,
    "dbrx": {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    "bamba": {"attn_layer_indices": [0]},
    "granitemoehybrid": {"layer_types": ["attention", "mamba"]},
    "recurrent_gemma": {"block_types": ["attention", "recurrent"]},
    "dots3_note": {"text_config": {"num_key_value_heads": 4, "head_dim": 24}},
    "dots3_note_text": {"num_key_value_heads": 4, "head_dim": 24},
    "lfm2_moe": {"layer_types": ["full_attention", "conv"], "num_dense_layers": 1},
    "qwen4_exp": {"text_config": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                                  "indexer_budget": 4, "indexer_compress_ratio": 2}},
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 4,
                       "indexer_compress_ratio": 2},
    "zaya": {"num_experts_per_tok": 1},
    # zamba ties one shared attention block over its hybrid layers: it needs two of them
    "zamba": {"num_hidden_layers": 3, "attention_hidden_size": 128, "attention_head_dim": 32,
              "attn_layer_period": 2, "attn_layer_offset": 0,
              "layers_block_type": ["hybrid", "linear_attention", "hybrid"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 2, "expert_layer_offset": 1},
    "nemotron_h": {"layers_block_type": ["full_attention", "linear_attention"]},
    # dory: input / looped / output layers; its config interleaves "mlp" entries into layer_types
    "dory": {"layer_types": ["sliding_attention", "mlp", "full_attention", "mlp"], "num_hidden_layers": 4,
             "n_input_layers": 2, "n_recurrent_layers": 2, "n_output_layers": 0},
    "reformer": {"is_decoder": True, "axial_pos_embds": False},
    "big_bird": {"attention_type": "original_full"},  # its block-sparse attention is refused (tested apart)
    "xlstm": {"qk_dim_factor": 1.0},
    "blt": {"encoder_hash_byte_group_vocab": 64},
    "kolibri1_1": {"index_num_heads": 2, "index_topk": 4, "index_pool_size": 16, "index_compression": 2,
                   "index_num_local_tokens": 2, "index_num_sink_tokens": 1},  # 500k hash embeddings: minutes to build, for a tiny model  # its native recurrent step assumes q/k and v heads of one size
}


def _mix(values, original_layers):
    """A per-layer list cut to 2 layers keeping two kinds where there are several (attention first)."""
    seq = list(values)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in seq) and len(seq) < original_layers \
            and seq == sorted(set(seq)) and seq and max(seq) < original_layers:
        kept = [i for i in seq if i < 2]  # a list of layer indices
        return kept or [1]
    first = seq[0]
    other = next((v for v in seq if v != first), None)
    mixed = [first, other] if other is not None else seq[:2]
    if other is not None and _looks_like_attention(other) and not _looks_like_attention(first):
        mixed = [other, first]
    return "".join(mixed) if isinstance(values, str) else type(values)(mixed) if isinstance(values, tuple) else mixed


def _looks_like_attention(kind) -> bool:
    text = str(kind).lower()
    return text in ("*", "a", "attn", "attention") or ("attention" in text and "linear" not in text)


def _shrink(values: dict, window: bool) -> dict:
    """Config kwargs: the generic tiny sizes applied to the fields this config has."""
    out = {}
    original_layers = next((values[k] for k in _LAYERS if isinstance(values.get(k), int)), None)
    for key, value in values.items():
        if key in _LAYERS and isinstance(value, int):
            out[key] = 2
        elif key in _FIXED and isinstance(value, list) and original_layers and len(value) == original_layers:
            out[key] = [_FIXED[key]] * 2  # per-layer sizes
        elif key in _FIXED and (value is not None or not key.endswith("_token_id")):
            out[key] = _FIXED[key]
        elif key == "per_layer_config" and isinstance(value, dict):  # {layer index: overrides}
            out[key] = {k: v for k, v in value.items() if int(k) < 2}
        elif ("dropout" in key or "pdrop" in key or key.endswith("_drop")) and isinstance(value, float):
            out[key] = 0.0
        elif key.endswith("_token_id") and isinstance(value, int) and value >= VOCAB:
            out[key] = 3
        elif key.endswith("_token_id") and isinstance(value, list):
            out[key] = [v if v < VOCAB else 3 for v in value]
        elif original_layers and isinstance(value, (list, tuple)) and value and (
                len(value) == original_layers or key.endswith(("_layers", "_layer_ids", "_idxs", "_indices"))):
            out[key] = _mix(value, original_layers)
        elif original_layers and isinstance(value, str) and "pattern" in key and len(value) == original_layers:
            out[key] = _mix(value, original_layers)
    if values.get("kv_lora_rank"):  # MLA: one latent K/V, as many K/V heads as query heads; rotary on qk_rope
        out["num_key_value_heads"] = _FIXED["num_attention_heads"]
        if "head_dim" in values:
            out["head_dim"] = _FIXED["qk_rope_head_dim"]
    if "is_decoder" in values:  # BERT-family LM heads are causal language models only as decoders
        out["is_decoder"] = True
    if values.get("rotary_dim"):
        out["rotary_dim"] = 8  # GPT-J, CodeGen: rotary part of the head dim (16)
    for key in ("sliding_window", "sliding_window_size"):
        if key in values:
            out[key] = WINDOW if window else 64
    if "sliding_window" in values:
        if "use_sliding_window" in values:
            out["use_sliding_window"] = window
        if "max_window_layers" in values:
            out["max_window_layers"] = 1
    if values.get("attention_chunk_size"):  # chunked attention (Llama 4): chunks as long as the window
        out["attention_chunk_size"] = WINDOW if window else 64
    if "layer_types" in values and ("use_sliding_window" in values or "max_window_layers" in values):
        out["layer_types"] = None  # derived from the window fields above: regenerated by the config
    return out


def tiny_config(model_type: str, window: bool = False):
    """The tiny config of ``model_type`` (text config and every sub-config shrunk)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    sub_names = getattr(cls, "sub_configs", {}) or {}
    override = OVERRIDES.get(model_type, {})
    config_type = model_type
    try:
        defaults = cls()
    except Exception:  # noqa: BLE001 -- a few defaults do not validate without their sub-config overrides
        try:
            defaults = cls(**{k: v for k, v in override.items() if k in sub_names})
        except Exception:  # noqa: BLE001
            # a composite config without defaults (MusicGen's in 5.17: has_no_defaults_at_init): the causal
            # LM's own config (its decoder's) instead
            own = getattr(causal_lm_class(model_type), "config_class", None)
            if own is None or own is cls:
                raise
            cls, config_type, defaults = own, own.model_type, own()
            sub_names = getattr(cls, "sub_configs", {}) or {}
    kwargs = _shrink(defaults.to_dict(), window)
    subs = {}
    for name in sub_names:
        sub = getattr(defaults, name, None)
        if sub is None and isinstance(override.get(name), dict):
            # a sub-config the defaults leave empty (Gemma4's assistant text_config in 5.17): the one the
            # config builds from the override, shrunk like the others
            try:
                sub = getattr(cls(**{name: dict(override[name])}), name, None)
            except Exception:  # noqa: BLE001
                sub = None
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[name] = {**sub.to_dict(), **_shrink(sub.to_dict(), window)}
            subs[name] = sub
    for key, value in override.items():
        if key in sub_names and isinstance(kwargs.get(key), dict):
            kwargs[key].update(value)
        else:
            kwargs[key] = value
    try:
        config = AutoConfig.for_model(config_type, **kwargs)
    except ValueError as exc:
        if "unknown kwargs" not in str(exc) or not subs:
            raise
        # a sub-config that refuses the generic fields of to_dict() (DBRX's attn_config in 5.17): the
        # fields that differ from its defaults only
        for name, sub in subs.items():
            kwargs[name] = {**sub.to_diff_dict(), **_shrink(sub.to_dict(), window), **override.get(name, {})}
        config = AutoConfig.for_model(config_type, **kwargs)
    text = text_config(config)
    # derived per-layer lists (layer_types from a pattern) keep a mix of kinds
    kinds = getattr(text, "layer_types", None)
    full = getattr(text_config(defaults), "layer_types", None)
    if kinds is not None and full is not None and len(set(kinds)) == 1 < len(set(full)) and len(kinds) == 2:
        try:
            text.layer_types = _mix(full, len(full))
        except AttributeError:  # derived (a property): the override dict sets its inputs
            pass
    return _causal_lm_config(model_type, config)


def _causal_lm_config(model_type, config):
    """The config the causal-LM class takes: a sub-config for some (musicgen's decoder)."""
    wanted = getattr(causal_lm_class(model_type), "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for name in getattr(config, "sub_configs", {}) or {}:
        if isinstance(getattr(config, name, None), wanted):
            return getattr(config, name)
    return config


# ---- models and inputs -------------------------------------------------------------------------

def text_config(config):
    """The decoder's text config (musicgen has a text encoder too)."""
    try:
        return config.get_text_config(decoder=True)
    except TypeError:
        return config.get_text_config()


def causal_lm_class(model_type):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


def build_model(model_type, config, seed=0):
    """The mapping's causal-LM class, seeded, fp32, eval, eager attention where it has one."""
    cls = causal_lm_class(model_type)
    torch.manual_seed(seed)
    try:
        model = cls._from_config(config, attn_implementation="eager")
    except ValueError:
        torch.manual_seed(seed)
        model = cls._from_config(config)
    if hasattr(model, "set_default_language"):  # xmod: one adapter per language, pick the first
        model.set_default_language(config.languages[0])
    return model.float().eval()


def cache_argument(model) -> str:
    """The forward's name for the KV cache: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The cache under whichever name the output class declares (reading a deprecated alias warns)."""
    declared = getattr(output, "__dataclass_fields__", {})
    return next((getattr(output, n) for n in ("cache", "past_key_values") if n in declared), None)


def takes_position_ids(model) -> bool:
    return "position_ids" in inspect.signature(model.forward).parameters


def inputs(model, window: bool):
    """(ids, mask, with_positions, note): a left-padded row only where the model takes position_ids
    (models that count positions from the cache cannot place a left-padded row)."""
    length = WINDOW_LENGTH if window else LENGTH
    if takes_position_ids(model):
        ids, mask = padded_batch(3, length, left=True)
        return ids, mask, True, ""
    ids, mask = padded_batch(3, length, left=False)
    return ids, mask, False, "no position_ids: right padding only"


def labels_for(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def rel(a, b, mask=None) -> float:
    a, b = a.detach().float(), b.detach().float()
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    scale = b.abs().max().clamp_min(1e-30)
    return ((a - b).abs().max() / scale).item()


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # "validation error ...:" then the cause
        lines = [f"{lines[0]} {lines[1]}"]
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/\w+", "<adapter dir>", lines[0][:240] if lines else "")
    return f"{type(exc).__name__}: {text}"


def no_stopping():
    """generate() arguments for GEN_STEPS greedy tokens: eos banned (min_new_tokens), nothing forced
    (BART-likes' generation configs force eos at the end): what :func:`greedy` does by full forwards."""
    return dict(max_new_tokens=GEN_STEPS, min_new_tokens=GEN_STEPS, do_sample=False, pad_token_id=0,
                forced_eos_token_id=None, forced_bos_token_id=None)


def eos_ids(model) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@torch.no_grad()
def greedy(forward, ids, banned=()):
    """Greedy tokens by full forwards (forward(ids) -> logits [B, N, V]), ``banned`` ids (eos, as
    :func:`no_stopping` bans it) never chosen."""
    for _ in range(GEN_STEPS):
        logits = forward(ids)[:, -1].clone()
        logits[:, list(banned)] = float("-inf")
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    return ids[:, -GEN_STEPS:]


# ---- the routes --------------------------------------------------------------------------------

class Refusal(Exception):
    """An exception raised by prefix_kernels, with the stage it came at."""

    def __init__(self, stage, exc):
        super().__init__(str(exc))
        self.stage, self.exc = stage, exc


def _ours_call(stage, fn):
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 -- classified by the caller
        raise Refusal(stage, exc) from exc


def run_ours(wrapped, ids, mask, with_positions, with_grad=True, hidden=False):
    """Our logits (and loss, prefix gradient) on the padded batch, given the positions PEFT is given."""
    kw = {"labels": labels_for(ids, mask), "output_hidden_states": hidden}
    if with_positions:
        kw["position_ids"] = positions(mask)
    out = _ours_call("forward", lambda: wrapped(input_ids=ids, attention_mask=mask, **kw))
    result = {"logits": out.logits.detach(), "loss": out.loss.detach(),
              "hidden": [h.detach() for h in out.hidden_states] if hidden else None}
    if with_grad:
        _ours_call("backward", lambda: out.loss.backward())
        result["grad"] = wrapped.prefix_embedding.grad[0].clone()
    return result


def run_ours_generate(wrapped, ids):
    out = _ours_call("generate", lambda: wrapped.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                          **no_stopping()))
    return out[:, -GEN_STEPS:]


def peft_route(base, tmp):
    """PEFT's prefix-tuning model of a copy of ``base`` with seeded random prefix values, saved to ``tmp``."""
    import peft

    model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=P))
    embedding = model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(7)))
    model.save_pretrained(tmp)
    return model, embedding


def peft_outputs(model, embedding, base, ids, mask, with_positions, gen_ids):
    """PEFT's logits, loss, prefix gradient, greedy tokens (by full forwards) and logits of a right-padded
    batch without position_ids; raises where PEFT's prefix has no effect or its outputs are not repeatable."""
    pos = {"position_ids": positions(mask)} if with_positions else {}
    out = model(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask), **pos)
    _check_prefix_has_effect(out.logits, base, ids, mask, with_positions)
    with torch.no_grad():
        again = model(input_ids=ids, attention_mask=mask, **pos).logits
    if rel(again, out.logits, mask) > 1e-6:  # recurrent_gemma: its blocks keep state between calls
        raise RuntimeError("PEFT's logits change from one call to the next (state kept between calls)")
    out.loss.backward()

    def forward(x):
        p = {"position_ids": torch.arange(x.shape[1])[None].expand(x.shape[0], -1)} if with_positions else {}
        return model(input_ids=x, attention_mask=torch.ones_like(x), **p).logits

    right_ids, right_mask = padded_batch(3, ids.shape[1], left=False)
    with torch.no_grad():  # no position_ids: PEFT leaves the counting to the model (from its cache length)
        default_logits = model(input_ids=right_ids, attention_mask=right_mask).logits
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grad": embedding.grad.clone(),
            "tokens": greedy(forward, gen_ids, eos_ids(base)), "default_logits": default_logits}


def _check_prefix_has_effect(logits, base, ids, mask, with_positions):
    """PEFT 'works' only where its prefix reaches the model: some models ignore the cache it passes."""
    shifts = (0, P) if with_positions else (0,)
    with torch.no_grad():
        for shift in shifts:
            kw = {"position_ids": positions(mask) + shift} if with_positions else {}
            if rel(logits, base(input_ids=ids, attention_mask=mask, **kw).logits, mask) < 1e-6:
                raise RuntimeError("PEFT's prefix has no effect: its logits equal the base model's")


def cache_layers(base, ids):
    """Per layer of the base model's own cache: (kind, (Hkv, Dk, Dv) or None); kind "attention" (K/V
    only), "hybrid" (K/V next to a recurrent state) or "recurrent" (no K/V)."""
    from transformers import cache_utils

    attention_layer = cache_utils.DynamicLayer
    recurrent_layer = getattr(cache_utils, "LinearAttentionCacheLayerMixin", ())  # transformers >= 5.2x
    with torch.no_grad():
        out = base(input_ids=ids[:1, :2], use_cache=True)
    cache = output_cache(out)
    cache = getattr(cache, "self_attention_cache", cache)  # decoders of encoder-decoder families
    layers = getattr(cache, "layers", None) or []
    result = []
    for layer in layers:
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        has_kv = isinstance(layer, attention_layer) and isinstance(keys, torch.Tensor) and keys.dim() == 4
        shape = (keys.shape[1], keys.shape[-1], values.shape[-1]) if has_kv else None
        recurrent = isinstance(layer, recurrent_layer) or not isinstance(layer, attention_layer)
        result.append(("hybrid" if has_kv and recurrent else "attention" if has_kv else "recurrent", shape))
    layer_count = model_layer_count(base)
    return result + [("recurrent", None)] * (layer_count - len(result))  # layers the cache holds nothing for


def model_layer_count(base) -> int:
    text = text_config(base.config)
    return next((getattr(text, k) for k in _LAYERS if isinstance(getattr(text, k, None), int)), 0)


def split_table(table, layers):
    """{layer: (k [Hkv, P, Dk], v [Hkv, P, Dv])} from [P, width] in PEFT's layout generalized: per layer,
    Hkv*Dk key then Hkv*Dv value elements -- over the K/V layers, or over every layer alike (PEFT's
    own layout, unused rows for recurrent layers)."""
    shapes = [shape for _, shape in layers]
    kv = [s for s in shapes if s is not None]
    if not kv:
        raise ValueError("no layer holds K/V")
    width = sum(h * (dk + dv) for h, dk, dv in kv)
    if table.shape[-1] != width and len(set(kv)) == 1 and table.shape[-1] == len(shapes) * width // len(kv):
        shapes = [kv[0]] * len(shapes)
        width = table.shape[-1]
    if table.shape[-1] != width:
        raise ValueError(f"prefix width {table.shape[-1]} fits no layout of the cache shapes {shapes}")
    out, offset = {}, 0
    for layer, ((_, real), shape) in enumerate(zip(layers, shapes)):
        if shape is None:
            continue
        h, dk, dv = shape
        k = table[:, offset:offset + h * dk].reshape(P, h, dk).transpose(0, 1)
        v = table[:, offset + h * dk:offset + h * (dk + dv)].reshape(P, h, dv).transpose(0, 1)
        offset += h * (dk + dv)
        if real is not None:
            out[layer] = (k, v)
    return out


@contextlib.contextmanager
def prefix_always_visible(attn_implementation: str):
    """The model's own mask functions (causal, window, chunks, padding), with the first P slots -- the
    hand-written prefix, or the text read first -- visible to every later query: our prefix semantics
    under a window."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, or_masks

    original = ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation]

    # every query past the first P slots sees them; the text read first keeps the model's own mask
    def prefix_seen(batch_idx, head_idx, q_idx, kv_idx):
        return (kv_idx < P) & (q_idx >= P)

    def mask(*args, mask_function, **kwargs):
        return original(*args, mask_function=or_masks(prefix_seen, mask_function), **kwargs)

    ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation] = mask
    try:
        yield
    finally:
        ALL_MASK_ATTENTION_FUNCTIONS[attn_implementation] = original


def cache_reference(base, table, layers, ids, mask, with_positions, gen_ids, windowed=False):
    """The hand-written cache reference: logits, loss, prefix gradient, greedy tokens."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    leaf = table.detach().clone().requires_grad_(True)

    def forward(x, m, labels=None):
        # the model's own cache kinds (recurrent layers start empty), sliding layers kept whole
        cache = DynamicCache(config=base.config)
        for layer, (k, v) in split_table(leaf, layers).items():
            if layer >= len(cache.layers):
                cache.layers.append(DynamicLayer())
            if type(cache.layers[layer]) is DynamicSlidingWindowLayer:
                cache.layers[layer] = DynamicLayer()
            cache.layers[layer].update(k[None].expand(x.shape[0], -1, -1, -1), v[None].expand(x.shape[0], -1, -1, -1))
        kw = {"position_ids": positions(m) + P} if with_positions else {}
        attn = torch.cat([torch.ones(x.shape[0], P, dtype=m.dtype), m], 1)
        visible = prefix_always_visible(base.config._attn_implementation) if windowed else contextlib.nullcontext()
        with visible:
            return base(input_ids=x, attention_mask=attn, labels=labels, **{cache_argument(base): cache}, **kw)

    out = forward(ids, mask, labels_for(ids, mask))
    out.loss.backward()
    with torch.no_grad():
        tokens = greedy(lambda x: forward(x, torch.ones_like(x)).logits, gen_ids, eos_ids(base))
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grad": leaf.grad.clone(), "tokens": tokens}


def text_reference(base, text_ids, ids, mask, with_positions, hidden, windowed=False):
    """The base model reading the P text tokens first, then the batch (eager attention): the two read
    together, the text in the first P slots; where the text then sees the batch (its logits differ
    from the text's read alone: a decoder that attends both ways, as the BERT-like causal LMs of
    transformers 5.17 do), the text goes through the model's own KV cache first instead -- what a
    prefix is, keys/values the batch reads that were computed without it."""
    b = ids.shape[0]
    full_ids = torch.cat([text_ids[None].expand(b, -1), ids], 1)
    full_mask = torch.cat([torch.ones(b, P, dtype=mask.dtype), mask], 1)
    kw = {}
    if with_positions:
        kw["position_ids"] = torch.cat([torch.arange(P)[None].expand(b, -1), positions(mask) + P], 1)
    visible = prefix_always_visible(base.config._attn_implementation) if windowed else contextlib.nullcontext()
    with torch.no_grad(), visible:  # the text sits in the first P slots, as the prefix does
        out = base(input_ids=full_ids, attention_mask=full_mask, output_hidden_states=hidden, **kw)
    together = {"logits": out.logits[:, P:], "hidden": [h[:, P:] for h in out.hidden_states] if hidden else None}
    if windowed:  # under a window the text stays visible through the mask (a sliding cache would drop it)
        return together
    with torch.no_grad():
        first = base(input_ids=full_ids[:, :P], attention_mask=full_mask[:, :P], use_cache=True,
                     **{k: v[:, :P] for k, v in kw.items()})
    cache = output_cache(first)
    if cache is None or torch.allclose(first.logits, out.logits[:, :P], rtol=1e-5, atol=1e-6):
        return together
    with torch.no_grad():
        out = base(input_ids=ids, attention_mask=full_mask, output_hidden_states=hidden,
                   **{cache_argument(base): cache}, **{k: v[:, P:] for k, v in kw.items()})
    return {"logits": out.logits, "hidden": list(out.hidden_states) if hidden else None}


# ---- one architecture --------------------------------------------------------------------------

def _names_model(message: str, model_types) -> bool:
    return any(t and t in message for t in model_types)


def _compare(ours, ref, mask, tokens=None, ref_tokens=None):
    diffs = {"logits": rel(ours["logits"], ref["logits"], mask)}
    if "loss" in ref:
        diffs["loss"] = rel(ours["loss"], ref["loss"])
    if "grad" in ref:
        diffs["grad"] = rel(ours["grad"], ref["grad"])
    if ref_tokens is not None:
        diffs["generate_tokens_differ"] = int((tokens != ref_tokens).sum())
    bad = []
    if not diffs["logits"] <= LOGITS_RTOL:
        bad.append(f"logits rel {diffs['logits']:.2e}")
    if not diffs.get("loss", 0) <= LOGITS_RTOL:
        bad.append(f"loss rel {diffs['loss']:.2e}")
    if not diffs.get("grad", 0) <= GRAD_RTOL:
        bad.append(f"prefix grad rel {diffs['grad']:.2e}")
    if diffs.get("generate_tokens_differ"):
        bad.append(f"{diffs['generate_tokens_differ']} generated tokens differ")
    return diffs, bad


def run_arch(model_type: str, window: bool = False) -> dict:
    """One architecture's record (never raises)."""
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    record = {"model_type": model_type, "window": window, "class": None, "detail": "", "reference": None,
              "peft": None, "diffs": {}}
    try:
        _run_arch(model_type, window, record)
    except Refusal as r:
        names = _names_model(str(r.exc), record.get("_names", [model_type]))
        if r.stage in ("wrap", "init") and isinstance(r.exc, (NotImplementedError, ValueError)) and names:
            record["class"] = "refused"
        elif isinstance(r.exc, (NotImplementedError, ValueError)) and names:
            record["class"] = "refused_late"
        else:
            record["class"] = "crash"
        record["detail"] = f"{r.stage}: {first_line(r.exc)}"
        record["where"] = _where(r.exc)
    except HarnessError as e:
        record["class"], record["detail"] = "harness_error", str(e)
    except Exception as exc:  # noqa: BLE001 -- a bug of the harness itself shows as one
        record["class"], record["detail"] = "harness_error", f"harness: {first_line(exc)}"
        record["where"] = _where(exc)
    record.pop("_names", None)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _where(exc) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-1:-4:-1])


class HarnessError(Exception):
    pass


# the start of a harness error saying that no tiny model could be built or run by itself here (the
# model's own code or a missing optional dependency): the architecture is not tested, not failed
NO_TINY_MODEL = ("tiny model:", "the tiny base model itself fails:")


def _run_arch(model_type, window, record):
    base, text_cfg = _tiny_model(model_type, window, record)
    if model_type in CODEBOOK_MODELS:
        return codebook_route(record, base, text_cfg)
    windowed = record["windowed"] = window and WINDOW in (getattr(text_cfg, "sliding_window", None),
                                                          getattr(text_cfg, "attention_chunk_size", None))
    ids, mask, with_positions, note = inputs(base, window)
    gen_ids = ids[:, :6].clone()
    notes = [note] if note else []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            peft_model, embedding = peft_route(base, tmp)
            peft_ref = peft_outputs(peft_model, embedding, base, ids, mask, with_positions, gen_ids)
            record["peft"] = "works"
        except Exception as exc:  # noqa: BLE001
            peft_ref, record["peft"] = None, f"fails: {first_line(exc)}"
        wrapped = _wrap(base, tmp, peft_works=peft_ref is not None, notes=notes)
    ours = run_ours(wrapped, ids, mask, with_positions)
    tokens = run_ours_generate(wrapped, gen_ids)
    layers = cache_layers(base, ids)

    if peft_ref is not None and not windowed:
        record["reference"] = "peft"
        diffs, bad = _compare(ours, peft_ref, mask, tokens, peft_ref["tokens"])
        _generation_check(base, wrapped, gen_ids, peft_ref["tokens"], diffs, bad, notes)
        if with_positions:  # each side's own default positions
            right_ids, right_mask = padded_batch(3, ids.shape[1], left=False)
            with torch.no_grad():
                got = _ours_call("forward", lambda: wrapped(input_ids=right_ids, attention_mask=right_mask).logits)
            diffs["default_positions_logits"] = d = rel(got, peft_ref["default_logits"], right_mask)
            if not d <= LOGITS_RTOL:
                bad.append(f"without position_ids (right padding): logits rel {d:.2e}")
        _with_init_check(record, base, ids.shape[1], layers, windowed, bad, notes, diffs)
        return _finish(record, "match_peft", diffs, bad, notes)

    why = "no layer of the model's cache holds K/V"
    if any(shape is not None for _, shape in layers):
        try:
            ref = cache_reference(base, wrapped.prefix_embedding[0].detach(), layers, ids, mask, with_positions,
                                  gen_ids, windowed)
        except Exception as exc:  # noqa: BLE001
            why = f"cache reference: {first_line(exc)}"
        else:
            record["reference"] = "window cache" if windowed else "cache"
            diffs, bad = _compare(ours, ref, mask, tokens, ref["tokens"])
            _generation_check(base, wrapped, gen_ids, ref["tokens"], diffs, bad, notes)
            kinds = sorted({kind for kind, _ in layers} - {"attention"})
            notes.append(f"reference: prefix written into the model's DynamicCache"
                         f"{', always visible under the mask' if windowed else ''}"
                         + (f" ({'/'.join(kinds)} layers start empty)" if kinds else ""))
            _with_init_check(record, base, ids.shape[1], layers, windowed, bad, notes, diffs)
            return _finish(record, "match_reference", diffs, bad, notes)
    return _text_route(record, base, ids.shape[1], notes, why, layers, windowed)


def _tiny_model(model_type, window, record):
    """The tiny base model and its text config, checked to run the padded batch by itself."""
    try:
        config = tiny_config(model_type, window)
        base = build_model(model_type, config)
    except Exception as exc:  # noqa: BLE001
        raise HarnessError(f"{NO_TINY_MODEL[0]} {first_line(exc)}") from exc
    text_cfg = text_config(config)
    record["_names"] = [model_type, config.model_type, text_cfg.model_type]
    record["arch"] = type(base).__name__
    if model_type in CODEBOOK_MODELS:
        return base, text_cfg  # its batches are built by codebook_route
    ids, mask, _, _ = inputs(base, window)
    try:
        with torch.no_grad():
            base(input_ids=ids, attention_mask=mask)
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, ValueError):  # a model that refuses to run alone (an assistant): may be refused clearly
            _refused_anyway(base)
        raise HarnessError(f"{NO_TINY_MODEL[1]} {first_line(exc)}") from exc
    return base, text_cfg


def _refused_anyway(base) -> None:
    """Raises the Refusal where add_prefix_tuning refuses ``base`` with NotImplementedError (classified
    like any refusal: it must name the model type); returns where it does not."""
    import prefix_kernels

    try:
        prefix_kernels.add_prefix_tuning(copy.deepcopy(base), P)
    except NotImplementedError as exc:
        raise Refusal("wrap", exc) from exc
    except Exception:  # noqa: BLE001 -- not a refusal: the harness error stands
        return


def _wrap(base, adapter_dir, peft_works, notes):
    """Ours on a copy of ``base``: from PEFT's adapter (the interop path), else add_prefix_tuning with
    the same seeded random values."""
    import prefix_kernels

    if (Path(adapter_dir) / "adapter_model.safetensors").exists():
        try:
            return _ours_call("wrap", lambda: prefix_kernels.from_peft_adapter(copy.deepcopy(base), adapter_dir))
        except Refusal as r:
            if peft_works or not isinstance(r.exc, ValueError):
                raise
            # PEFT cannot run this model: its adapter's layout is a guess, so go on without it
            notes.append(f"from_peft_adapter refused the adapter of the PEFT that fails here: {first_line(r.exc)}")
    wrapped = _ours_call("wrap", lambda: prefix_kernels.add_prefix_tuning(copy.deepcopy(base), P))
    with torch.no_grad():
        wrapped.prefix_embedding.copy_(torch.randn(wrapped.prefix_embedding.shape,
                                                   generator=torch.Generator().manual_seed(7)))
    return wrapped


def _generation_check(base, wrapped, gen_ids, want, diffs, bad, notes) -> None:
    """When our generate() tokens differ from the reference's: say whether our greedy by full forwards
    agrees; if it does and the base model's own generate() differs from its own full forwards too
    (e.g. moshi under a window: its cache keeps a window its mask does not), the difference is the
    model's, not ours -- noted, not counted."""
    if not diffs.get("generate_tokens_differ"):
        return
    diagnosis = _generate_diagnosis(wrapped, gen_ids, want)
    if "matches" in diagnosis:
        with torch.no_grad():
            own = base.generate(input_ids=gen_ids, attention_mask=torch.ones_like(gen_ids), **no_stopping())
        by_forward = greedy(lambda x: base(input_ids=x, attention_mask=torch.ones_like(x)).logits, gen_ids,
                            eos_ids(base))
        if not torch.equal(own[:, -GEN_STEPS:], by_forward):
            bad.remove(f"{diffs['generate_tokens_differ']} generated tokens differ")
            notes.append("generate() not compared: the base model's own cached decode differs from its full "
                         "forwards (without any prefix); ours matches the reference by full forwards")
            return
    notes.append(diagnosis)


def _generate_diagnosis(wrapped, gen_ids, want) -> str:
    """Whether our greedy tokens by full forwards agree with the reference (then our cached decode differs)."""
    by_forward = greedy(lambda x: wrapped(input_ids=x, attention_mask=torch.ones_like(x)).logits, gen_ids,
                        eos_ids(wrapped.base_model))
    if torch.equal(by_forward, want):
        return "our greedy by full forwards matches: generate() (cached decode) differs"
    return "our greedy by full forwards differs too"


def _text_route(record, base, length, notes, why, layers, windowed):
    record["reference"] = "window text" if windowed else "text"
    try:
        diffs, bad, note = text_init_check(base, length, layers, windowed, why)
    except Refusal as r:
        if r.stage != "init" or not isinstance(r.exc, (NotImplementedError, ValueError)):
            raise
        raise HarnessError(f"no reference: init=<token ids> refused ({first_line(r.exc)}); {why}") from r
    return _finish(record, "match_reference", diffs, bad, notes + [f"reference: {note}"])


def text_init_check(base, length, layers, windowed, why=""):
    """``add_prefix_tuning(init=<P token ids>)`` against the base model reading those tokens first:
    (diffs, problems, what was compared), on a right-padded batch with each side's default positions
    (the model's own position rule, which the text's keys were computed with). Exact logits for pure
    attention models; for hybrids the hidden states after the leading attention layers (a recurrent
    layer's state would hold the text)."""
    import prefix_kernels

    ids, mask = padded_batch(3, length, left=False)
    text_ids = torch.randint(3, VOCAB, (P,), generator=torch.Generator().manual_seed(5))
    kinds = [kind for kind, _ in layers]
    text = text_config(base.config)
    # per-layer kinds as the model reads them: layer_types, or RecurrentGemma's layers_block_type where a
    # release has no layer_types (5.17)
    config_kinds = getattr(text, "layer_types", None) or getattr(text, "layers_block_type", None)
    if all(shape is None for _, shape in layers) and config_kinds:  # a cache of the model's own kind
        kinds = ["attention" if _looks_like_attention(k) else "recurrent" for k in config_kinds]
    leading = next((i for i, kind in enumerate(kinds) if kind != "attention"), None)
    hybrid = leading is not None
    if hybrid and leading == 0:
        raise HarnessError(f"no exact reference: layer 0 holds a recurrent state ({why})")
    wrapped = _ours_call("init", lambda: prefix_kernels.add_prefix_tuning(copy.deepcopy(base), P, init=text_ids))
    ours = run_ours(wrapped, ids, mask, with_positions=False, with_grad=False, hidden=hybrid)
    try:
        ref = text_reference(base, text_ids, ids, mask, False, hybrid, windowed)
    except Exception as exc:  # noqa: BLE001
        raise HarnessError(f"text reference: {first_line(exc)} ({why})") from exc
    what = "text-initialized prefix vs the text read first"
    if hybrid:
        diffs = {"init_hidden": rel(ours["hidden"][leading], ref["hidden"][leading], mask)}
        bad = [f"init: hidden states after layer {leading - 1} rel {diffs['init_hidden']:.2e}"] \
            if not diffs["init_hidden"] <= LOGITS_RTOL else []
        return diffs, bad, f"{what}; hybrid, so only the hidden states after the leading {leading} attention layer(s)"
    diffs = {"init_logits": rel(ours["logits"], ref["logits"], mask)}
    bad = [f"init: logits rel {diffs['init_logits']:.2e}"] if not diffs["init_logits"] <= LOGITS_RTOL else []
    return diffs, bad, what + (f" ({why})" if why else "")


def _with_init_check(record, base, length, layers, windowed, bad, notes, diffs):
    """Adds to ``diffs``/``bad``/``notes``: the text-initialized prefix (init=) against its exact reference."""
    try:
        init_diffs, init_bad, _ = text_init_check(base, length, layers, windowed)
    except Refusal as r:
        if isinstance(r.exc, (NotImplementedError, ValueError)) and _names_model(str(r.exc), record["_names"]):
            notes.append(f"init=<token ids> refused: {first_line(r.exc)}")
        else:  # a crash, unless the main comparison already found a silent mismatch
            notes.insert(0, f"init=<token ids> crashes: {r.stage}: {first_line(r.exc)}")
            record["where"] = _where(r.exc)
            record["_init_crash"] = True
    except HarnessError as e:
        notes.append(f"init=<token ids> not checked: {e}")
    else:
        diffs.update(init_diffs)
        bad += init_bad


def _finish(record, good, diffs, bad, notes):
    record["diffs"] = {k: (float(f"{v:.3g}") if isinstance(v, float) else v) for k, v in diffs.items()}
    record["class"] = "mismatch" if bad else "crash" if record.pop("_init_crash", False) else good
    record["detail"] = "; ".join(bad + notes)
    return record


def codebook_route(record, base, text_cfg):
    """MusicGen's decoders read [B * codebooks, N] ids (attention batch B) and count positions from their
    cache. PEFT sizes its cache from the id rows (B * codebooks), so it cannot run them; the reference is
    the prefix written by hand into the model's own cache (batch B, P ones in front of the mask), eager
    attention: logits and prefix gradients of a weighted sum (no greedy check: MusicGen's generate
    applies a codebook delay pattern that full forwards do not)."""
    import prefix_kernels
    from transformers import DynamicCache

    record["peft"] = "not run: PEFT's cache has B * codebooks rows, MusicGen's attention B"
    k, (b, n) = text_cfg.num_codebooks, (3, LENGTH)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b * k, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    mask[1, n - 3:] = 0
    valid = mask.bool().repeat_interleave(k, 0)  # id rows are (batch row, codebook)
    weights = torch.randn(b * k, n, text_cfg.vocab_size, generator=g)
    wrapped = _ours_call("wrap", lambda: prefix_kernels.add_prefix_tuning(copy.deepcopy(base), P))
    with torch.no_grad():
        wrapped.prefix_embedding.copy_(torch.randn(wrapped.prefix_embedding.shape,
                                                   generator=torch.Generator().manual_seed(7)))
    ours = _ours_call("forward", lambda: wrapped(input_ids=ids, attention_mask=mask).logits)
    _ours_call("backward", lambda: (ours[valid] * weights[valid]).sum().backward())
    leaf = wrapped.prefix_embedding.detach()[0].clone().requires_grad_(True)
    heads = text_cfg.num_attention_heads
    kv = leaf.view(P, 2 * text_cfg.num_hidden_layers, heads, -1).permute(1, 2, 0, 3)
    cache = DynamicCache()
    for layer in range(text_cfg.num_hidden_layers):
        cache.update(kv[2 * layer].expand(b, -1, -1, -1), kv[2 * layer + 1].expand(b, -1, -1, -1), layer)
    ref = base(input_ids=ids, attention_mask=torch.cat([torch.ones(b, P, dtype=mask.dtype), mask], 1),
               **{cache_argument(base): cache}).logits
    (ref[valid] * weights[valid]).sum().backward()
    record["reference"] = "cache"
    diffs = {"logits": rel(ours, ref, valid), "grad": rel(wrapped.prefix_embedding.grad[0], leaf.grad)}
    bad = [f"{key} rel {value:.2e}" for key, value in diffs.items()
           if not value <= (LOGITS_RTOL if key == "logits" else GRAD_RTOL)]
    notes = ["[B * codebooks, N] ids; reference: prefix written into the model's DynamicCache; generate not "
             "compared (codebook delay pattern)"]
    return _finish(record, "match_reference", diffs, bad, notes)


# ---- isolation and the sweep -------------------------------------------------------------------

def _child(model_type, window, conn):
    torch.set_num_threads(1)
    conn.send(run_arch(model_type, window))
    conn.close()


def run_isolated(model_type: str, window: bool = False, timeout: float = TIMEOUT_S) -> dict:
    """run_arch in a forked process: a hard crash or a hang becomes a record."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, window, child))
    start = time.perf_counter()
    proc.start()
    child.close()
    record = None
    if parent.poll(timeout):
        try:
            record = parent.recv()
        except EOFError:
            pass
    proc.join(5 if record is not None else 0)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if record is None:
        why = f"no result within {timeout:.0f} s" if proc.exitcode in (None, -9) else f"exit code {proc.exitcode}"
        record = {"model_type": model_type, "window": window, "class": "crash", "detail": f"process: {why}",
                  "reference": None, "peft": None, "diffs": {}, "seconds": round(time.perf_counter() - start, 2)}
    return record


def all_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def prepare() -> None:
    """Imports and the one-time C++ op build, before any fork."""
    import peft  # noqa: F401
    import transformers

    transformers.logging.set_verbosity_error()

    from prefix_kernels import cpu

    cpu.is_available()


def sweep(model_types, window=False, jobs=2, timeout=TIMEOUT_S, progress=None) -> list[dict]:
    from concurrent.futures import ThreadPoolExecutor

    prepare()
    with ThreadPoolExecutor(jobs) as pool:  # each thread waits on one forked process
        records = []
        for record in pool.map(lambda t: run_isolated(t, window, timeout), model_types):
            records.append(record)
            if progress:
                progress(record)
    return records


def versions() -> dict:
    import peft
    import transformers

    import prefix_kernels

    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent, check=False)

    try:
        sha = git("rev-parse", "--short", "HEAD").stdout.strip()
        library = Path(prefix_kernels.__file__).parent
        if sha and git("diff", "--quiet", "HEAD", "--", str(library)).returncode == 1:  # 1: differs
            sha += "+uncommitted changes in prefix_kernels/"
    except OSError:
        sha = ""
    return {"transformers": transformers.__version__, "peft": peft.__version__, "torch": torch.__version__,
            "git_sha": sha}


def write_results(records, out: Path, window: bool, seconds: float) -> None:
    meta = {**versions(), "window": window, "num_virtual_tokens": P, "seconds": round(seconds, 1)}
    found = {k: meta[k] for k in ("transformers", "peft", "torch", "git_sha")}
    rows = [{**r, "versions": found} for r in records]
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(records, meta))


def markdown(records, meta) -> str:
    counts = {c: sum(r["class"] == c for r in records) for c in CLASSES}
    title = f"with a sliding window (and chunks) of {WINDOW} on {WINDOW_LENGTH} tokens" if meta["window"] else ""
    lines = [f"# prefix_kernels on every transformers causal LM {title}".rstrip(), "",
             f"Generated by `python tests/hf_sweep.py{' --window' if meta['window'] else ''}` (transformers "
             f"{meta['transformers']}, PEFT {meta['peft']}, torch {meta['torch']}, git {meta['git_sha']}; "
             f"{len(records)} architectures in {meta['seconds']:.0f} s). Tiny random models (2 layers, hidden 64, "
             f"4 heads / 2 kv heads, vocab 100), P={P} virtual tokens, fp32 CPU; relative tolerance "
             f"{LOGITS_RTOL:g} (logits, loss), {GRAD_RTOL:g} (prefix gradients), greedy tokens equal.", "",
             "| class | count | meaning |", "|---|---|---|"]
    meaning = {
        "match_peft": "same logits, loss, prefix gradients and greedy tokens as PEFT prefix tuning",
        "match_reference": "PEFT fails (or differs by design); same as an independent reference (column)",
        "refused": "add_prefix_tuning refuses, naming the model type",
        "refused_late": "refused at forward/generate time (clear, but late)",
        "mismatch": "a silent wrong answer",
        "crash": "an unclear error",
        "harness_error": "the sweep could not build the tiny model or a reference",
    }
    lines += [f"| {c} | {counts[c]} | {meaning[c]} |" for c in CLASSES]
    peft_works = {r["model_type"] for r in records if r.get("peft") == "works"}
    ours = {r["model_type"] for r in records if r["class"] in ("match_peft", "match_reference")}
    lines += ["", f"PEFT prefix tuning runs on {len(peft_works)} of them; prefix_kernels matches on {len(ours)}, "
              f"{len(ours - peft_works)} of them where PEFT fails; refused or wrong where PEFT runs: "
              f"{', '.join(f'`{t}`' for t in sorted(peft_works - ours)) or 'none'}."]
    for c in CLASSES:
        group = sorted((r for r in records if r["class"] == c), key=lambda r: r["model_type"])
        if not group:
            continue
        lines += ["", f"## {c} ({len(group)})", "", "| model type | reference | PEFT | max rel. diffs | detail |",
                  "|---|---|---|---|---|"]
        for r in group:
            diffs = ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}" for k, v in r["diffs"].items())
            cells = [f"`{r['model_type']}`", r.get("reference") or "", r.get("peft") or "", diffs, r["detail"]]
            lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model types (default: all)")
    parser.add_argument("--window", action="store_true", help="a sliding window (4) shorter than the sequence")
    parser.add_argument("--out", type=Path, default=None, help="results path stem (default tests/hf_sweep[_window])")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S, help="seconds per architecture")
    args = parser.parse_args(argv)
    known = all_model_types()
    types = known if not args.only else args.only.split(",")
    unknown = sorted(set(types) - set(known))
    if unknown:
        parser.error(f"--only: not causal-LM model types of this transformers: {', '.join(unknown)}")
    out = args.out or Path(__file__).parent / ("hf_sweep_window" if args.window else "hf_sweep")
    start = time.perf_counter()

    def progress(r):
        print(f"{r['model_type']:28s} {r['class']:16s} {r['seconds']:6.1f}s  {r['detail'][:150]}", flush=True)

    records = sweep(types, args.window, args.jobs, args.timeout, progress)
    write_results(records, out, args.window, time.perf_counter() - start)
    counts = {c: sum(r["class"] == c for r in records) for c in CLASSES}
    print(" ".join(f"{c}={n}" for c, n in counts.items() if n), f"({time.perf_counter() - start:.0f} s) -> {out}.md")
    return 0 if all(r["class"] in OK_CLASSES for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
