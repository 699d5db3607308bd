"""``prefix-kernels train``'s outputs checked before it trains (an --out that is a file, or that
holds a run without --resume / --overwrite), and the user errors of arguments, data and a run to
resume: one line naming what is wrong, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytest.importorskip("transformers")

from prefix_kernels.cli import main  # noqa: E402

FAST = ["--steps", "2", "--batch-size", "4", "--prefix-length", "3", "--no-progress", "--eval-every", "0",
        "--examples", "0"]


def _data(tmp_path, rows=None):
    path = tmp_path / "data.jsonl"
    rows = rows or [{"prompt": f"n[{i}] |\nDescription:", "completion": f" item {i} is nice."} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _refused(capsys, argv, needle):
    """argv fails at once (before any training) with status 2 and one line on stderr holding ``needle``."""
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("prefix-kernels train: error: ") and needle in lines[0], lines[0]


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "taken"
    out.write_text("not a folder")
    _refused(capsys, ["train", "--model", "tiny", "--data", str(data), "--out", str(out), *FAST],
             f"--out {out}: exists and is not a folder")
    assert out.read_text() == "not a folder"
    _refused(capsys, ["train", "--model", "tiny", "--data", str(data), "--out", str(out / "run"), *FAST],
             f"--out {out / 'run'}: {out} is not a folder")


def test_an_out_holding_a_run_is_kept_unless_overwrite(tmp_path, capsys):
    data, out = _data(tmp_path), tmp_path / "run"
    args = ["train", "--model", "tiny", "--data", str(data), "--out", str(out), *FAST]
    assert main(args) == 0
    before = _files(out)
    _refused(capsys, args, f"--out {out} holds a run already")
    assert _files(out) == before
    _refused(capsys, args + ["--overwrite", "--resume"], "--resume and --overwrite exclude each other")
    (out / "peft_adapter" / "stale.txt").write_text("of the old run")
    assert main(args + ["--overwrite", "--steps", "3"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3  # not 2 + 3: a new run
    assert not (out / "peft_adapter" / "stale.txt").exists()


def _saved_run(tmp_path, config=None, metrics=None):
    """A run folder as --resume reads it first: the prefix config (and metrics.json when given)."""
    out = tmp_path / "run"
    out.mkdir(exist_ok=True)
    config = {"format_version": 1, "num_virtual_tokens": 3, "projection_hidden": None, **(config or {})}
    (out / "prefix_tuning_config.json").write_text(json.dumps(config))
    if isinstance(metrics, bytes):
        (out / "metrics.json").write_bytes(metrics)
    elif metrics is not None:
        (out / "metrics.json").write_text(json.dumps({"steps": 2, "train_loss": [1.0, 0.9], "eval_loss": [],
                                                      **metrics}))
    return out


def _resume(config=None, metrics=None):
    return lambda tmp_path: ["--resume", "--out", str(_saved_run(tmp_path, config, metrics))]


CASES = {  # name: (the extra arguments, or a function of tmp_path giving them; data rows or None; the message)
    "device cuda without a GPU": (["--device", "cuda"], None, "--device cuda: no CUDA GPU is available here"),
    "device bogus": (["--device", "bogus"], None, "--device 'bogus': not a device (expected cpu, cuda"),
    "device cuda:7": (["--device", "cuda:7"], None, "--device cuda:7: "),
    "lone surrogate in a prompt": ([], [{"prompt": "caf\ud800", "completion": " b"}] * 4,
                                   'data.jsonl:1: "prompt" is not valid Unicode text: a lone surrogate'),
    "data nested 100k deep": ([], "[" * 100_000 + "]" * 100_000, "data.jsonl:1: JSON nested too deeply"),
    "resume config P=0": (_resume({"num_virtual_tokens": 0}), None, "num_virtual_tokens must be an integer >= 1"),
    "resume config projection_hidden abc": (_resume({"projection_hidden": "abc"}), None,
                                            "projection_hidden must be null or an integer >= 1, got 'abc'"),
    "resume config projection_hidden -3": (_resume({"projection_hidden": -3}), None,
                                           "projection_hidden must be null or an integer >= 1, got -3"),
    "resume config num_frozen_tokens x": (_resume({"num_frozen_tokens": "x"}), None,
                                          "num_frozen_tokens must be an integer in [0, num_virtual_tokens=3], got 'x'"),
    "resume config num_frozen_tokens -2": (_resume({"num_frozen_tokens": -2}), None,
                                           "num_frozen_tokens must be an integer in [0, num_virtual_tokens=3], got -2"),
    "resume metrics not JSON": (_resume(metrics=b'{"steps": 2,'), None, "metrics.json: not valid JSON"),
    "resume metrics not UTF-8": (_resume(metrics=b'{"steps": "\xff\xfe"}'), None, "metrics.json: not UTF-8 text"),
    "resume metrics train_loss x": (_resume(metrics={"train_loss": "x"}), None,
                                    "metrics.json: train_loss must be a list of finite numbers, got 'x'"),
    "resume metrics steps -100": (_resume(metrics={"steps": -100}), None,
                                  "metrics.json: steps must be an integer >= 0, got -100"),
    "lr inf": (["--lr", "inf"], None, "--lr must be a finite number > 0, got inf"),
    "lr nan": (["--lr", "nan"], None, "--lr must be a finite number > 0, got nan"),
    "lr 0": (["--lr", "0"], None, "--lr must be a finite number > 0, got 0.0"),
    "init-text empty": (["--init-text", ""], None, "--init-text is empty"),
    "init-text blank": (["--init-text", "  "], None, "--init-text is empty"),
    "init-text undecodable bytes": (["--init-text", "caf\udcff"], None, "--init-text is not valid Unicode text"),
    "save-every negative": (["--save-every", "-1"], None, "--save-every must be >= 0, got -1"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_user_errors_are_one_line_and_write_nothing(tmp_path, capsys, name):
    extra, rows, needle = CASES[name]
    if name == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if isinstance(rows, str):
        data = tmp_path / "data.jsonl"
        data.write_text(rows + "\n")
    else:
        data = _data(tmp_path, rows)
    extra = extra(tmp_path) if callable(extra) else extra + ["--out", str(tmp_path / "run")]
    before = _files(tmp_path)
    _refused(capsys, ["train", "--model", "tiny", "--data", str(data), *FAST, *extra], needle)
    assert _files(tmp_path) == before  # nothing written, nothing changed
