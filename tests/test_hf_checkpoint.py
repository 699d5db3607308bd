"""Saving and loading prefixes (prefix_kernels.hf.checkpoint): our safetensors format round trip,
export to and import from PEFT prefix-tuning adapters, and every mismatch or corruption refused
with a clear error before any parameter changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from prefix_kernels.hf.checkpoint import (  # noqa: E402
    FORMAT_VERSION, PEFT_CONFIG, PEFT_WEIGHTS, PREFIX_CONFIG, PREFIX_WEIGHTS,
)
from prefix_kernels.hf.model import add_prefix_tuning, from_peft_adapter  # noqa: E402

P = 4
VOCAB = 128
ATOL = 1e-5


# ---- tiny models and inputs -----------------------------------------------------------------------
def tiny_model(family: str = "llama", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if family == "llama":
        config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2)
        return tf.LlamaForCausalLM(config).eval()
    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, attn_pdrop=0.0, embd_pdrop=0.0,
                           resid_pdrop=0.0)
    return tf.GPT2LMHeadModel(config).eval()


def wrapped(base, seed=1, num_virtual_tokens=P, **kwargs):
    """add_prefix_tuning on a copy of ``base`` (it is frozen and re-routed in place), seeded prefixes."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    return add_prefix_tuning(model, num_virtual_tokens, **kwargs)


def padded_batch():
    """ids [3, 7] and a mask with a full row, a right-padded row and a left-padded row."""
    ids = torch.randint(1, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, :2] = 0
    return ids, mask


