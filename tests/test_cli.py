"""The command line: demo (tiny model), train (tiny / own model dir + JSONL, resume, one-line user
errors), check (every backend against the fp32 reference; none available is a failure), profile,
and the runs/ folder they write into."""

from __future__ import annotations

import json
import time

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
    _assert_run_files(out, steps=3)


def _assert_run_files(out, steps):
    """metrics.json with the per-step losses and the held-out points; loss_curve.png, a real PNG."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss"]) == metrics["steps"] == steps
    assert [step for step, _ in metrics["eval_loss"]][-1] == steps
    assert metrics["final_eval_loss"] == metrics["eval_loss"][-1][1]
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return metrics


def _tiny_model_dir(tmp_path):
    from prefix_kernels.models import tiny_random_llama

    model, tokenizer = tiny_random_llama()
    path = tmp_path / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _data(tmp_path, n=12):
    data = tmp_path / "data.jsonl"
    rows = [{"prompt": f"n[{i}] |\nDescription:", "completion": f" item {i} is nice."} for i in range(n)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return data


TRAIN_FAST = ["--steps", "2", "--batch-size", "4", "--prefix-length", "3", "--no-progress", "--eval-every", "0",
              "--examples", "1", "--max-new-tokens", "4"]


def test_train_saves_and_resumes(tmp_path, capsys):
    data, model_dir, out = _data(tmp_path), _tiny_model_dir(tmp_path), tmp_path / "run"
    args = ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), *TRAIN_FAST]
    assert main(args) == 0
    first = _assert_run_files(out, steps=2)
    assert (out / "prefix_tuning.safetensors").is_file()
    assert (out / "peft_adapter" / "adapter_config.json").is_file()
    assert main(args + ["--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    metrics = _assert_run_files(out, steps=4)  # the loss history continues
    assert metrics["train_loss"][:2] == first["train_loss"]


def test_train_tiny_end_to_end_into_runs(tmp_path, monkeypatch, capsys):
    """--model tiny, the default --out (runs/train-<time>/ under the current directory), the default
    init (the training text's keys/values), generations before and after."""
    data = _data(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", "tiny", "--data", str(data), *TRAIN_FAST]) == 0
    text = capsys.readouterr().out
    assert "init data" in text and "initial prefix (" in text and "trained prefix ->" in text
    (out,) = (tmp_path / "runs").glob("train-*")
    metrics = _assert_run_files(out, steps=2)
    assert metrics["model"] == "tiny random Llama" and metrics["prefix_length"] == 3
    assert metrics["generations"][0]["prompt"] == "n[11] |\nDescription:"
    assert {"before", "after"} <= set(metrics["generations"][0])
    assert (out / "prefix_tuning.safetensors").is_file() and (out / "prefix_tuning_config.json").is_file()


def test_train_cartridge_from_a_corpus_file(tmp_path, capsys):
    """--init-file: the first P tokens of a file (read in chunks), the first k of them frozen through
    training and saved as such (a CARTRIDGE adapter for PEFT)."""
    from safetensors.torch import load_file

    data, out, corpus = _data(tmp_path), tmp_path / "run", tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    args = ["train", "--model", "tiny", "--data", str(data), "--out", str(out), *TRAIN_FAST, "--prefix-length", "40",
            "--init-file", str(corpus), "--num-frozen-tokens", "1"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "P=40 (1 frozen)" in text and f"the first 40 tokens of {corpus}" in text
    config = json.loads((out / "prefix_tuning_config.json").read_text())
    assert config["num_frozen_tokens"] == 1 and config["num_virtual_tokens"] == 40
    tensors = load_file(out / "prefix_tuning.safetensors")
    assert tensors["frozen_prefix"].shape[1] == 1 and tensors["prefix_embedding"].shape[1] == 39
    assert json.loads((out / "peft_adapter" / "adapter_config.json").read_text())["peft_type"] == "CARTRIDGE"
    _user_error(capsys, args[:-4] + ["--init-file", str(tmp_path / "none.txt")], "no such file")
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    _user_error(capsys, args[:-4] + ["--init-file", str(short), "--overwrite"], "fewer than --prefix-length 40")


def _user_error(capsys, argv, needle):
    """argv fails at once with status 2 and exactly one line on stderr, containing ``needle``."""
    start = time.perf_counter()
    assert main(argv) == 2
    assert time.perf_counter() - start < 5
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"prefix-kernels {argv[0]}: error: ") and needle in lines[0], lines[0]
    return lines[0]


def test_train_model_errors_are_one_line(tmp_path, capsys):
    data = _data(tmp_path)
    (tmp_path / "empty").mkdir()
    for model, needle in [("no-such-model", "unknown model"), (str(tmp_path / "missing"), "no such directory"),
                          (str(tmp_path / "empty"), "no config.json")]:
        line = _user_error(capsys, ["train", "--model", model, "--data", str(data)], needle)
        assert line.startswith(f"prefix-kernels train: error: --model {model}")
        if "no config" not in needle:
            assert "expected tiny, smollm2 or a local transformers model directory" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content, needle", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 'bad.jsonl:2: missing "completion"'),
    ("", "no examples"),
    ('{"prompt": "a", "completion": " b", "split": "eval"}\n', "no training examples"),
    (('{"prompt": "a", "completion": "' + "x" * 40 + '"}\n') * 3, "more than max_length=8"),
])
def test_train_data_errors_are_one_line(tmp_path, capsys, content, needle):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(data), "--max-length", "8",
                         "--out", str(tmp_path / "o")], needle)
    assert not (tmp_path / "o").exists()


