"""Tiny random transformers causal LMs, one per supported family (CPU, seconds to build)."""

from __future__ import annotations

import copy

import torch

VOCAB = 96
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on a GPU the same tests run the Triton kernels


def _configs():
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=128, attention_dropout=0.0)
    return {
        "llama": lambda: tf.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common),
        "mistral": lambda: tf.MistralConfig(num_attention_heads=4, num_key_value_heads=1, sliding_window=None,
                                            **common),
        "qwen2": lambda: tf.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common),
        # head_dim (32) != hidden / heads (16): the prefix must be sized from config.head_dim
        "qwen3": lambda: tf.Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32, **common),
        "gemma": lambda: tf.GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=16, **common),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, bos_token_id=1,
                                      eos_token_id=2),
    }


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **config_overrides):
    """A freshly initialized tiny model of ``family`` in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _configs()[family]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(DEVICE).eval()


def model_pair(family: str, seed: int = 0):
    """Two identical copies: one to wrap with add_prefix_tuning, one for PEFT or the reference."""
    model = tiny_model(family, seed)
    return model, copy.deepcopy(model)


def padded_batch(batch=3, length=9, seed=1, left=True):
    """input_ids [B, L] and attention_mask with one unpadded row, one right- and one left-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, length - 3:] = 0
    if batch > 2 and left:
        mask[2, :2] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def positions(mask):
    """Positions counted over the mask, as generate() and PrefixTuningModel count them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)
