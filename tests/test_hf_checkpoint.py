"""Saving and loading prefixes (prefix_kernels.hf.checkpoint): our safetensors format round trip,
export to and import from PEFT prefix-tuning adapters, and every mismatch or corruption refused
with a clear error before any parameter changes."""

from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import time

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from prefix_kernels.hf import checkpoint  # noqa: E402
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


# ---- a save replaces the weights and the config together ------------------------------------------
# what a training run folder holds besides the prefix (the CLI saves into it): never touched by a save
USER_FILES = {"metrics.json": b'{"loss": [2.5, 1.5]}\n', "plots/loss.png": b"\x89PNG not really",
              "optimizer.pt": b"optimizer state", "adapter_model.safetensors.tmp": b"the user's own file"}


class Crash(BaseException):
    """The process dying at that point: no handler of the saver may do anything afterwards."""


class Faults:
    """Counts the saver's file-system steps (writing a file, mkdir, link, copy, fsync, rename,
    unlink) and fails the ``at``-th (or each of a set of steps): with ENOSPC (other steps succeed,
    handlers run), or as a crash (every later step fails too, as if the process had died).
    ``links=False``: a filesystem without hard links (os.link always fails with EPERM, not counted
    as a step)."""

    COUNTED = ("save_file", "_write_json", "mkdir", "link", "copy2", "fsync", "replace", "unlink")

    def __init__(self, at=-1, crash=False, links=True):
        self.at = {at} if isinstance(at, int) else set(at)
        self.crash, self.links, self.steps, self.dead = crash, links, [], False

    def wrap(self, name, fn):
        def step(*args, **kwargs):
            if self.dead:
                raise Crash(name)
            if name == "link" and not self.links:
                raise OSError(errno.EPERM, os.strerror(errno.EPERM), "<link>")
            if name in self.COUNTED:
                self.steps.append(name)
                if len(self.steps) - 1 in self.at:
                    if self.crash:
                        self.dead = True
                        raise Crash(name)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{name}>")
            return fn(*args, **kwargs)
        return step

    def install(self, monkeypatch):
        class Module:
            def __init__(self, real, names):
                self._real, self._names = real, names

            def __getattr__(self, attr):
                value = getattr(self._real, attr)
                return faults.wrap(attr, value) if attr in self._names else value

        faults = self
        monkeypatch.setattr(checkpoint, "os", Module(os, ("mkdir", "link", "fsync", "replace", "unlink")))
        monkeypatch.setattr(checkpoint, "shutil", Module(shutil, ("copy2", "rmtree")), raising=False)
        monkeypatch.setattr(checkpoint, "save_file", self.wrap("save_file", checkpoint.save_file))
        monkeypatch.setattr(checkpoint, "_write_json", self.wrap("_write_json", checkpoint._write_json))


def _put_user_files(directory):
    for name, data in USER_FILES.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)


def _listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _assert_user_files_intact(directory):
    for name, data in USER_FILES.items():
        assert (directory / name).read_bytes() == data, name


def _targets(base):
    """Wrappers to load into, by prefix length (reused: a load overwrites the whole prefix)."""
    return {p: wrapped(base, seed=9, num_virtual_tokens=p) for p in (P, 2 * P)}


def _pair_loaded(fmt, targets, directory, candidates):
    """Which of ``candidates`` (name: the wrapper that saved it) ``directory`` loads as: exactly one
    must load, bit-identical to its wrapper's prefix; the others' sizes must be refused."""
    loaded = []
    for name, source in candidates.items():
        target = targets[source.spec.num_virtual_tokens]
        try:
            (target.load_prefix if fmt == "ours" else target.load_peft_adapter)(directory)
        except ValueError:
            continue
        assert torch.equal(target.prefix_embedding, source.prefix_embedding), f"{name}: another pair's values"
        loaded.append(name)
    assert len(loaded) == 1, f"{directory} loads as {loaded} (expected exactly one of {sorted(candidates)})"
    return loaded[0]


def _save(fmt, model, directory):
    (model.save_prefix if fmt == "ours" else model.save_peft_adapter)(directory)


def _pair_names(fmt):
    return [PREFIX_CONFIG, PREFIX_WEIGHTS] if fmt == "ours" else [PEFT_CONFIG, PEFT_WEIGHTS]


