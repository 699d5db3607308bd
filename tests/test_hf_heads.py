"""Trainable heads (``trainable_modules``, PEFT's ``modules_to_save``): a classification head trains
with the prefix while the rest of the model stays frozen; it is saved and loaded with the prefix in
our format and in PEFT's, and PEFT itself loads our adapters and we load PEFT's (logits equal
PEFT's forward both ways, and a reference built from transformers alone: the adapter's prefix put
into the model's own KV cache by hand, :func:`_cache_reference`).

PEFT's SEQ_CLS / TOKEN_CLS forward hands the prefix to the model as a KV cache when the model's
forward has a parameter of the name it looks for; else it calls the backbone itself and feeds the
classifier ``outputs[1]`` (BERT's pooler output). PEFT 0.21 looks for ``past_key_values``, which
transformers 5.24 renamed ``cache``; :func:`_peft_runs` gives the model's forward the old name back
for that PEFT only. Everything else is PEFT's own code (the prefix in the cache, the attention mask
extended by P, the positions counted after the cache).
"""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import DEVICE, VOCAB  # noqa: E402

from prefix_kernels import add_prefix_tuning, from_peft_adapter  # noqa: E402
from prefix_kernels.hf import compat  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

P = 3


def _model(kind, seed=0, **overrides):
    """Tiny random models with a task head: (model, the head's module path)."""
    tf = transformers
    torch.manual_seed(seed)
    encoder = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                   max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    if kind == "bert-seq":
        model, head = tf.BertForSequenceClassification(tf.BertConfig(**encoder, **overrides)), "classifier"
    elif kind == "bert-token":
        model, head = tf.BertForTokenClassification(tf.BertConfig(**encoder, **overrides)), "classifier"
    elif kind == "roberta-seq":  # a head of two layers (dense, out_proj)
        model, head = tf.RobertaForSequenceClassification(tf.RobertaConfig(**encoder, **overrides)), "classifier"
    elif kind == "llama-seq":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
                                attention_dropout=0.0, **overrides)
        model, head = tf.LlamaForSequenceClassification(config), "score"
    else:
        raise AssertionError(kind)
    return model.to(DEVICE).eval(), head


KINDS = ["bert-seq", "bert-token", "roberta-seq", "llama-seq"]


