"""``prefix-kernels train`` stopped by SIGINT (Ctrl-C) or SIGTERM between two steps: the prefix,
optimizer and RNG state and metrics saved, one line saying where, exit status 130; ``--resume``
continues to the losses of a run never stopped, for every task; a crashed run resumes from its last
periodic save (``--save-every``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from prefix_kernels.cli import main  # noqa: E402

FAST = ["--steps", "6", "--batch-size", "4", "--prefix-length", "3", "--no-progress", "--eval-every", "2",
        "--save-every", "2", "--examples", "0"]


def _data(tmp_path, task):
    rows = {"causal": lambda i: {"prompt": f"n[{i}] |\nDescription:", "completion": f" item {i} is nice."},
            "classification": lambda i: {"text": f"{'good' if i % 2 else 'bad'} thing {i}",
                                         "label": ("neg", "pos")[i % 2]},
            "seq2seq": lambda i: {"source": f"n[{i}]", "target": f"item {i}"}}[task]
    path = tmp_path / f"{task}.jsonl"
    path.write_text("".join(json.dumps(rows(i)) + "\n" for i in range(16)))
    return path


def _signal_after_step(monkeypatch, step, signum):
    """Sends ``signum`` to this process from inside optimizer step ``step`` (1-based): a real
    signal, arriving mid-step as Ctrl-C would."""
    calls, original = [0], torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            os.kill(os.getpid(), signum)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


# classification and seq2seq's tiny models have dropout: the same losses need the RNG state restored
@pytest.mark.parametrize("task, signum", [("causal", signal.SIGINT), ("classification", signal.SIGTERM),
                                          ("seq2seq", signal.SIGINT)])
def test_a_run_stopped_by_a_signal_and_resumed_has_the_losses_of_one_never_stopped(tmp_path, capsys, monkeypatch,
                                                                                   task, signum):
    args = ["train", "--task", task, "--model", "tiny", "--data", str(_data(tmp_path, task)), *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(args + ["--out", str(whole)]) == 0
    capsys.readouterr()

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 3, signum)
        assert main(args + ["--out", str(parts)]) == 130
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # given back
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"prefix-kernels train: interrupted ({signum.name}) at step 3 of 6, saved "
                                            f"to {parts}; continue with --resume --out {parts}")
    stopped = _metrics(parts)
    assert stopped["steps"] == 3 and len(stopped["train_loss"]) == 3
    assert json.loads((parts / "trainer_state.json").read_text())["step"] == 3
    assert (parts / "prefix_tuning.safetensors").is_file() and (parts / "loss_curve.png").is_file()

    assert main(args + ["--out", str(parts), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    expected, got = _metrics(whole), _metrics(parts)
    assert got["steps"] == 6
    assert got["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-6)
    assert [s for s, _ in got["eval_loss"]] == [s for s, _ in expected["eval_loss"]] == [0, 2, 4, 6]
    assert [v for _, v in got["eval_loss"]] == pytest.approx([v for _, v in expected["eval_loss"]], abs=1e-6)


def test_a_crashed_run_resumes_from_its_last_periodic_save(tmp_path, capsys, monkeypatch):
    args = ["train", "--model", "tiny", "--data", str(_data(tmp_path, "causal")), *FAST]
    whole, crashed = tmp_path / "whole", tmp_path / "crashed"
    assert main(args + ["--out", str(whole)]) == 0

    calls, original = [0], torch.optim.AdamW.step

    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise MemoryError("out of memory in step 5")
        return original(self, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", step)
        with pytest.raises(MemoryError):
            main(args + ["--out", str(crashed)])
    assert _metrics(crashed)["steps"] == 4  # --save-every 2: the save of step 4
    capsys.readouterr()
    assert main(args + ["--out", str(crashed), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out and "after 4 steps" in _metrics(crashed)["init"]
    assert _metrics(crashed)["train_loss"] == pytest.approx(_metrics(whole)["train_loss"], abs=1e-6)


def test_a_second_ctrl_c_stops_at_once_leaving_the_last_save(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls, original = [0], torch.optim.AdamW.step

    def step(self, *a, **k):  # a step that seems to hang: Ctrl-C, Ctrl-C
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    assert main(["train", "--model", "tiny", "--data", str(_data(tmp_path, "causal")), "--out", str(out),
                 *FAST]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "prefix-kernels train: interrupted"
    assert calls[0] == 3 and _metrics(out)["steps"] == 2  # the save of step 2, whole
    assert json.loads((out / "trainer_state.json").read_text())["step"] == 2


def test_ctrl_c_in_the_command_saves_and_exits_130(tmp_path):
    """The command as a user runs it, stopped by a SIGINT from outside once training is under way."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "prefix_kernels", "train", "--model", "tiny", "--data",
           str(_data(tmp_path, "causal")), "--out", str(out), "--steps", "100000", "--batch-size", "2",
           "--prefix-length", "3", "--no-progress", "--eval-every", "0", "--examples", "0", "--save-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a first run may compile the C++ CPU op
        while not (out / "trainer_state.json").exists():  # the first periodic save: training runs
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no save within 300 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    steps = _metrics(out)["steps"]
    assert line == (f"prefix-kernels train: interrupted (SIGINT) at step {steps} of 100000, saved to {out}; "
                    f"continue with --resume --out {out}")
    assert 1 <= steps < 100000 and len(_metrics(out)["train_loss"]) == steps
    assert json.loads((out / "trainer_state.json").read_text())["step"] == steps