def test_train_argument_errors_are_one_line(tmp_path, capsys):
    data = _data(tmp_path)
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(tmp_path / "nope.jsonl")],
                "No such file or directory")
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(data), "--steps", "0"], "--steps must be >= 1")
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(data), "--resume"], "--resume needs --out")
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(data), "--resume", "--out", str(tmp_path)],
                "no saved prefix")
    _user_error(capsys, ["train", "--model", "tiny", "--data", str(data), "--projection-hidden", "8",
                         "--init", "data"], "--init random")


def test_load_model_never_reaches_for_the_hub(tmp_path):
    """A directory with a config but no weights fails locally (local_files_only), at once."""
    from prefix_kernels.models import ModelUnavailable, load_model, tiny_random_llama

    model, tokenizer = tiny_random_llama()
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable, match="no file named model.safetensors"):
        load_model(str(tmp_path))
    assert time.perf_counter() - start < 5


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, capsys):
    import sys

    from prefix_kernels.training import save_run

    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    written = save_run(tmp_path, {"train_loss": [2.0, 1.0], "eval_loss": [(0, 2.5), (2, 1.5)]}, "t")
    assert written == [tmp_path / "metrics.json"] and not (tmp_path / "loss_curve.png").exists()
    assert capsys.readouterr().out.strip() == "(matplotlib is not installed, so no loss curve PNG: pip install matplotlib)"


# -- check -------------------------------------------------------------------------------------------

CHECK_FAST = ["check", "--batch", "2", "--seq", "32", "--prefix", "4", "--reps", "1"]


def _backend_sections(text):
    """{backend: {quantity: (error, "ok" or "FAIL")}} from the check report."""
    sections, current = {}, None
    for line in text.splitlines():
        if " on cpu, " in line or " on cuda, " in line:
            current = sections.setdefault(line.split()[0], {})
        elif current is not None and line.strip().split()[:1] and line.split()[0] in (
                "out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"):
            current[line.split()[0]] = (float(line.split()[1]), line.split()[2])
    return sections


def test_check_reports_every_backend_against_the_reference(capsys):
    """Under TRITON_INTERPRET=1 (conftest) the Triton kernels run on CPU too: both backends are
    checked, each of the six quantities reported."""
    from prefix_kernels import cpu

    backends = "triton,cpu" if cpu.is_available() else "triton"
    assert main([*CHECK_FAST, "--backends", backends]) == 0
    text = capsys.readouterr().out
    sections = _backend_sections(text)
    assert set(sections) == set(backends.split(","))
    for errors in sections.values():
        assert len(errors) == 6 and all(verdict == "ok" and 0 <= e < 2e-2 for e, verdict in errors.values())
    assert "check passed" in text