def _steps_of_a_save(fmt, base, tmp_path, monkeypatch, links=True):
    directory = tmp_path / "count"
    directory.mkdir()
    _put_user_files(directory)
    _save(fmt, wrapped(base, seed=1), directory)
    faults = Faults(links=links)
    with monkeypatch.context() as m:
        faults.install(m)
        _save(fmt, wrapped(base, seed=2, num_virtual_tokens=2 * P), directory)
    assert {"save_file", "_write_json", "replace"} <= set(faults.steps)
    return faults.steps


@pytest.mark.parametrize("links", [True, False], ids=["hard_links", "no_hard_links"])
@pytest.mark.parametrize("fmt", ["ours", "peft"])
def test_a_failed_save_at_any_step_keeps_the_previous_pair(fmt, links, tmp_path, monkeypatch):
    """ENOSPC (or any OSError) at each step of saving P=8 over a P=4 save: the error propagates, the
    P=4 pair still loads with its values, nothing is left behind and the user's files are intact.
    (A failing hard link is no failure: the old file is copied instead.)"""
    base = tiny_model()
    old, new = wrapped(base, seed=1), wrapped(base, seed=2, num_virtual_tokens=2 * P)
    steps = _steps_of_a_save(fmt, base, tmp_path, monkeypatch, links)
    targets = _targets(base)
    for at, step in enumerate(steps):
        directory = tmp_path / f"fail_{at}"
        directory.mkdir()
        _put_user_files(directory)
        _save(fmt, old, directory)
        before = _listing(directory)
        if step == "link":
            with monkeypatch.context() as m:
                Faults(at).install(m)
                _save(fmt, new, directory)
            assert _pair_loaded(fmt, targets, directory, {"old": old, "new": new}) == "new"
            assert _listing(directory) == before
            _assert_user_files_intact(directory)
            continue
        with monkeypatch.context() as m:
            Faults(at, links=links).install(m)
            with pytest.raises(OSError) as failure:
                _save(fmt, new, directory)
        assert failure.value.errno == errno.ENOSPC, (at, step)
        assert _listing(directory) == before, (at, step)
        _assert_user_files_intact(directory)
        assert _pair_loaded(fmt, targets, directory, {"old": old, "new": new}) == "old", (at, step)
    _save(fmt, new, directory)  # and with nothing failing, the new pair replaces it
    assert _pair_loaded(fmt, targets, directory, {"old": old, "new": new}) == "new"
    assert _listing(directory) == sorted([*_pair_names(fmt), *USER_FILES, "plots"])
    # the steps tried above: flushed before the renames, the old pair kept by a link or else a copy
    assert "fsync" in steps[:steps.index("replace")]
    assert ("link" in steps) == links and ("copy2" in steps) != links


@pytest.mark.parametrize("fmt", ["ours", "peft"])
def test_a_save_crashed_at_any_step_leaves_one_whole_pair(fmt, tmp_path, monkeypatch):
    """The process dying at each step of saving P=8 over P=4 (no handler runs): the folder loads as
    the old pair up to the point where the new pair is completely written, as the new one after;
    the next save completes and cleans up."""
    base = tiny_model()
    old, new, newer = (wrapped(base, seed=1), wrapped(base, seed=2, num_virtual_tokens=2 * P),
                       wrapped(base, seed=3, num_virtual_tokens=2 * P))
    steps = _steps_of_a_save(fmt, base, tmp_path, monkeypatch)
    targets = _targets(base)
    outcomes = []
    for at, step in enumerate(steps):
        directory = tmp_path / f"crash_{at}"
        directory.mkdir()
        _put_user_files(directory)
        _save(fmt, old, directory)
        with monkeypatch.context() as m:
            Faults(at, crash=True).install(m)
            with pytest.raises(Crash):
                _save(fmt, new, directory)
        _assert_user_files_intact(directory)
        outcomes.append(_pair_loaded(fmt, targets, directory, {"old": old, "new": new}))
        if fmt == "peft":  # from_peft_adapter sizes its wrapper from the same pair
            want = {"old": old, "new": new}[outcomes[-1]].spec.num_virtual_tokens
            assert from_peft_adapter(copy.deepcopy(base), directory).spec.num_virtual_tokens == want, (at, step)
        _save(fmt, newer, directory)
        assert _pair_loaded(fmt, targets, directory, {"old": old, "newer": newer}) == "newer", (at, step)
        assert _listing(directory) == sorted([*_pair_names(fmt), *USER_FILES, "plots"]), (at, step)
    # the old pair while the new one is being written, the new pair once it is complete
    switch = outcomes.index("new")
    assert 0 < switch and outcomes == ["old"] * switch + ["new"] * (len(steps) - switch), list(zip(steps, outcomes))
    # the switch comes after both new files are written and before the first of them is renamed into place
    assert steps.index("save_file") < switch and steps.index("_write_json") < switch <= steps.index("replace"), \
        list(zip(steps, outcomes))


