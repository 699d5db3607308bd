"""Families whose attention modules compute attention by hand (prefix_kernels.hf.legacy): what the
architecture sweep cannot show -- GPT-Neo's local window shorter than the sequence, against an
independent reference; BigBird's block-sparse attention refused; cross-attention refused at the
call; unload() gives the modules their own forward back. (Matching PEFT / a cache reference on a
padded batch, gradients and generate: tests/test_hf_sweep.py.)

The GPT-Neo reference is plain PyTorch on the base model: each attention module's ``_attn`` gets
this layer's prefix keys/values in front of its keys/values (cut by hand from the PEFT-layout
table), the model's own local window over the text and its padding mask, the prefix visible to
every query (our documented semantics), positions shifted by P.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import DEVICE, VOCAB, padded_batch, positions  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402
from prefix_kernels.hf import internals, legacy  # noqa: E402

P, N, WINDOW = 3, 10, 4


def _gpt_neo(window=WINDOW):
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                                       attention_types=[[["global", "local"], 1]], window_size=window,
                                       max_position_embeddings=64, attention_dropout=0.0, embed_dropout=0.0,
                                       resid_dropout=0.0)
    return transformers.GPTNeoForCausalLM(config).to(DEVICE).eval()


def _reference_attn(table, layer, heads):
    """GPTNeoSelfAttention._attn with the prefix in front: [P] always visible, then the model's own."""
    def attn(self, query, key, value, attention_mask=None):
        b, h, n, d = query.shape
        cut = table[0].view(P, -1, 2, heads, d)[:, layer].permute(1, 2, 0, 3)  # [2, H, P, D]
        pk, pv = (cut[i][None].expand(b, -1, -1, -1).to(query.dtype) for i in range(2))
        scores = torch.cat([query @ pk.transpose(-1, -2), query @ key.transpose(-1, -2)], -1).float()
        m = key.shape[-2]
        seen = self.bias[:, :, m - n:m, :m]  # causal, and the local window where this layer has one
        text = torch.where(seen, scores[..., P:], torch.finfo(scores.dtype).min)
        if attention_mask is not None:
            text = text + attention_mask
        probs = torch.softmax(torch.cat([scores[..., :P], text], -1), -1).to(value.dtype)
        return probs @ torch.cat([pv, value], -2), None

    return attn


def test_gpt_neo_local_window_shorter_than_the_sequence():
    base = _gpt_neo()
    wrapped = add_prefix_tuning(copy.deepcopy(base), P)
    windows = [layer.sliding_window for _, layer in sorted(wrapped.attention_layers.items())]
    assert windows == [None, WINDOW]  # global, local
    with torch.no_grad():
        wrapped.prefix_embedding.normal_(generator=torch.Generator(DEVICE).manual_seed(3))
    table = wrapped.prefix_embedding.detach()
    ids, mask = padded_batch(3, N)
    labels = ids.masked_fill(mask == 0, -100)
    ours = wrapped(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    ours.loss.backward()

    ref_model = copy.deepcopy(base)
    ref_table = table.clone().requires_grad_(True)
    for i, block in enumerate(ref_model.transformer.h):
        block.attn.attention._attn = types.MethodType(_reference_attn(ref_table, i, 4), block.attn.attention)
    ref = ref_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask) + P, labels=labels)
    ref.loss.backward()

    valid = mask.bool()
    torch.testing.assert_close(ours.logits[valid], ref.logits[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.prefix_embedding.grad, ref_table.grad, rtol=1e-4, atol=1e-6)
    # the window matters here: the same prefix without it gives other logits
    unwindowed = _gpt_neo(window=64)
    unwindowed.load_state_dict(base.state_dict(), strict=False)
    wide = add_prefix_tuning(unwindowed, P)
    with torch.no_grad():
        wide.prefix_embedding.copy_(table)
        far = wide(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert (far[valid] - ours.logits[valid]).abs().max() > 1e-3


def test_unload_gives_the_modules_their_own_forward_back():
    base = _gpt_neo()
    ids, mask = padded_batch(2, N)
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=mask).logits
    model = add_prefix_tuning(copy.deepcopy(base), P).unload()
    for block in model.transformer.h:
        assert "forward" not in vars(block.attn.attention) and "layer_idx" not in vars(block.attn.attention)
    assert model.config._attn_implementation == base.config._attn_implementation
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


def _bert_like(model_class, config_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=96, max_position_embeddings=64, is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)
    return model_class(config).to(DEVICE).eval()


def test_big_bird_block_sparse_is_refused_naming_it():
    model = _bert_like(transformers.BigBirdForCausalLM, transformers.BigBirdConfig, attention_type="block_sparse")
    with pytest.raises(NotImplementedError, match="'big_bird'.*block_sparse"):
        add_prefix_tuning(model, P)


def test_cross_attention_is_refused_at_the_call():
    torch.manual_seed(0)
    config = transformers.XGLMConfig(vocab_size=VOCAB, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96,
                                     max_position_embeddings=64, add_cross_attention=True, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0)
    wrapped = add_prefix_tuning(transformers.XGLMForCausalLM(config).to(DEVICE).eval(), P)
    ids, mask = padded_batch(2, N)
    states = torch.randn(2, 5, 64, device=DEVICE)
    with pytest.raises(NotImplementedError, match="XGLMAttention.*cross-attention"):
        wrapped(input_ids=ids, attention_mask=mask, encoder_hidden_states=states)


def test_mvp_prompts_are_refused_naming_them():
    torch.manual_seed(0)
    config = transformers.MvpConfig(vocab_size=VOCAB, d_model=64, decoder_layers=2, encoder_layers=2,
                                    decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=96,
                                    encoder_ffn_dim=96, use_prompt=True, prompt_length=3, prompt_mid_dim=16)
    with pytest.raises(NotImplementedError, match="'mvp'.*use_prompt"):
        add_prefix_tuning(transformers.MvpForCausalLM(config).eval(), P)


@pytest.mark.parametrize("model_type,overrides", [
    ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),  # GQA, keys broadcast to every head
    ("falcon", {"multi_query": False, "num_kv_heads": 4}),  # one K/V per head, interleaved QKV
])
def test_falcon_layouts_match_a_cache_reference(monkeypatch, model_type, overrides):
    """The sweep's default tiny Falcon is multi-query; its other two QKV layouts through the same harness
    (PEFT fails on Falcon: the reference is the prefix written into the model's own cache)."""
    hf_sweep = pytest.importorskip("hf_sweep")
    monkeypatch.setitem(hf_sweep.OVERRIDES, model_type, overrides)
    record = hf_sweep.run_arch(model_type)
    assert record["class"] in ("match_peft", "match_reference"), record


