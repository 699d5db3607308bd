"""The drop-in on models that need more than causal attention: sliding windows (shorter than the
sequence), softcapping, sinks, per-layer masks, MLA's separate V head dim, decoders that count
positions from the cache, layers that do not forward keyword arguments.

References are built without prefix_kernels: the transformers mask functions evaluated on a grid;
the base model with its own eager attention, the prefix written by hand into a ``DynamicCache`` and
a hand-built mask in which the prefix stays visible to every query (our documented semantics; PEFT's
prefix instead sits at cache positions 0..P-1 and so leaves the window); and, for a text-initialized
prefix, the base model reading that text first.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import DEVICE, VOCAB, padded_batch, positions  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402
from prefix_kernels.hf import compat, masks  # noqa: E402

P = 4
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, attention_dropout=0.0)


def _build(config_class, model_class, seed=0, **overrides):
    torch.manual_seed(seed)
    model = model_class(config_class(**{**SMALL, **overrides}))
    return model.to(DEVICE).eval()


# ---- the mask semantics, against transformers' own mask functions on a grid -----------------------
def _grid(mask_function, n, m):
    q = torch.arange(m - n, m)[:, None]
    kv = torch.arange(m)[None, :]
    zero = torch.zeros((), dtype=torch.long)
    return mask_function(zero, zero, q, kv).expand(n, m)


def _kernel_grid(causal, window, n, m):
    i = torch.arange(m - n, m)[:, None]
    j = torch.arange(m)[None, :]
    seen = (j <= i) if causal else torch.ones(n, m, dtype=torch.bool)
    if window is not None:
        seen &= (j > i - window) if causal else ((i - j).abs() < window)
    return seen


@pytest.mark.parametrize("n,m", [(7, 7), (2, 9), (1, 12)])
def test_mask_semantics_equal_transformers_masks(n, m):
    mu = pytest.importorskip("transformers.masking_utils")
    cases = [mu.causal_mask_function, mu.bidirectional_mask_function, mu.sliding_window_causal_mask_function(3),
             mu.and_masks(mu.causal_mask_function, mu.sliding_window_overlay(5)),
             mu.and_masks(mu.sliding_window_overlay(2), mu.sliding_window_overlay(4), mu.causal_mask_function),
             mu.or_masks(mu.causal_mask_function, mu.bidirectional_mask_function)]
    if hasattr(mu, "sliding_window_bidirectional_mask_function"):
        cases.append(mu.sliding_window_bidirectional_mask_function(2))
        cases.append(mu.and_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(3)))
    for fn in cases:
        causal, window = masks.mask_semantics(fn, "test").kernel_arguments("test")
        assert torch.equal(_kernel_grid(causal, window, n, m), _grid(fn, n, m)), (fn, causal, window)


def test_a_block_overlay_over_text_only_adds_nothing():
    """Multimodal masks OR a bidirectional-block overlay (image tokens) onto the causal mask: with no
    block (text only, every id -1) it is the causal mask; with a block the kernel cannot express it."""
    mu = pytest.importorskip("transformers.masking_utils")
    if not hasattr(mu, "blockwise_overlay"):
        pytest.skip("this transformers has no blockwise_overlay")
    text = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.full((1, 6), -1)))
    assert masks.mask_semantics(text, "toy") == masks.CAUSAL
    assert torch.equal(_grid(text, 6, 6), _kernel_grid(True, None, 6, 6))
    image = mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(torch.tensor([[-1, 0, 0, 0, -1, -1]])))
    with pytest.raises(NotImplementedError, match="'toy'.*bidirectional blocks"):
        masks.mask_semantics(image, "toy")


def test_mask_terms_the_kernel_lacks_are_refused():
    mu = pytest.importorskip("transformers.masking_utils")
    with pytest.raises(NotImplementedError, match="'toy'.*chunked attention"):
        masks.mask_semantics(mu.chunked_causal_mask_function(4, torch.zeros(1, dtype=torch.long)), "toy")
    with pytest.raises(NotImplementedError, match="'toy'.*does not know"):
        masks.mask_semantics(lambda b, h, q, kv: q >= kv, "toy")
    with pytest.raises(NotImplementedError, match="'toy'.*neither causal nor a symmetric window"):
        masks.mask_semantics(mu.sliding_window_overlay(3), "toy").kernel_arguments("toy")


# ---- windows shorter than the sequence, against the hand-built reference ---------------------------
def _hand_reference(model, table, ids, mask, windows: dict[str, int | None]):
    """logits of ``model`` (eager attention) with the prefix written by hand into a DynamicCache and a
    mask per layer type in which every query sees the whole prefix, and sequence key j from query i if
    j <= i, j > i - W and j is not padding."""
    from transformers import DynamicCache

    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    config = model.config
    b, n = ids.shape
    hkv, d = config.num_key_value_heads, config.head_dim
    layers = table.view(P, 2 * config.num_hidden_layers, hkv, d).permute(1, 2, 0, 3)  # [2L, Hkv, P, D]
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        cache.update(layers[2 * layer].expand(b, -1, -1, -1), layers[2 * layer + 1].expand(b, -1, -1, -1), layer)
    i, j = torch.arange(n, device=ids.device)[:, None], torch.arange(n, device=ids.device)[None, :]

    def additive(window):
        seen = (j <= i) & ((j > i - window) if window is not None else True)
        seen = seen[None, None] & mask.bool()[:, None, None, :]
        seen = torch.cat([torch.ones(b, 1, n, P, dtype=torch.bool, device=ids.device), seen], -1)
        return torch.zeros(seen.shape, device=ids.device).masked_fill(~seen, torch.finfo(torch.float32).min)

    attention_mask = {kind: additive(w) for kind, w in windows.items()}
    if len(attention_mask) == 1:
        attention_mask = next(iter(attention_mask.values()))
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=positions(mask) + P,
                 **{compat.cache_name(model): cache}).logits


def _window_models():
    tf = transformers
    yield "mistral", _build(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=3), {"x": 3}
    yield "gemma2", _build(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=3, attn_logit_softcapping=2.0,
                           layer_types=["sliding_attention", "full_attention"]), \
        {"sliding_attention": 3, "full_attention": None}
    if hasattr(tf, "GptOssForCausalLM"):
        yield "gpt_oss", _build(tf.GptOssConfig, tf.GptOssForCausalLM, sliding_window=3, num_local_experts=4,
                                num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]), \
            {"sliding_attention": 3, "full_attention": None}


@pytest.mark.parametrize("case", [0, 1, 2])
def test_sliding_window_models_match_the_hand_reference(case):
    models = list(_window_models())
    if case >= len(models):
        pytest.skip("this transformers has no gpt-oss")
    name, model, windows = models[case]
    if name == "gpt_oss":
        with torch.no_grad():  # make the sinks matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_()
    reference_model = copy.deepcopy(model)
    wrapped = add_prefix_tuning(model, P)
    assert {layer.sliding_window for layer in wrapped.attention_layers.values()} == set(windows.values())
    ids, mask = padded_batch(length=9)
    labels = ids.masked_fill(mask == 0, -100)
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    table = wrapped.prefix_embedding[0].detach().clone().requires_grad_(True)
    ref = _hand_reference(reference_model, table, ids, mask, windows)
    valid = mask.bool()
    torch.testing.assert_close(out.logits[valid], ref[valid], atol=2e-5, rtol=1e-5)
    loss = torch.nn.functional.cross_entropy(ref[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    out.loss.backward()
    loss.backward()
    assert table.grad.abs().max() > 0
    torch.testing.assert_close(wrapped.prefix_embedding.grad[0], table.grad, atol=2e-5, rtol=1e-4)


# ---- MLA (Q/K head dim != V head dim): per-layer layout, text init against reading the text ------
def _deepseek():
    tf = transformers
    return _build(tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, qk_rope_head_dim=8, qk_nope_head_dim=16,
                  v_head_dim=8, kv_lora_rank=32, q_lora_rank=32, head_dim=8, n_routed_experts=4,
                  num_experts_per_tok=2, first_k_dense_replace=1, n_group=1, topk_group=1, moe_intermediate_size=32,
                  num_key_value_heads=4)


def _text_prefix_matches_reading_the_text(model):
    """A prefix initialized from tokens t must give, on x, the base model's logits for x after t."""
    base = copy.deepcopy(model)
    text = torch.randint(3, VOCAB, (P,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    wrapped = add_prefix_tuning(model, P, init=text)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ours = wrapped(input_ids=ids).logits
    with torch.no_grad():
        ref = base(input_ids=torch.cat([text.expand(2, -1), ids], 1)).logits[:, P:]
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    return wrapped


def test_mla_prefix_has_its_own_v_head_dim():
    wrapped = _text_prefix_matches_reading_the_text(_deepseek())
    spec = wrapped.spec
    assert not spec.peft_layout and set(spec.shapes()) == {(4, 24, 8)}
    assert spec.width == 2 * 4 * (24 + 8)
    with pytest.raises(ValueError, match="deepseek_v3.*no prefix layout"):
        wrapped.save_peft_adapter("/nonexistent")


def test_mla_prefix_checkpoint_round_trip(tmp_path):
    wrapped = add_prefix_tuning(_deepseek(), P)
    wrapped.save_prefix(tmp_path)
    other = add_prefix_tuning(_deepseek(), P).load_prefix(tmp_path)
    torch.testing.assert_close(other.prefix_embedding, wrapped.prefix_embedding, atol=0, rtol=0)


def test_sliding_window_text_prefix_matches_reading_the_text():
    """Mixed layers (Gemma 2: sliding + full, softcapping), window longer than text + input."""
    tf = transformers
    _text_prefix_matches_reading_the_text(_build(tf.Gemma2Config, tf.Gemma2ForCausalLM, sliding_window=16,
                                                 attn_logit_softcapping=2.0,
                                                 layer_types=["sliding_attention", "full_attention"]))


# ---- decoders that count positions from the cache; layers that do not forward kwargs -----------
def test_cache_length_decoder_positions_match_peft():
    """BART's decoder takes no position_ids: the prefix offset goes to its position embedding."""
    peft = pytest.importorskip("peft")
    tf = transformers
    torch.manual_seed(0)
    config = tf.BartConfig(vocab_size=VOCAB, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                           decoder_ffn_dim=96, encoder_layers=2, encoder_attention_heads=4, max_position_embeddings=64, dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, is_decoder=True, is_encoder_decoder=False)
    model = tf.BartForCausalLM(config).to(DEVICE).eval()
    other = copy.deepcopy(model)
    wrapped = add_prefix_tuning(model, P)
    reference = peft.get_peft_model(other, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(wrapped.prefix_embedding[0])
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.testing.assert_close(wrapped(input_ids=ids).logits, reference(input_ids=ids).logits, atol=2e-5, rtol=1e-5)
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(wrapped.generate(input_ids=ids, **gen), reference.generate(input_ids=ids, **gen))


def test_layers_that_drop_kwargs_get_the_prefix_through_their_module():
    """Nemotron's decoder layers call self_attn without **kwargs."""
    peft = pytest.importorskip("peft")
    tf = transformers
    model = _build(tf.NemotronConfig, tf.NemotronForCausalLM, partial_rotary_factor=0.5)
    other = copy.deepcopy(model)
    wrapped = add_prefix_tuning(model, P)
    assert not any(layer.forwards_kwargs for layer in wrapped.attention_layers.values())
    reference = peft.get_peft_model(other, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(wrapped.prefix_embedding[0])
    ids, mask = padded_batch()
    ours = wrapped(input_ids=ids, attention_mask=mask).logits
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-5)
    assert wrapped.plan.handover and not wrapped._scope.calls  # handed over per call, not kept past it
    wrapped.activation_checkpointing_enable()
    wrapped.train()
    with pytest.raises(RuntimeError, match="received no prefix"):
        wrapped(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()


def test_multimodal_wrapper_routes_only_the_text_model():
    tf = transformers
    if not hasattr(tf, "Gemma3ForConditionalGeneration"):
        pytest.skip("no gemma3")
    text = {**SMALL, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 4}
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = tf.Gemma3ForConditionalGeneration(config).to(DEVICE).eval()
    before = config.vision_config._attn_implementation
    wrapped = add_prefix_tuning(model, P)
    assert config.get_text_config()._attn_implementation == "prefix_kernels"
    assert config.vision_config._attn_implementation == before
    wrapped.unload()
    assert config.get_text_config()._attn_implementation != "prefix_kernels"


def test_musicgen_codebook_decoder_matches_the_cache_reference():
    """MusicGen's decoder reads [B * codebooks, N] ids (its attention batch is B) and counts positions from
    its cache: against the prefix written by hand into its own DynamicCache, logits and prefix gradients."""
    from transformers import DynamicCache

    tf = transformers
    torch.manual_seed(0)
    b, k, n = 2, 2, 6
    config = tf.MusicgenDecoderConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=96, num_codebooks=k, max_position_embeddings=64, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1)
    model = tf.MusicgenForCausalLM(config).to(DEVICE).eval()
    wrapped = add_prefix_tuning(copy.deepcopy(model), P)
    with torch.no_grad():
        wrapped.prefix_embedding.normal_(generator=torch.Generator(DEVICE).manual_seed(2))
    ids = torch.randint(3, VOCAB, (b * k, n), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    mask = torch.ones(b, n, dtype=torch.long, device=DEVICE)
    mask[1, n - 2:] = 0
    weights = torch.randn(b * k, n, VOCAB, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    valid = mask.bool().repeat_interleave(k, 0)  # rows are (batch, codebook)
    ours = wrapped(input_ids=ids, attention_mask=mask).logits
    (ours[valid] * weights[valid]).sum().backward()

    table = wrapped.prefix_embedding.detach()[0].clone().requires_grad_(True)  # [P, L * 2 * H * D]
    layers = table.view(P, 2 * config.num_hidden_layers, 4, 16).permute(1, 2, 0, 3)
    cache = DynamicCache()
    for layer in range(config.num_hidden_layers):
        cache.update(layers[2 * layer].expand(b, -1, -1, -1), layers[2 * layer + 1].expand(b, -1, -1, -1), layer)
    full_mask = torch.cat([torch.ones(b, P, dtype=torch.long, device=DEVICE), mask], 1)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    ref = ref_model(input_ids=ids, attention_mask=full_mask, **{compat.cache_name(ref_model): cache}).logits
    (ref[valid] * weights[valid]).sum().backward()
    torch.testing.assert_close(ours[valid], ref[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(wrapped.prefix_embedding.grad[0], table.grad, rtol=1e-4, atol=1e-5)


def test_musicgen_bank_takes_one_prefix_id_per_batch_row():
    """prefix_ids [B] pick each batch row's prefix (its B * codebooks id rows share it): row b of a bank
    of 2 equals that prefix alone."""
    tf = transformers
    torch.manual_seed(0)
    k = 2
    config = tf.MusicgenDecoderConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      ffn_dim=96, num_codebooks=k, max_position_embeddings=64, dropout=0.0,
                                      attention_dropout=0.0, activation_dropout=0.0, pad_token_id=0, bos_token_id=1)
    model = tf.MusicgenForCausalLM(config).to(DEVICE).eval()
    bank = add_prefix_tuning(copy.deepcopy(model), P, num_prefixes=2)
    with torch.no_grad():
        bank.prefix_embedding.normal_(generator=torch.Generator(DEVICE).manual_seed(5))
    ids = torch.randint(3, VOCAB, (2 * k, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        both = bank(input_ids=ids, prefix_ids=torch.tensor([1, 0], device=DEVICE)).logits
        for row, t in ((0, 1), (1, 0)):
            single = add_prefix_tuning(copy.deepcopy(model), P)
            single.prefix_embedding.copy_(bank.prefix_embedding[t:t + 1])
            alone = single(input_ids=ids[row * k:(row + 1) * k]).logits
            torch.testing.assert_close(both[row * k:(row + 1) * k], alone, rtol=1e-5, atol=1e-5)