def test_check_fails_when_a_backend_is_wrong(monkeypatch, capsys):
    """The comparison is against an independent reference: a backend 10% off fails."""
    from prefix_kernels.cli import check as check_cli

    real = check_cli.prefix_attention
    monkeypatch.setattr(check_cli, "prefix_attention", lambda *a, **k: real(*a, **k) * 1.1)
    assert main([*CHECK_FAST, "--backends", "triton"]) == 1
    text = capsys.readouterr().out
    assert "check FAILED" in text and _backend_sections(text)["triton"]["out"][1] == "FAIL"


def test_check_without_a_fast_backend_fails_and_says_so(monkeypatch, capsys):
    import torch

    from prefix_kernels import cpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "unavailable_reason", lambda: "disabled by PREFIX_KERNELS_DISABLE_CPU_EXT")
    assert main(CHECK_FAST) == 1
    text = capsys.readouterr().out
    assert "cpu     unavailable: disabled by PREFIX_KERNELS_DISABLE_CPU_EXT" in text
    assert "no fast backend" in text and "check passed" not in text and "error" not in text


def test_check_argument_errors(capsys):
    _user_error(capsys, [*CHECK_FAST, "--kv-heads", "4"], "multiple of --kv-heads")


# -- profile -----------------------------------------------------------------------------------------

def test_profile_writes_traces_and_tables_into_runs(tmp_path, monkeypatch, capsys):
    """The default --out is runs/profile-<time>/ under the current directory."""
    monkeypatch.chdir(tmp_path)
    assert main(["profile", "--model", "tiny", "--batch", "2", "--seq", "16", "--prefix", "3",
                 "--decode-tokens", "2", "--rows", "3"]) == 0
    (out,) = (tmp_path / "runs").glob("profile-*")
    for name in ("train_step_ours", "decode_ours"):
        assert (out / f"trace_{name}.json").stat().st_size > 0
        assert (out / f"top_{name}.txt").read_text().strip()
    assert "training step, ours" in capsys.readouterr().out


def test_profile_batches_are_left_padded():
    """Every row ends in a real token (mask 1), so generate() sees no right padding (it warned once
    per call when a prompt row was all padding)."""
    import torch

    from prefix_kernels.cli.profile import left_padded_batch

    ids, mask = left_padded_batch(4, 64, vocab=5, pad=2, device="cpu")
    assert mask[:, -1].all() and not mask[:2, :8].any() and mask[2:].all() and mask[:2, 8:].all()
    assert ((ids == 2) == (mask == 0)).all()  # the pad id only on padding
    assert ids.min() >= 0 and ids.max() < 5 and set(torch.unique(ids[mask == 1]).tolist()) == {0, 1, 3, 4}


def test_bench_default_out_is_under_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--device", "cpu", "--shape", "1x2x1x16x16x2x8", "--providers", "ours,floor",
                 "--no-plot", "--reps", "1", "--warmup", "0"]) == 0
    (out,) = (tmp_path / "runs").glob("bench-*")
    assert list(out.glob("*/attention_*.json"))  # OUT/<device>/


def test_init_from_data_ends_at_an_example_boundary():
    from prefix_kernels.cli.train import _init_from_data
    from prefix_kernels.models import char_tokenizer

    tok = char_tokenizer()
    text = lambda ids: tok.decode(ids.tolist())  # noqa: E731
    examples = [{"prompt": "abcd", "completion": "e"}, {"prompt": "x", "completion": "y"}]
    assert text(_init_from_data(tok, examples, 5)) == "bcde\n"
    assert text(_init_from_data(tok, examples, 8)) == "abcde\nxy\n"[-8:]
    assert text(_init_from_data(tok, examples[1:], 7)) == "\nxy\nxy\n"  # short data: repeated