@pytest.mark.parametrize("model_type", ["bloom", "falcon"])
def test_alibi_is_refused_naming_it(model_type):
    torch.manual_seed(0)
    if model_type == "bloom":
        model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2,
                                                                       n_head=4))
    else:
        model = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64,
                                                                         num_hidden_layers=2, num_attention_heads=4,
                                                                         alibi=True))
    with pytest.raises(NotImplementedError, match=f"'{model_type}'.*ALiBi"):
        add_prefix_tuning(model.eval(), P)


def _falcon(**overrides):
    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       **overrides)
    return transformers.FalconForCausalLM(config).to(DEVICE).eval()


def _forward_replaced(model) -> bool:
    return any("forward" in m.__dict__ for m in legacy.modules(model))


def test_falcon_path_follows_its_modeling_code():
    """A Falcon whose modeling code calls the AttentionInterface is served by the normal path (its own
    forward, our attention function); one that computes attention by hand gets the legacy forward."""
    wrapped = add_prefix_tuning(_falcon(), P)
    model = wrapped.base_model
    replaced = _forward_replaced(model)
    assert replaced != internals.routes_attention_through_interface(type(model))
    assert model.config._attn_implementation == "prefix_kernels"
    ids, mask = padded_batch(2, N)
    with torch.no_grad():
        assert torch.isfinite(wrapped(input_ids=ids, attention_mask=mask).logits).all()
    wrapped.unload()
    assert not _forward_replaced(model) and model.config._attn_implementation != "prefix_kernels"


def test_falcon_without_interface_or_split_heads_is_refused_naming_the_cause(monkeypatch):
    monkeypatch.setattr(internals, "routes_attention_through_interface", lambda model_class: False)
    monkeypatch.setattr(internals, "falcon_splits_heads", lambda attention_class: False)
    with pytest.raises(NotImplementedError, match=r"'falcon'.*FalconAttention has no _split_heads in this "
                                                  r"transformers \(5\.[0-9.]+.*AttentionInterface") as refused:
        add_prefix_tuning(_falcon(), P)
    assert "attention mask" not in str(refused.value)


def test_falcon_alibi_through_the_interface_is_refused_past_the_config_check(monkeypatch):
    """Where Falcon calls the interface, its ALiBi reaches attention added to the mask: were the config
    check gone, the mask the model changed is still refused, never ignored."""
    if not internals.routes_attention_through_interface(transformers.FalconForCausalLM):
        pytest.skip("this transformers' Falcon computes attention by hand (ALiBi passed to the module)")
    monkeypatch.setattr(legacy, "_refuse_configuration", lambda model: None)
    with pytest.raises(NotImplementedError, match="'falcon'.*FalconAttention.*changes the mask itself"):
        add_prefix_tuning(_falcon(alibi=True), P)


class _NamedOlder(torch.nn.Module):  # older transformers: the cache a named parameter of the older name
    def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
        pass


class _NamedNewer(torch.nn.Module):
    def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
        pass


class _Caught(torch.nn.Module):
    def forward(self, hidden_states, **kwargs):
        pass


@pytest.mark.parametrize("module_class", [_NamedOlder, _NamedNewer, _Caught])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_hand_computing_modules_get_the_cache_under_either_name(module_class, name):
    """A module that names ``past_key_values`` (BERT- and BART-style modules of transformers 5.17) must still
    update its cache: without it a cached generate() attends over the new token alone."""
    marker = object()
    arguments, extra = legacy._arguments(module_class(), (torch.zeros(1),), {name: marker})
    assert arguments["cache"] is marker
    assert "past_key_values" not in arguments and "past_key_values" not in extra
