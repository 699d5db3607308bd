"""What a new user meets first: a bare ``prefix-kernels`` (help, not a training run), a mistyped
command, ``--help`` with defaults, ``train --model tiny`` as a short smoke run, ``--threads`` and the
slow-threads hint, the demo's interleaved PEFT timing, train's base / initial / trained comparison,
the plots, and errors that say what to do."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

pytest.importorskip("transformers")

from prefix_kernels import training  # noqa: E402
from prefix_kernels.cli import demo, main  # noqa: E402


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _causal(tmp_path, n=12):
    return _jsonl(tmp_path / "data.jsonl",
                  [{"prompt": f"n[{i}] |\nDescription:", "completion": f" item {i} is nice."} for i in range(n)])


def _reviews(tmp_path, n=24):
    return _jsonl(tmp_path / "reviews.jsonl",
                  [{"text": f"{'good' if i % 2 else 'bad'} thing {i}", "label": ["neg", "pos"][i % 2]}
                   for i in range(n)])


def _one_error_line(capsys, argv, command, needle):
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"prefix-kernels {command}: error: ") and needle in lines[0], lines[0]


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that sets it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- the bare command, typos, --help ----------------------------------------------------------------
def test_bare_command_prints_the_help_and_starts_nothing(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda args: pytest.fail("a bare prefix-kernels started the demo"))
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("demo", "train", "bench", "profile", "check", "inspect"):
        assert f"prefix-kernels {command}" in out
    assert "Start with `prefix-kernels demo`" in out


def test_a_mistyped_command_is_an_invalid_choice(monkeypatch, capsys):
    monkeypatch.setattr(demo, "run", lambda args: pytest.fail("a typo started the demo"))
    with pytest.raises(SystemExit) as exc:
        main(["trian", "--model", "tiny"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'trian'" in err and "'train'" in err and "unrecognized" not in err


@pytest.mark.parametrize("command, needles", [
    ("train", ["training examples per step (default: 8)", "20 with --model tiny", "--threads N"]),
    ("demo", ["training examples per step (default: 8)", "(default: 0.003)", "--threads N"]),
    ("check", ["batch size B of the test problem (default: 4)", "(default: 9)", "(default: 3)", "(default: 256)",
               "(default: 20)", "(default: 64)", "(default: 5)"]),
])
def test_help_shows_the_defaults_and_describes_every_option(capsys, command, needles):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for needle in needles:
        assert needle in out, needle
    assert "(default: None)" not in out and "(default: False)" not in out


# ---- train --model tiny with its defaults: base / initial / trained, several held-out points, plot ----
def _capture_figures(monkeypatch):
    from matplotlib.figure import Figure

    figures = []
    save = Figure.savefig

    def savefig(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return figures


@pytest.fixture(scope="module")
def tiny_default_run(tmp_path_factory):
    """``train --model tiny`` with the default --steps and --eval-every: (out, stdout, the figure)."""
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("tiny_default")
    out, stdout = tmp / "run", io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        figures = _capture_figures(mp)
        assert main(["train", "--model", "tiny", "--data", str(_causal(tmp)), "--out", str(out), "--batch-size",
                     "2", "--prefix-length", "2", "--examples", "1", "--max-new-tokens", "3", "--no-progress"]) == 0
    return out, stdout.getvalue(), figures[-1]


def test_train_tiny_defaults_to_a_short_run(tiny_default_run):
    out, _, _ = tiny_default_run
    assert json.loads((out / "metrics.json").read_text())["steps"] == 20


def test_train_evaluates_at_several_points_by_default(tiny_default_run):
    out, text, _ = tiny_default_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert [step for step, _ in metrics["eval_loss"]] == [0, 4, 8, 12, 16, 20]
    assert "step 8: held-out loss" in text


def test_train_shows_the_base_model_the_initial_and_the_trained_prefix(tiny_default_run):
    out, text, _ = tiny_default_run
    metrics = json.loads((out / "metrics.json").read_text())
    final = [line for line in text.splitlines() if line.startswith("held-out loss: base model")][-1]
    assert f"initial prefix {metrics['eval_loss'][0][1]:.4f}" in final
    assert f"trained prefix {metrics['final_eval_loss']:.4f}" in final
    assert f"base model {metrics['base_model_loss']:.4f}" in final
    listing = text[text.index("held-out generations:"):]
    assert "base model     ->" in listing and "initial prefix ->" in listing and "trained prefix ->" in listing
    assert {"base", "before", "after"} <= set(metrics["generations"][0])


def test_the_causal_plot_draws_the_base_model_and_names_the_unit(tiny_default_run):
    out, _, fig = tiny_default_run
    metrics = json.loads((out / "metrics.json").read_text())
    (ax,) = fig.axes
    assert ax.get_ylabel() == "loss (nats/token)"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("base model") for label in labels), labels
    base_lines = [line for line in ax.get_lines() if list(line.get_ydata()) == [metrics["base_model_loss"]] * 2]
    assert base_lines
    held_out = next(line for line in ax.get_lines() if line.get_label() == "held-out")
    assert len(held_out.get_xdata()) == 6


def test_the_classification_plot_shows_accuracy_and_a_per_example_loss(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    figures = _capture_figures(monkeypatch)
    out = tmp_path / "run"
    assert main(["train", "--task", "classification", "--model", "tiny", "--data", str(_reviews(tmp_path)),
                 "--out", str(out), "--steps", "4", "--eval-every", "2", "--batch-size", "4", "--prefix-length",
                 "2", "--no-progress"]) == 0
    ax, right = figures[-1].axes
    assert ax.get_ylabel() == "loss (nats/example)"
    assert right.get_ylabel() == "held-out accuracy"
    metrics = json.loads((out / "metrics.json").read_text())
    accuracy = next(line for line in right.get_lines() if line.get_label() == "held-out accuracy")
    assert list(accuracy.get_ydata()) == [a for _, a in metrics["eval_accuracy"]]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any(label.startswith("linear probe accuracy") for label in labels), labels


# ---- --threads and the slow-threads hint ------------------------------------------------------------
TRAIN_FAST = ["--steps", "3", "--batch-size", "2", "--prefix-length", "2", "--no-progress", "--eval-every", "0",
              "--examples", "0"]


def test_train_threads_sets_torchs_threads(tmp_path, monkeypatch, threads, capsys):
    monkeypatch.setattr(training, "thread_probe", lambda n: (10.0, 10.0))
    assert main(["train", "--model", "tiny", "--data", str(_causal(tmp_path)), "--out", str(tmp_path / "run"),
                 *TRAIN_FAST, "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    _one_error_line(capsys, ["train", "--model", "tiny", "--data", str(_causal(tmp_path)), "--threads", "0"],
                    "train", "--threads must be >= 1, got 0")


def test_slow_threads_print_one_hint_after_the_first_steps(tmp_path, monkeypatch, threads, capsys):
    calls = []

    def probe(n):
        calls.append(n)
        return 300.0, 40.0  # two threads 7.5x slower than one: the cores are taken

    monkeypatch.setattr(training, "thread_probe", probe)
    assert main(["train", "--model", "tiny", "--data", str(_causal(tmp_path)), "--out", str(tmp_path / "run"),
                 *TRAIN_FAST, "--threads", "2"]) == 0
    out = capsys.readouterr().out
    hints = [line for line in out.splitlines() if line.startswith("(slow steps")]
    assert calls == [2] and len(hints) == 1, out
    assert "--threads 1" in hints[0] and "OMP_NUM_THREADS=1" in hints[0] and "7.5x slower on 2 threads" in hints[0]


def test_no_hint_when_the_threads_help(tmp_path, monkeypatch, threads, capsys):
    monkeypatch.setattr(training, "thread_probe", lambda n: (20.0, 40.0))
    assert main(["train", "--model", "tiny", "--data", str(_causal(tmp_path)), "--out", str(tmp_path / "run"),
                 *TRAIN_FAST, "--threads", "2"]) == 0
    assert "slow steps" not in capsys.readouterr().out


def test_the_thread_probe_times_both_and_restores_the_thread_count(threads):
    torch.set_num_threads(2)
    many, one = training.thread_probe(2, reps=2, size=32)
    assert many > 0 and one > 0 and torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert training.slow_threads_hint("cpu", [1.0, 2.0, 3.0]) is None  # one thread: nothing to hint


# ---- the demo's PEFT comparison: interleaved, a median ratio with its spread --------------------------
def test_interleaved_alternates_the_order_and_times_each_side():
    calls, now = [], [0.0]
    cost = {"a": 0.010, "b": 0.030}

    def clock():
        return now[0]

    def step(side):
        def run(i):
            calls.append((side, i))
            now[0] += cost[side]
        return run

    a_ms, b_ms = training.interleaved(step("a"), step("b"), 4, clock=clock)
    assert calls == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2), ("b", 3), ("a", 3)]
    assert a_ms == pytest.approx([10.0] * 4) and b_ms == pytest.approx([30.0] * 4)


def test_ratio_summary_concludes_only_on_a_narrow_spread():
    steady = training.ratio_summary([100, 10, 11, 10, 12, 10], [900, 20, 21, 22, 25, 19])
    assert steady["pairs"] == 5 and steady["conclusive"]  # the first pair (warm-up) is left out
    assert steady["median"] == pytest.approx(2.0) and steady["q1"] <= steady["median"] <= steady["q3"]
    assert "PEFT is slower" in demo.describe_ratio(steady)
    # the load came and went: one pair says 0.42x, the next 9.32x
    noisy = training.ratio_summary([10, 10, 10, 10, 10], [4.2, 93.2, 5.0, 80.0, 12.0], skip=0)
    assert not noisy["conclusive"] and "too spread to conclude" in demo.describe_ratio(noisy)
    straddling = training.ratio_summary([10] * 5, [9, 11, 9.5, 10.5, 10], skip=0)
    assert not straddling["conclusive"]  # neither clearly slower nor clearly faster
    assert "no difference resolved" in demo.describe_ratio(straddling)
    few = training.ratio_summary([10, 10], [20, 20])
    assert few["pairs"] == 2 and not few["conclusive"] and "too few" in demo.describe_ratio(few)


def test_demo_saves_the_interleaved_comparison(tmp_path, capsys, threads):
    pytest.importorskip("peft")
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--steps", "5", "--compare-steps", "4", "--examples", "0", "--no-progress",
                 "--device", "cpu", "--threads", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "step time ratio PEFT / ours: median" in text and "interquartile range" in text
    metrics = json.loads((out / "metrics.json").read_text())
    comparison = metrics["peft_comparison"]
    assert len(comparison["ours_step_ms"]) == len(comparison["peft_step_ms"]) == 4
    ratio = comparison["ratio_peft_over_ours"]
    assert ratio["pairs"] == 3 and ratio["q1"] <= ratio["median"] <= ratio["q3"]
    assert isinstance(ratio["conclusive"], bool)
    assert len(metrics["train_loss"]) == 5 and metrics["train_loss"][3] == comparison["ours_loss"]
    assert [step for step, _ in metrics["eval_loss"]] == [0, 1, 2, 3, 4, 5]


# ---- errors that say what to do -----------------------------------------------------------------------
def test_a_classification_file_for_a_causal_run_suggests_the_task(tmp_path, capsys):
    _one_error_line(capsys, ["train", "--model", "tiny", "--data", str(_reviews(tmp_path))], "train",
                    'missing "prompt" (it has "text" and "label", the fields of --task classification)')
    _one_error_line(capsys, ["train", "--task", "classification", "--model", "tiny", "--data",
                             str(_causal(tmp_path))], "train",
                    'missing "text" (it has "prompt" and "completion", the fields of --task causal)')


@pytest.mark.parametrize("command", [["demo", "--tiny"], ["profile", "--model", "tiny"]])
@pytest.mark.parametrize("device, needle", [("bogus", "--device 'bogus': not a device"),
                                            ("cuda", "--device cuda: no CUDA GPU is available")])
def test_device_errors_are_one_line(capsys, command, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is here")
    _one_error_line(capsys, [*command, "--device", device], command[0], needle)
