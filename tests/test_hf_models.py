"""The transformers drop-in against PEFT prefix tuning and the models' own attention, per family.

PEFT 0.21 puts the prefix into the KV cache and runs the model's own (SDPA) attention; we read it
from parameters in the fused op. Same prefix values, same padded batch: same logits and same
prefix gradients. PEFT shifts explicit position_ids by P as we do, so both get the positions our
wrapper counts over the mask.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tiny_models import DEVICE, FAMILIES, VOCAB, model_pair, padded_batch, positions, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

P = 4
ATOL = 2e-5


def peft_prefix_model(model, p=P):
    return peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p))


def labels_for(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def max_diff_at(a, b, mask):
    return (a - b).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_prefix_gradients_match_peft(family):
    ours, other = model_pair(family)
    wrapped = add_prefix_tuning(ours, P)
    reference = peft_prefix_model(other)
    embedding = reference.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(wrapped.prefix_embedding[0])
    ids, mask = padded_batch()
    labels = labels_for(ids, mask)

    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    assert max_diff_at(out.logits, ref.logits, mask) < ATOL
    assert torch.allclose(out.loss, ref.loss, atol=ATOL)

    out.loss.backward()
    ref.loss.backward()
    grad, ref_grad = wrapped.prefix_embedding.grad[0], embedding.grad
    assert ref_grad.abs().max() > 0
    torch.testing.assert_close(grad, ref_grad, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_right_padding_default_positions_equal_peft_defaults(family):
    """Without position_ids PEFT places token j at P + j; so do we when nothing is left-padded."""
    ours, other = model_pair(family)
    wrapped = add_prefix_tuning(ours, P)
    reference = peft_prefix_model(other)
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(wrapped.prefix_embedding[0])
    ids, mask = padded_batch(left=False)
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask).logits
    assert max_diff_at(got, want, mask) < ATOL


def test_triton_backend_in_the_model():
    """The Triton kernels (interpreter on CPU) inside a model give PEFT's logits and gradients."""
    ours, other = model_pair("qwen2")
    wrapped = add_prefix_tuning(ours, P, backend="triton")
    reference = peft_prefix_model(other)
    embedding = reference.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(wrapped.prefix_embedding[0])
    ids, mask = padded_batch(length=7)
    labels = labels_for(ids, mask)
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)
    ref = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask), labels=labels)
    assert max_diff_at(out.logits, ref.logits, mask) < 1e-4
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(wrapped.prefix_embedding.grad[0], embedding.grad, atol=1e-4, rtol=1e-3)