def positions(mask):
    """What our wrapper counts by default; PEFT gets it explicitly (and shifts it by P, as we do)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def our_logits(model, prefix_ids=None):
    ids, mask = padded_batch()
    return model(input_ids=ids, attention_mask=mask, prefix_ids=prefix_ids).logits


@torch.no_grad()
def peft_logits(peft_model):
    ids, mask = padded_batch()
    return peft_model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits


def assert_close_where_real(got, want):
    real = padded_batch()[1].bool()
    assert (got - want).abs()[real].max().item() < ATOL


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_unchanged(model, before):
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert torch.equal(p, before[name]), f"{name} changed"


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if not name.startswith("base_model.")}


# ---- our format -----------------------------------------------------------------------------------
ROUND_TRIPS = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "projection": ("llama", {"projection_hidden": 16}),
    "bank": ("llama", {"num_prefixes": 3}),
}


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_save_load_round_trip_is_bit_identical(case, tmp_path):
    family, kwargs = ROUND_TRIPS[case]
    base = tiny_model(family)
    source, target = wrapped(base, seed=1, **kwargs), wrapped(base, seed=2, **kwargs)
    names = sorted(trainable(source))
    assert any(not torch.equal(trainable(source)[n], trainable(target)[n]) for n in names)

    source.save_prefix(tmp_path)
    saved = load_file(tmp_path / PREFIX_WEIGHTS)
    assert sorted(saved) == names  # the trainable tensors only, no frozen base weights
    if "projection_hidden" in kwargs:
        assert names == ["prefix_encoder.embedding", "prefix_encoder.transform.0.bias",
                         "prefix_encoder.transform.0.weight", "prefix_encoder.transform.2.bias",
                         "prefix_encoder.transform.2.weight"]
    config = json.loads((tmp_path / PREFIX_CONFIG).read_text())
    assert config == {"format_version": FORMAT_VERSION, **source.spec.to_dict()}

    assert target.load_prefix(tmp_path) is target
    for name in names:
        assert torch.equal(trainable(target)[name], trainable(source)[name]), name
    prefix_ids = torch.tensor([2, 0, 1]) if "num_prefixes" in kwargs else None
    assert torch.equal(our_logits(target, prefix_ids), our_logits(source, prefix_ids))


def test_save_overwrites_and_leaves_no_temporary_files(tmp_path):
    base = tiny_model()
    first, second = wrapped(base, seed=1), wrapped(base, seed=2)
    first.save_prefix(tmp_path)
    second.save_prefix(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PREFIX_CONFIG, PREFIX_WEIGHTS])
    assert torch.equal(load_file(tmp_path / PREFIX_WEIGHTS)["prefix_embedding"], second.prefix_embedding)


def _edit_json(name, edit):
    def corrupt(directory):
        path = directory / name
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return corrupt


def _edit_tensors(name, edit):
    def corrupt(directory):
        path = directory / name
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path)
    return corrupt


def _truncate(name):
    def corrupt(directory):
        path = directory / name
        path.write_bytes(path.read_bytes()[:-17])
    return corrupt


def _remove(name):
    return lambda directory: (directory / name).unlink()


def _write(name, text):
    return lambda directory: (directory / name).write_text(text)


def _rename(tensors, old, new):
    tensors[new] = tensors.pop(old)


# (kwargs of the loading wrapper, corruption of the saved directory, exception, pattern of its message)
PREFIX_FAILURES = {
    "num_virtual_tokens": ({"num_virtual_tokens": 5}, None, ValueError, r"num_virtual_tokens is 4 .* but 5"),
    "num_prefixes": ({"num_prefixes": 2}, None, ValueError, r"num_prefixes is 1 .* but 2"),
    "projection_hidden": ({"projection_hidden": 16}, None, ValueError, r"projection_hidden is None .* but 16"),
    "position_offset": ({"position_offset": "none"}, None, ValueError, r"position_offset is 'peft' .* but 'none'"),
    "json_num_layers": ({}, _edit_json(PREFIX_CONFIG, lambda c: c.update(num_layers=3)), ValueError,
                        r"prefix_tuning_config\.json: num_layers is 3 .* but 2"),
    "json_model_type": ({}, _edit_json(PREFIX_CONFIG, lambda c: c.update(model_type="gpt2")), ValueError,
                        r"model_type is 'gpt2' .* but 'llama'"),
    "json_missing_field": ({}, _edit_json(PREFIX_CONFIG, lambda c: c.pop("head_dim")), ValueError,
                           r"field 'head_dim' is missing"),
    "json_unknown_field": ({}, _edit_json(PREFIX_CONFIG, lambda c: c.update(extra=1)), ValueError,
                           r"unknown fields \['extra'\]"),
    "format_version": ({}, _edit_json(PREFIX_CONFIG, lambda c: c.update(format_version=99)), ValueError,
                       r"format_version is 99"),
    "json_corrupt": ({}, _write(PREFIX_CONFIG, '{"format_version": 1, "model'), ValueError,
                     r"prefix_tuning_config\.json: not valid JSON"),
    "json_missing": ({}, _remove(PREFIX_CONFIG), FileNotFoundError, r"prefix_tuning_config\.json: no such file"),
    "tensor_name": ({}, _edit_tensors(PREFIX_WEIGHTS, lambda t: _rename(t, "prefix_embedding", "prefix_embeddings")),
                    ValueError, r"missing \['prefix_embedding'\], unexpected \['prefix_embeddings'\]"),
    "tensor_shape": ({}, _edit_tensors(PREFIX_WEIGHTS, lambda t: t.update(prefix_embedding=torch.zeros(1, 5, 128))),
                     ValueError, r"'prefix_embedding' has shape \(1, 5, 128\) in the file, but \(1, 4, 128\)"),
    "tensor_int": ({}, _edit_tensors(PREFIX_WEIGHTS,
                                     lambda t: t.update(prefix_embedding=t["prefix_embedding"].to(torch.int32))),
                   ValueError, r"'prefix_embedding' has dtype torch\.int32 .* floating dtype"),
    "truncated": ({}, _truncate(PREFIX_WEIGHTS), ValueError,
                  r"prefix_tuning\.safetensors: not a readable safetensors file \(truncated or corrupt\?\)"),
    "garbage": ({}, _write(PREFIX_WEIGHTS, "not a safetensors file at all"), ValueError,
                r"prefix_tuning\.safetensors: not a readable safetensors file"),
    "weights_missing": ({}, _remove(PREFIX_WEIGHTS), FileNotFoundError,
                        r"prefix_tuning\.safetensors: no such file"),
}


@pytest.mark.parametrize("case", PREFIX_FAILURES)
def test_load_prefix_refuses_mismatch_and_leaves_model_unchanged(case, tmp_path):
    kwargs, corrupt, error, pattern = PREFIX_FAILURES[case]
    base = tiny_model()
    wrapped(base, seed=1).save_prefix(tmp_path)
    if corrupt is not None:
        corrupt(tmp_path)
    target = wrapped(base, seed=2, **kwargs)
    before = snapshot(target)
    with pytest.raises(error, match=pattern):
        target.load_prefix(tmp_path)
    assert_unchanged(target, before)


def test_load_prefix_accepts_other_float_dtypes_and_casts(tmp_path):
    base = tiny_model()
    source = wrapped(base, seed=1)
    source.save_prefix(tmp_path)
    half = load_file(tmp_path / PREFIX_WEIGHTS)["prefix_embedding"].to(torch.bfloat16)
    save_file({"prefix_embedding": half}, tmp_path / PREFIX_WEIGHTS)
    target = wrapped(base, seed=2).load_prefix(tmp_path)
    assert target.prefix_embedding.dtype == torch.float32
    assert torch.equal(target.prefix_embedding, half.float())


# ---- PEFT -----------------------------------------------------------------------------------------
try:
    import peft
except ImportError:  # the PEFT-side checks need it; our own format and the refusals do not
    peft = None
needs_peft = pytest.mark.skipif(peft is None, reason="needs peft")

EXPORTS = {
    "llama": ("llama", {}, 0),
    "gpt2": ("gpt2", {}, 0),
    "projection": ("llama", {"projection_hidden": 16}, 0),
    "bank_row_2": ("llama", {"num_prefixes": 3}, 2),
}


@needs_peft
@pytest.mark.parametrize("case", EXPORTS)
def test_peft_export_loads_in_peft_with_the_same_logits(case, tmp_path):
    family, kwargs, index = EXPORTS[case]
    base = tiny_model(family)
    ours = wrapped(base, **kwargs)
    ours.save_peft_adapter(tmp_path, prefix_index=index)

    config = json.loads((tmp_path / PEFT_CONFIG).read_text())
    kv_heads, head_dim = ours.spec.num_kv_heads, ours.spec.head_dim
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["num_layers"]) == (P, 2)
    assert (config["token_dim"], config["num_attention_heads"]) == (kv_heads * head_dim, kv_heads)
    assert config["inference_mode"] is True and config["prefix_projection"] is False
    assert config["base_model_name_or_path"] is None
    saved = load_file(tmp_path / PEFT_WEIGHTS)
    assert list(saved) == ["prompt_embeddings"]
    assert torch.equal(saved["prompt_embeddings"], ours.prefix_table()[index].detach())

    reference = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(reference.prompt_encoder["default"].embedding.weight, saved["prompt_embeddings"])
    prefix_ids = torch.full((3,), index) if "num_prefixes" in kwargs else None
    assert_close_where_real(our_logits(ours, prefix_ids), peft_logits(reference))


def test_peft_export_refuses_position_offset_none(tmp_path):
    ours = wrapped(tiny_model(), position_offset="none")
    with pytest.raises(ValueError, match=r"position_offset='none' cannot be exported to PEFT"):
        ours.save_peft_adapter(tmp_path)
    assert not any(tmp_path.iterdir())


def test_peft_export_refuses_bad_prefix_index(tmp_path):
    ours = wrapped(tiny_model(), num_prefixes=2)
    with pytest.raises(ValueError, match=r"prefix_index must be an int in \[0, 2\).*got 2"):
        ours.save_peft_adapter(tmp_path, prefix_index=2)


def peft_saved_adapter(base, directory, **config):
    """A PEFT prefix-tuning model of ``base`` (a copy) with random prefixes, saved by PEFT itself."""
    torch.manual_seed(3)
    model = peft.get_peft_model(copy.deepcopy(base),
                                peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P, **config))
    model.save_pretrained(directory)
    return model.eval()


PEFT_ADAPTERS = {
    "llama": ("llama", {}),
    "gpt2": ("gpt2", {}),
    "peft_projection": ("llama", {"prefix_projection": True, "encoder_hidden_size": 16}),
}


@needs_peft
@pytest.mark.parametrize("case", PEFT_ADAPTERS)
def test_load_peft_saved_adapter_gives_peft_logits(case, tmp_path):
    family, config = PEFT_ADAPTERS[case]
    base = tiny_model(family)
    reference = peft_saved_adapter(base, tmp_path, **config)
    want = peft_logits(reference)

    ours = wrapped(base).load_peft_adapter(tmp_path)
    assert_close_where_real(our_logits(ours), want)

    bank = wrapped(base, num_prefixes=3)
    before = bank.prefix_embedding.detach().clone()
    bank.load_peft_adapter(tmp_path, prefix_index=2)
    assert torch.equal(bank.prefix_embedding[:2], before[:2])
    assert torch.equal(bank.prefix_embedding[2], ours.prefix_embedding[0])
    assert_close_where_real(our_logits(bank, torch.tensor([2, 2, 2])), want)

    built = from_peft_adapter(copy.deepcopy(base), tmp_path)
    assert built.spec.num_virtual_tokens == P
    assert torch.equal(built.prefix_embedding, ours.prefix_embedding)


def test_merged_wrapper_exports_and_reloads(tmp_path):
    base = tiny_model()
    ours = wrapped(base, projection_hidden=16)
    table = ours.prefix_table().detach().clone()
    ours.save_peft_adapter(tmp_path)
    with pytest.raises(ValueError, match=r"call merge\(\) first"):
        wrapped(base, projection_hidden=16).load_peft_adapter(tmp_path)
    merged = wrapped(base, seed=2, projection_hidden=16).merge().load_peft_adapter(tmp_path)
    assert torch.equal(merged.prefix_embedding, table)


PEFT_FAILURES = {
    "num_virtual_tokens": ({"num_virtual_tokens": 5}, None, ValueError, r"num_virtual_tokens is 4 .* but 5"),
    "num_layers": ({}, _edit_json(PEFT_CONFIG, lambda c: c.update(num_layers=3)), ValueError,
                   r"adapter_config\.json: num_layers is 3 .* but 2"),
    "width": ({}, _edit_json(PEFT_CONFIG, lambda c: c.update(token_dim=64)), ValueError,
              r"token_dim is 64 .* but 32 .*width .* = 256 differs from this model's 128"),
    "num_attention_heads": ({}, _edit_json(PEFT_CONFIG, lambda c: c.update(num_attention_heads=4)), ValueError,
                            r"num_attention_heads is 4 .* but 2"),
    "peft_type": ({}, _edit_json(PEFT_CONFIG, lambda c: c.update(peft_type="PROMPT_TUNING")), ValueError,
                  r"peft_type is 'PROMPT_TUNING' .* only \('PREFIX_TUNING', 'CARTRIDGE'\)"),
    "missing_field": ({}, _edit_json(PEFT_CONFIG, lambda c: c.pop("token_dim")), ValueError,
                      r"field 'token_dim' is missing"),
    "projection_wrapper": ({"projection_hidden": 16}, None, ValueError, r"call merge\(\) first"),
    "position_offset": ({"position_offset": "none"}, None, ValueError, r"position_offset='none'"),
    "tensor_name": ({}, _edit_tensors(PEFT_WEIGHTS, lambda t: _rename(t, "prompt_embeddings", "embedding.weight")),
                    ValueError, r"no tensor named 'prompt_embeddings' \(found \['embedding\.weight'\]\)"),
    "extra_tensor": ({}, _edit_tensors(PEFT_WEIGHTS, lambda t: t.update(lm_head=torch.zeros(2))), ValueError,
                     r"besides 'prompt_embeddings' it holds \['lm_head'\]"),
    "tensor_shape": ({}, _edit_tensors(PEFT_WEIGHTS, lambda t: t.update(prompt_embeddings=torch.zeros(4, 96))),
                     ValueError, r"'prompt_embeddings' has shape \(4, 96\) in the file, but \(4, 128\)"),
    "tensor_int": ({}, _edit_tensors(PEFT_WEIGHTS, lambda t: t.update(prompt_embeddings=torch.ones(4, 128).long())),
                   ValueError, r"dtype torch\.int64 .* floating dtype"),
    "truncated": ({}, _truncate(PEFT_WEIGHTS), ValueError,
                  r"adapter_model\.safetensors: not a readable safetensors file \(truncated or corrupt\?\)"),
    "config_corrupt": ({}, _write(PEFT_CONFIG, "{"), ValueError, r"adapter_config\.json: not valid JSON"),
    "config_missing": ({}, _remove(PEFT_CONFIG), FileNotFoundError, r"adapter_config\.json: no such file"),
    "weights_missing": ({}, _remove(PEFT_WEIGHTS), FileNotFoundError, r"adapter_model\.safetensors: no such file"),
    "pickle_only": ({}, lambda d: (d / PEFT_WEIGHTS).rename(d / "adapter_model.bin"), ValueError,
                    r"only the pickle file .*adapter_model\.bin, which is not loaded"),
}


@pytest.mark.parametrize("case", PEFT_FAILURES)
def test_load_peft_adapter_refuses_mismatch_and_leaves_model_unchanged(case, tmp_path):
    kwargs, corrupt, error, pattern = PEFT_FAILURES[case]
    base = tiny_model()
    wrapped(base, seed=1).save_peft_adapter(tmp_path)
    if corrupt is not None:
        corrupt(tmp_path)
    target = wrapped(base, seed=2, **kwargs)
    before = snapshot(target)
    with pytest.raises(error, match=pattern):
        target.load_peft_adapter(tmp_path)
    assert_unchanged(target, before)


def test_load_peft_adapter_refuses_bad_prefix_index(tmp_path):
    base = tiny_model()
    wrapped(base).save_peft_adapter(tmp_path)
    target = wrapped(base, seed=2, num_prefixes=2)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"prefix_index must be an int in \[0, 2\).*got -1"):
        target.load_peft_adapter(tmp_path, prefix_index=-1)
    assert_unchanged(target, before)


def test_from_peft_adapter_checks_before_wrapping(tmp_path):
    """A mismatching adapter leaves the model unwrapped: trainable, its own attention, no hook."""
    wrapped(tiny_model("gpt2")).save_peft_adapter(tmp_path)
    model = tiny_model("llama")
    attn = model.config._attn_implementation
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"token_dim is 64 .* but 32"):
        from_peft_adapter(model, tmp_path)
    assert model.config._attn_implementation == attn
    assert all(p.requires_grad for p in model.parameters())
    assert not model._forward_pre_hooks
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"num_virtual_tokens comes from the adapter"):
        from_peft_adapter(model, tmp_path, num_virtual_tokens=P)
