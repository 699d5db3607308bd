"""The command line: demo (tiny model), train (own model dir + JSONL, resume), check."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from prefix_kernels.cli import main  # noqa: E402


def test_demo_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--steps", "3", "--compare-steps", "2", "--examples", "1", "--no-progress",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "held-out loss" in text and "before" in text and "after" in text
    if "PEFT" in text:  # peft installed: the comparison table is printed
        assert "step time ratio PEFT / ours" in text
    assert (out / "prefix_tuning.safetensors").is_file()
    assert (out / "peft_adapter" / "adapter_model.safetensors").is_file()


def _tiny_model_dir(tmp_path):
    from prefix_kernels.models import tiny_random_llama

    model, tokenizer = tiny_random_llama()
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_train_saves_and_resumes(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"n[{i}] |\nDescription:", "completion": f" item {i} is nice."} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    model_dir, out = _tiny_model_dir(tmp_path), tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--steps", "2",
            "--batch-size", "4", "--prefix-length", "3", "--no-progress", "--eval-every", "0"]
    assert main(args) == 0
    assert json.loads((out / "train_state.json").read_text())["steps"] == 2
    assert (out / "peft_adapter" / "adapter_config.json").is_file()
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "train_state.json").read_text())["steps"] == 4


def test_train_reports_the_bad_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        main(["train", "--model", str(tmp_path), "--data", str(data), "--out", str(tmp_path / "o")])


def test_check_command(capsys):
    assert main(["check", "--batch", "2", "--seq", "32", "--prefix", "4", "--reps", "1"]) == 0
    assert "check passed" in capsys.readouterr().out


def test_profile_writes_traces_and_tables(tmp_path, capsys):
    out = tmp_path / "prof"
    assert main(["profile", "--model", "tiny", "--batch", "2", "--seq", "16", "--prefix", "3",
                 "--decode-tokens", "2", "--rows", "3", "--out", str(out)]) == 0
    for name in ("train_step_ours", "decode_ours"):
        assert (out / f"trace_{name}.json").stat().st_size > 0
        assert (out / f"top_{name}.txt").read_text().strip()
    assert "training step, ours" in capsys.readouterr().out