def test_position_offset_none_keeps_positions():
    """'none': real tokens at 0..N-1 -- PEFT reproduces it when handed positions shifted by -P (RoPE
    takes negative positions)."""
    ours, other = model_pair("llama")
    wrapped = add_prefix_tuning(ours, P, position_offset="none")
    reference = peft_prefix_model(other)
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(wrapped.prefix_embedding[0])
    ids, mask = padded_batch()
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask).logits
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask) - P).logits
        shifted = reference(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
    assert max_diff_at(got, want, mask) < ATOL
    assert max_diff_at(got, shifted, mask) > 1e-3  # the offset matters, so the test can fail


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_text_init_equals_the_text_in_front(family):
    """init=token ids: the prefix is those tokens' keys/values, so (PEFT positions) the logits equal
    the base model reading the text followed by the input."""
    model = tiny_model(family)
    text = torch.randint(1, VOCAB, (P,), generator=torch.Generator().manual_seed(5))
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    with torch.no_grad():
        want = model(input_ids=torch.cat([text.to(DEVICE).expand(2, -1), ids], 1)).logits[:, P:]
    wrapped = add_prefix_tuning(model, P, init=text)
    with torch.no_grad():
        got = wrapped(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_prefix_bank_rows_use_their_own_prefix():
    model = tiny_model("llama")
    wrapped = add_prefix_tuning(model, P, num_prefixes=3)
    ids, mask = padded_batch()
    choice = torch.tensor([2, 0, 2], device=DEVICE)
    with torch.no_grad():
        got = wrapped(input_ids=ids, attention_mask=mask, prefix_ids=choice).logits
        for row, t in enumerate(choice.tolist()):
            single = wrapped.prefix_kv(torch.tensor([t], device=DEVICE))
            alone = wrapped.base_model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                                       prefix_kv=single, position_ids=positions(mask[row:row + 1]) + P).logits
            assert max_diff_at(got[row:row + 1], alone, mask[row:row + 1]) < ATOL
    with pytest.raises(ValueError, match="prefix_ids"):
        wrapped(input_ids=ids, attention_mask=mask)


def test_only_prefix_parameters_get_gradients():
    model = tiny_model("qwen3")
    wrapped = add_prefix_tuning(model, P, projection_hidden=16)
    ids, mask = padded_batch()
    wrapped(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss.backward()
    with_grad = {n for n, p in wrapped.named_parameters() if p.grad is not None}
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert with_grad == trainable and trainable
    assert all(n.startswith("prefix_encoder.") for n in trainable)
    assert all(p.grad is None and not p.requires_grad for p in wrapped.base_model.parameters())


def test_reparameterization_merge_keeps_outputs():
    model = tiny_model("mistral")
    wrapped = add_prefix_tuning(model, P, projection_hidden=24)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = wrapped(input_ids=ids, attention_mask=mask).logits
    wrapped.merge()
    assert wrapped.prefix_encoder is None and wrapped.spec.projection_hidden is None
    with torch.no_grad():
        after = wrapped(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, mask = padded_batch()
    grads = []
    for checkpointing in (False, True):
        wrapped = add_prefix_tuning(tiny_model("llama"), P)
        torch.manual_seed(3)
        with torch.no_grad():
            wrapped.prefix_embedding.normal_()
        wrapped.train()
        if checkpointing:
            wrapped.activation_checkpointing_enable()
            assert wrapped.is_activation_checkpointing
        wrapped(input_ids=ids, attention_mask=mask, labels=labels_for(ids, mask)).loss.backward()
        grads.append(wrapped.prefix_embedding.grad)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_unload_restores_the_model():
    model = tiny_model("llama")
    previous = model.config._attn_implementation
    wrapped = add_prefix_tuning(model, P)
    assert model.config._attn_implementation == "prefix_kernels"
    assert wrapped.unload() is model
    assert model.config._attn_implementation == previous
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask)  # no prefix, no hook, the model's own attention


def test_models_that_cannot_be_routed_are_refused():
    import transformers as tf

    bloom = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(NotImplementedError, match="bloom"):
        add_prefix_tuning(bloom, P)
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    llama4 = tf.Llama4ForCausalLM(tf.Llama4TextConfig(**small, attention_chunk_size=4, layer_types=["chunked_attention"]))
    with pytest.raises(NotImplementedError, match="llama4_text.*chunked attention"):
        add_prefix_tuning(llama4, P)
    assert llama4.config._attn_implementation != "prefix_kernels"  # a refused model is left as it was
    assert all(p.requires_grad for p in llama4.parameters())
    diffllama = tf.DiffLlamaForCausalLM(tf.DiffLlamaConfig(**{**small, "num_attention_heads": 4, "num_key_value_heads": 2}))
    with pytest.raises(NotImplementedError, match="diffllama.*more than once per forward"):
        add_prefix_tuning(diffllama, P)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        add_prefix_tuning(torch.nn.Linear(2, 2), P)


def test_bad_arguments_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        add_prefix_tuning(model, 0)
    with pytest.raises(ValueError, match="position_offset"):
        add_prefix_tuning(model, P, position_offset="left")
    with pytest.raises(ValueError, match="3 tokens but num_virtual_tokens=4"):
        add_prefix_tuning(model, P, init=torch.tensor([1, 2, 3]))
    wrapped = add_prefix_tuning(model, P)
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match=r"prefix_ids must be \[B=3\]"):
        wrapped(input_ids=ids, attention_mask=mask, prefix_ids=torch.tensor([0, 0]))


def test_attention_dropout_in_training_is_refused():
    import transformers as tf

    torch.manual_seed(0)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, attn_pdrop=0.1))
    with pytest.warns(UserWarning, match="attn_pdrop"):
        wrapped = add_prefix_tuning(gpt2, P)
    ids = torch.randint(1, VOCAB, (2, 5))
    wrapped.eval()(input_ids=ids)  # no dropout in eval
    with pytest.raises(NotImplementedError, match="dropout"):
        wrapped.train()(input_ids=ids)
