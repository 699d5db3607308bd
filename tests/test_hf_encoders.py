"""Encoder models with their heads (P-tuning v2: a prefix in every self-attention layer, non-causal,
padding mask): BERT, RoBERTa, XLM-R, ELECTRA for sequence classification, token classification and
masked LM.

PEFT cannot prefix-tune these under transformers 5 ("Model does not support past key values"), so
the reference is built here, independently of prefix_kernels: an attention function registered
with transformers that concatenates each layer's prefix in front of its keys/values and runs plain
softmax attention with transformers' own SDPA mask (the prefix columns visible to every query), on
a copy of the model, whose embeddings count positions after P cached tokens (each model by its own
rule), as PEFT's prefix in the cache would make them.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import DEVICE, VOCAB  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402
from prefix_kernels.hf import internals  # noqa: E402

P = 3
REFERENCE = "prefix_kernels_test_concat"
_PREFIXES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(attention module) -> [Hkv, P, D] each


def _concat_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    prefix_k, prefix_v = _PREFIXES[id(module)]
    b = key.shape[0]
    key = torch.cat([prefix_k.expand(b, -1, -1, -1), key], 2)
    value = torch.cat([prefix_v.expand(b, -1, -1, -1), value], 2)
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
    if attention_mask is not None:  # transformers' SDPA mask: bool [B, 1, N, M] (True = attend)
        visible = torch.ones(*attention_mask.shape[:-1], P, dtype=torch.bool, device=attention_mask.device)
        scores = scores.masked_fill(~torch.cat([visible, attention_mask], -1), float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2), None


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(REFERENCE, _concat_attention)
    AttentionMaskInterface.register(REFERENCE, AttentionMaskInterface._global_mapping["sdpa"])


def _config(family):
    tf = transformers
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  num_labels=3)
    if family == "electra":
        return tf.ElectraConfig(embedding_size=32, **common)
    return {"bert": tf.BertConfig, "roberta": tf.RobertaConfig, "xlm-roberta": tf.XLMRobertaConfig}[family](**common)


HEADS = {"bert": "BertForSequenceClassification", "roberta": "RobertaForTokenClassification",
         "xlm-roberta": "XLMRobertaForMaskedLM", "electra": "ElectraForSequenceClassification"}


def _model(family, seed=0):
    torch.manual_seed(seed)
    return getattr(transformers, HEADS[family])(_config(family)).to(DEVICE).eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding, as encoders are fed
    mask[2, 7:] = 0
    return ids.to(DEVICE), mask.to(DEVICE)


def _labels(family, ids, mask):
    if HEADS[family].endswith("SequenceClassification"):
        return torch.tensor([0, 2, 1], device=DEVICE)
    if HEADS[family].endswith("TokenClassification"):
        return (ids % 3).masked_fill(mask == 0, -100)
    return ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("family", list(HEADS))
def test_encoder_logits_and_gradients_equal_the_concatenating_reference(family):
    model = _model(family)
    reference = copy.deepcopy(model)
    wrapped = add_prefix_tuning(model, P, trainable_modules=[])  # the prefix alone: its gradient vs the reference
    assert all(not layer.causal for layer in wrapped.attention_layers.values())
    assert [n for n, p in wrapped.named_parameters() if p.requires_grad] == ["prefix_embedding"]
    with torch.no_grad():
        wrapped.prefix_embedding.normal_()
    ids, mask = _batch()
    labels = _labels(family, ids, mask)
    out = wrapped(input_ids=ids, attention_mask=mask, labels=labels)

    _register_reference()
    reference.set_attn_implementation(REFERENCE)
    table = wrapped.prefix_embedding[0].detach().clone().requires_grad_(True)
    spec = wrapped.spec
    layers = table.view(P, 2 * spec.num_layers, spec.num_kv_heads, spec.head_dim).permute(1, 2, 0, 3)
    modules = [m for m in reference.modules() if hasattr(m, "query") and hasattr(m, "key")]
    assert len(modules) == spec.num_layers
    # positions as PEFT's prefix in a cache would give them: the model's own rule (RoBERTa-likes start
    # past the padding index and skip padding) after P cached tokens
    embeddings = reference.base_model.embeddings
    cache_length = internals.cache_length_parameter(embeddings)  # its name in the installed transformers
    embeddings.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, cache_length: kwargs.get(cache_length, 0) + P}),
        with_kwargs=True)
    for layer, module in enumerate(modules):
        _PREFIXES[id(module)] = layers[2 * layer], layers[2 * layer + 1]
    try:
        ref = reference(input_ids=ids, attention_mask=mask, labels=labels)
    finally:
        _PREFIXES.clear()
    if out.logits.dim() == 3:
        valid = mask.bool()
        torch.testing.assert_close(out.logits[valid], ref.logits[valid], atol=2e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out.logits, ref.logits, atol=2e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    assert table.grad.abs().max() > 0
    torch.testing.assert_close(wrapped.prefix_embedding.grad[0], table.grad, atol=2e-5, rtol=1e-4)
    assert all(p.grad is None for p in wrapped.base_model.parameters())


def test_encoder_prefix_round_trips_and_trains_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    wrapped = add_prefix_tuning(_model("bert"), P)
    ids, mask = _batch()
    rows = [dict(input_ids=i, attention_mask=m, labels=torch.tensor(y)) for i, m, y in
            zip(ids.cpu(), mask.cpu(), [0, 2, 1])] * 2
    before = wrapped.prefix_embedding.detach().clone()
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=2, per_device_train_batch_size=3,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=DEVICE == "cpu", dataloader_num_workers=0,
                             **({"remove_unused_columns": False} if "remove_unused_columns" in fields else {}))
    Trainer(model=wrapped, args=args, train_dataset=rows).train()
    assert not torch.equal(wrapped.prefix_embedding.detach(), before)
    wrapped.save_prefix(tmp_path / "prefix")
    wrapped.save_peft_adapter(tmp_path / "adapter")  # PEFT's layout [P, L * 2 * H * D], written for PEFT
    other = add_prefix_tuning(_model("bert"), P).load_prefix(tmp_path / "prefix")
    torch.testing.assert_close(other.prefix_embedding, wrapped.prefix_embedding, atol=0, rtol=0)
    again = add_prefix_tuning(_model("bert"), P).load_peft_adapter(tmp_path / "adapter")
    torch.testing.assert_close(again.prefix_embedding, wrapped.prefix_embedding, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=ids, attention_mask=mask).logits,
                                   wrapped(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_t5_encoder_relative_position_bias_is_refused():
    tf = transformers
    config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4, dropout_rate=0.0)
    with pytest.raises(NotImplementedError, match="'t5'"):
        add_prefix_tuning(tf.T5EncoderModel(config), P)
