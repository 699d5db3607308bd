"""transformers 5.x API renames (prefix_kernels/hf/compat.py): our calls raise no FutureWarning or
deprecation warning on the installed transformers, and the older API (``past_key_values``,
``gradient_checkpointing_*``, what transformers 5.17 has) gives the same results -- forced here by
monkeypatching the detection, so both paths run whatever transformers is installed.

(PEFT's own calls still warn under transformers 5.24 -- its forward passes ``past_key_values`` and
reads ``is_gradient_checkpointing`` -- so this file does not use PEFT. The attention runs on the
reference backend: which kernel computes it does not change what transformers is called with, and
the kernels in the model are tested in test_hf_models.py.)
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import padded_batch, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402
from prefix_kernels.hf import compat  # noqa: E402

P = 3


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def hf_log(monkeypatch):
    """transformers' log records (its ``warning_once`` made to log every time, so that earlier tests
    cannot hide a deprecation note)."""
    from transformers.utils import logging as hf_logging

    monkeypatch.setattr(logging.Logger, "warning_once", logging.Logger.warning)
    records = _Records()
    root = hf_logging.get_logger()
    root.addHandler(records)
    yield records
    root.removeHandler(records)


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _exercise(wrapped):
    """forward + backward, activation-checkpointed training step, greedy and beam generate."""
    ids, mask = padded_batch()
    wrapped(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
    grad = wrapped.prefix_embedding.grad.clone()
    wrapped.prefix_embedding.grad = None
    wrapped.activation_checkpointing_enable()
    assert wrapped.is_activation_checkpointing
    wrapped.train()
    wrapped(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask)).loss.backward()
    wrapped.eval()
    torch.testing.assert_close(wrapped.prefix_embedding.grad, grad, atol=1e-6, rtol=1e-5)
    left = mask.flip(1)
    gen = dict(max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    greedy = wrapped.generate(input_ids=ids, attention_mask=left, do_sample=False, **gen)
    beams = wrapped.generate(input_ids=ids, attention_mask=left, do_sample=False, num_beams=2, **gen)
    assert greedy.shape == beams.shape == (ids.shape[0], ids.shape[1] + 3)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_our_calls_raise_no_deprecation_warning(family, hf_log):
    model = tiny_model(family)
    with warnings.catch_warnings():  # here, not in a fixture: pytest resets the filters for the test call
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        wrapped = add_prefix_tuning(model, P, init=torch.arange(1, P + 1), backend="reference")  # reads the cache
        _exercise(wrapped)
    deprecated = [m for m in hf_log.messages if "deprecat" in m.lower()]
    assert not deprecated, deprecated


def _force_older_api(monkeypatch) -> list[dict]:
    """Makes the detection answer as under an older transformers 5.x (5.17): ``past_key_values`` and
    ``gradient_checkpointing_*``. Returns the keyword arguments of each gradient_checkpointing_enable
    call that reaches a model."""
    from transformers import PreTrainedModel

    monkeypatch.setattr(compat, "cache_name", lambda model: "past_key_values")
    monkeypatch.setattr(compat, "has_activation_checkpointing", lambda model: False)
    calls, enable = [], PreTrainedModel.gradient_checkpointing_enable

    def recorded(self, *args, **kwargs):
        calls.append(kwargs)
        return enable(self, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", recorded)
    return calls


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_older_api_path_gives_the_same_results(family, monkeypatch):
    ids = torch.arange(1, P + 1)  # init from token ids
    current = add_prefix_tuning(tiny_model(family), P, init=ids, backend="reference")
    calls = _force_older_api(monkeypatch)
    with warnings.catch_warnings():  # the older names warn on a newer transformers: expected here
        warnings.simplefilter("ignore", FutureWarning)
        older = add_prefix_tuning(tiny_model(family), P, init=ids, backend="reference")
        assert older.prefix_embedding.abs().max() > 0
        torch.testing.assert_close(older.prefix_embedding, current.prefix_embedding, atol=0, rtol=0)
        _exercise(older)
    assert calls == [dict(gradient_checkpointing_kwargs={"use_reentrant": False})]


@pytest.mark.parametrize("name", compat.CACHE_NAMES)
def test_cache_passed_under_either_name_sets_the_positions(name):
    """A decode step given the cache by hand (either name; the older one warns on newer
    transformers, the caller's choice) continues at the right positions: its logits equal the
    full forward's last ones."""
    wrapped = add_prefix_tuning(tiny_model("llama"), P, backend="reference")
    if name == "cache" and compat.cache_name(wrapped.base_model) != "cache":
        pytest.skip("this transformers takes the cache as past_key_values only")
    ids, mask = padded_batch(left=False)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        full = wrapped(input_ids=ids, attention_mask=mask).logits[:, -1]
        out = wrapped(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = compat.output_cache(out)
        assert cache is not None and cache.get_seq_length() == ids.shape[1] - 1
        step = wrapped(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1]
    real = mask[:, -1].bool()
    torch.testing.assert_close(step[real], full[real], atol=2e-5, rtol=1e-5)


def test_a_classification_run_reads_no_deprecated_cache_name(hf_log):
    """BERT's heads take no cache argument under either name; reading the cache from their output by
    the older name would log transformers' deprecation on every run."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=96, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids, mask = padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = add_prefix_tuning(model, P, backend="reference")
        out = wrapped(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 2]))
        out.loss.backward()
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "prefix_kernels" in w.filename]
    assert not ours, [str(w.message) for w in ours]
    deprecated = [m for m in hf_log.messages if "deprecat" in m.lower()]
    assert not deprecated, deprecated


def test_output_cache_reads_the_name_the_output_declares():
    """The cache comes back whichever name the output class declares (``cache`` in newer transformers,
    ``past_key_values`` in older ones); outputs without one, and tuples, have none."""
    from dataclasses import dataclass

    from transformers.utils import ModelOutput

    @dataclass
    class Older(ModelOutput):
        past_key_values: object = None

    @dataclass
    class Headless(ModelOutput):
        logits: object = None

    marker = object()
    assert compat.output_cache(Older(past_key_values=marker)) is marker
    assert compat.output_cache(Headless(logits=torch.zeros(1))) is None
    assert compat.output_cache((torch.zeros(1),)) is None