@pytest.mark.parametrize("fmt", ["ours", "peft"])
def test_a_save_whose_undo_fails_too_leaves_the_new_pair_readable(fmt, tmp_path, monkeypatch):
    """Renaming the second new file into place fails, and so does undoing the first rename: the
    error says so and where the new pair is, the folder loads as the new pair, the next save cleans up."""
    base = tiny_model()
    old, new, newer = (wrapped(base, seed=1), wrapped(base, seed=2, num_virtual_tokens=2 * P),
                       wrapped(base, seed=3, num_virtual_tokens=2 * P))
    steps = _steps_of_a_save(fmt, base, tmp_path, monkeypatch)
    second = [i for i, step in enumerate(steps) if step == "replace"][1]
    directory = tmp_path / "double"
    directory.mkdir()
    _put_user_files(directory)
    _save(fmt, old, directory)
    with monkeypatch.context() as m:
        faults = Faults({second, second + 1})
        faults.install(m)
        with pytest.raises(OSError) as failure:
            _save(fmt, new, directory)
    assert faults.steps[second:second + 2] == ["replace", "replace"]  # the rename, then the first undo step
    note = " ".join(getattr(failure.value, "__notes__", []))
    assert f"restoring the previous {_pair_names(fmt)[1]} and {_pair_names(fmt)[0]} in {directory} failed too" in note
    assert ".saving" in note, note
    _assert_user_files_intact(directory)
    targets = _targets(base)
    assert _pair_loaded(fmt, targets, directory, {"old": old, "new": new}) == "new"
    _save(fmt, newer, directory)
    assert _pair_loaded(fmt, targets, directory, {"old": old, "newer": newer}) == "newer"
    assert _listing(directory) == sorted([*_pair_names(fmt), *USER_FILES, "plots"])


def test_a_save_into_a_run_folder_keeps_the_users_files(tmp_path):
    base = tiny_model()
    _put_user_files(tmp_path)
    wrapped(base, seed=1).save_prefix(tmp_path)
    wrapped(base, seed=2).save_peft_adapter(tmp_path)  # both formats side by side
    wrapped(base, seed=3).save_prefix(tmp_path)
    _assert_user_files_intact(tmp_path)
    assert _listing(tmp_path) == sorted([PREFIX_CONFIG, PREFIX_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS, *USER_FILES,
                                         "plots"])


# ---- an adapter's config is checked against its weights before anything is sized from it ---------
@pytest.mark.parametrize("claimed", [10_000_000, 10**12, 2])
def test_from_peft_adapter_checks_num_virtual_tokens_against_the_weights_first(claimed, tmp_path):
    """A small adapter whose config claims another prefix length than its weights hold fails at
    once, naming both files, the config's value and the weights' shape (before: a prefix of the
    claimed length was allocated, 10^7 tokens taking GBs and seconds, 10^12 an allocator error)."""
    wrapped(tiny_model(), seed=1).save_peft_adapter(tmp_path)
    _edit_json(PEFT_CONFIG, lambda c: c.update(num_virtual_tokens=claimed))(tmp_path)
    shape = tuple(load_file(tmp_path / PEFT_WEIGHTS)["prompt_embeddings"].shape)
    assert shape == (P, 128)
    model = tiny_model()
    attn = model.config._attn_implementation
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(ValueError) as refused:
        from_peft_adapter(model, tmp_path)
    elapsed = time.perf_counter() - start
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / PEFT_CONFIG}: num_virtual_tokens is {claimed} in the config, but "
                              f"{tmp_path / PEFT_WEIGHTS} holds 'prompt_embeddings' of shape {shape}"), message
    assert elapsed < 0.5, f"{elapsed:.2f} s"
    assert model.config._attn_implementation == attn and not model._forward_pre_hooks
    assert all(p.requires_grad for p in model.parameters())
    assert_unchanged(model, before)