def _batch(kind):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    ids[1, 5:] = 0 if kind.startswith("llama") else ids[1, 5:]  # Llama's score reads the last non-pad token
    labels = (ids % 3).masked_fill(mask == 0, -100) if kind.endswith("token") else torch.tensor([0, 2, 1])
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def _randomize(wrapper, seed=3):
    """A prefix and a head unlike anything a fresh model has, so that loading them is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in wrapper.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g).to(p))


def _logits(model, kind, **extra):
    ids, mask, _ = _batch(kind)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **extra).logits


@pytest.mark.parametrize("kind", KINDS)
def test_the_head_trains_with_the_prefix_and_nothing_else_does(kind):
    model, head = _model(kind)
    wrapped = add_prefix_tuning(model, P)
    assert wrapped.trainable_modules == (head,)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    head_names = [f"base_model.{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()]
    assert trainable == ["prefix_embedding", *head_names]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith(head + ".")}
    start = {n: p.detach().clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)
    ids, mask, labels = _batch(kind)
    wrapped.train()
    losses = []
    for _ in range(3):
        loss = wrapped(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in wrapped.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, start[name]), name  # the prefix and every head tensor moved
    for name, p in model.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
    unloaded = wrapped.unload()  # the trained head stays in the model
    for name, p in unloaded.get_submodule(head).named_parameters():
        assert not torch.equal(p, start[f"base_model.{head}.{name}"]), name


def test_trainable_modules_by_name_or_none():
    model, _ = _model("bert-seq")
    wrapped = add_prefix_tuning(model, P, trainable_modules=["classifier", "pooler"])  # "pooler": bert.pooler
    assert wrapped.trainable_modules == ("bert.pooler", "classifier")
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    wrapped.unload()
    only_prefix = add_prefix_tuning(_model("bert-seq")[0], P, trainable_modules=[])
    assert [n for n, p in only_prefix.named_parameters() if p.requires_grad] == ["prefix_embedding"]
    causal = add_prefix_tuning(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).to(DEVICE).eval(), P)
    assert causal.trainable_modules == ()  # no head by default for a language model


def test_bad_trainable_modules_are_refused_before_the_model_changes():
    model, _ = _model("bert-seq")
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"no submodule of BertForSequenceClassification is named \['classifer'\]"):
        add_prefix_tuning(model, P, trainable_modules=["classifier", "classifer"])
    with pytest.raises(TypeError, match=r"trainable_modules must be None or a list of module names .*'classifier'"):
        add_prefix_tuning(model, P, trainable_modules="classifier")
    assert model.config._attn_implementation == attn
    assert all(p.requires_grad for p in model.parameters()) and not model._forward_pre_hooks
    tied = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)).to(DEVICE).eval()
    with pytest.raises(ValueError, match=r"'lm_head' shares a parameter with 'model\.embed_tokens\.weight'"):
        add_prefix_tuning(tied, P, trainable_modules=["lm_head"])


@pytest.mark.parametrize("kind", ["bert-seq", "roberta-seq"])
def test_save_and_load_prefix_with_the_head(kind, tmp_path):
    base = _model(kind)[0]
    wrapped = add_prefix_tuning(copy.deepcopy(base), P)
    _randomize(wrapped)
    wrapped.save_prefix(tmp_path)
    config = json.loads((tmp_path / "prefix_tuning_config.json").read_text())
    assert config["trainable_modules"] == ["classifier"]
    other = add_prefix_tuning(copy.deepcopy(base), P)
    assert not torch.allclose(_logits(other, kind), _logits(wrapped, kind), atol=1e-3)
    other.load_prefix(tmp_path)
    torch.testing.assert_close(_logits(other, kind), _logits(wrapped, kind), atol=0, rtol=0)
    prefix_only = add_prefix_tuning(copy.deepcopy(base), P, trainable_modules=[])
    with pytest.raises(ValueError, match=r"trainable_modules is \['classifier'\] in the file, but \[\]"):
        prefix_only.load_prefix(tmp_path)


def _peft_cache_name():
    """The forward parameter PEFT hands the prefix cache to: PEFT 0.22 asks transformers
    (``peft.import_utils.get_transformers_cache_name``: ``cache`` from transformers 5.24 on), PEFT 0.21
    always passes ``past_key_values``."""
    import peft.import_utils

    name = getattr(peft.import_utils, "get_transformers_cache_name", None)
    return name() if name is not None else "past_key_values"


def _peft_runs(model):
    """PEFT 0.21 with transformers >= 5.24: a forward that takes ``past_key_values`` again and passes
    it on as ``cache``. Only for that PEFT: the renamed forward hides ``cache`` from PEFT 0.22's
    signature check (``check_cache_in_signature``), which then takes its backbone branch, meant for
    models whose head forward takes no cache (BERT), and for Llama feeds ``outputs[1]`` of LlamaModel,
    the DynamicCache, to ``score`` (TypeError: linear() ... not DynamicCache)."""
    forward = model.forward
    if _peft_cache_name() == "past_key_values" and compat.cache_name(model.base_model) == "cache" and \
            "past_key_values" not in inspect.signature(forward).parameters:
        def renamed(*args, past_key_values=None, **kwargs):
            return forward(*args, cache=past_key_values, **kwargs)
        model.forward = renamed
    return model


def _cache_reference(model, head, adapter, kind):
    """Logits of the PEFT adapter in folder ``adapter`` from transformers alone: ``model``'s head
    weights replaced by the adapter's, its ``prompt_embeddings`` [P, L * 2 * Hkv * D] laid out as
    PEFT's ``get_prompt`` does (per token: layer 0 keys, layer 0 values, layer 1 keys, ...) in a
    DynamicCache given to the model's own forward, the attention mask extended by P."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.get_submodule(head).named_parameters():
            p.copy_(tensors[f"base_model.{head}.{name}"])
    heads, layers = config["num_attention_heads"], config["num_layers"]
    prefix = tensors["prompt_embeddings"].to(DEVICE)
    prefix = prefix.view(P, layers, 2, heads, config["token_dim"] // heads)
    ids, mask, _ = _batch(kind)
    cache = transformers.DynamicCache()
    for layer in range(layers):
        key, value = (prefix[:, layer, i].transpose(0, 1).expand(len(ids), -1, -1, -1).contiguous() for i in (0, 1))
        cache.update(key, value, layer)
    takes = set(inspect.signature(reference.forward).parameters) | set(
        inspect.signature(reference.base_model.forward).parameters)
    name = "cache" if "cache" in takes else "past_key_values"
    with torch.no_grad():
        return reference(input_ids=ids, attention_mask=torch.cat([torch.ones_like(mask[:, :P]), mask], 1),
                         **{name: cache}).logits


def _peft_task(kind):
    return "TOKEN_CLS" if kind.endswith("token") else "SEQ_CLS"


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapters_with_the_head_load_both_ways(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model, head = _model(kind)
    # PEFT -> ours: PEFT's own adapter (its head copy trained: here randomized)
    theirs = peft.get_peft_model(_peft_runs(copy.deepcopy(model)),
                                 peft.PrefixTuningConfig(task_type=_peft_task(kind), num_virtual_tokens=P))
    _randomize(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = from_peft_adapter(copy.deepcopy(model), tmp_path / "peft")
    assert ours.trainable_modules == (head,)
    assert [n for n, p in ours.named_parameters() if p.requires_grad][1:] == \
        [f"base_model.{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()]
    expected = _logits(theirs, kind)
    assert not torch.allclose(expected, _logits(_peft_runs(copy.deepcopy(model)), kind), atol=1e-3)
    torch.testing.assert_close(expected, _cache_reference(model, head, tmp_path / "peft", kind), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(ours, kind), expected, atol=2e-5, rtol=1e-5)

    # ours -> PEFT: our adapter, loaded by PeftModel.from_pretrained into a fresh copy
    _randomize(ours, seed=7)
    ours.save_peft_adapter(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head] and config["task_type"] == _peft_task(kind)
    loaded = peft.PeftModel.from_pretrained(_peft_runs(copy.deepcopy(model)), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(loaded, kind), _logits(ours, kind), atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(_cache_reference(model, head, tmp_path / "ours", kind), _logits(ours, kind),
                               atol=2e-5, rtol=1e-5)
    again = add_prefix_tuning(copy.deepcopy(model), P).load_peft_adapter(tmp_path / "ours")
    torch.testing.assert_close(_logits(again, kind), _logits(ours, kind), atol=0, rtol=0)


def test_peft_adapter_head_mismatches_are_refused(tmp_path):
    wrapped = add_prefix_tuning(_model("bert-seq")[0], P)
    wrapped.save_peft_adapter(tmp_path / "with_head")
    add_prefix_tuning(_model("bert-seq")[0], P, trainable_modules=[]).save_peft_adapter(tmp_path / "prefix_only")
    prefix_only = add_prefix_tuning(_model("bert-seq", seed=2)[0], P, trainable_modules=[])
    before = prefix_only.prefix_embedding.detach().clone()
    with pytest.raises(ValueError, match=r"besides 'prompt_embeddings' it holds \['base_model\.classifier\.bias', "
                                         r"'base_model\.classifier\.weight'\] .*trainable_modules=\[\]"):
        prefix_only.load_peft_adapter(tmp_path / "with_head")
    assert torch.equal(prefix_only.prefix_embedding, before)
    with_head = add_prefix_tuning(_model("bert-seq", seed=2)[0], P)
    with pytest.raises(ValueError, match=r"no weights for \['base_model\.classifier\.bias', 'base_model\.classifier"
                                         r"\.weight'\] of this wrapper's trainable_modules \['classifier'\]"):
        with_head.load_peft_adapter(tmp_path / "prefix_only")
    # from_peft_adapter takes the adapter's modules: none here
    assert from_peft_adapter(_model("bert-seq")[0], tmp_path / "prefix_only").trainable_modules == ()
