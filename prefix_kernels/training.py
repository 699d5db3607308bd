"""The training loop shared by ``prefix-kernels demo`` and ``prefix-kernels train``: batches of
prompt/completion examples, AdamW on the trainable parameters, a progress bar with loss and
tokens/s, held-out loss, greedy generations, and the run's metrics.json + loss_curve.png; the
trainer state that lets ``prefix-kernels train --resume`` continue a run exactly (the optimizer's
moments, the RNG state, the step that fixes the data order), and the SIGINT/SIGTERM handling that
stops a run between steps so that it can be saved.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class TrainLog:
    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # real (non-padding) tokens per step
    peak_mib: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return sum(self.tokens) / max(sum(self.step_ms), 1e-9) * 1e3

    def median_step_ms(self, first: int = 1) -> float:
        """Median step time, the first ``first`` steps (warm-up, compilation) left out when possible."""
        times = self.step_ms[first:] or self.step_ms
        return sorted(times)[len(times) // 2]


def batch_stream(examples: list[dict], collator, batch_size: int, seed: int = 0, start: int = 0):
    """Endless batches: shuffled epochs over ``examples``, collated. ``start`` skips that many
    batches (drawn, not collated), so a resumed run sees the batches it would have seen."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    skip = start
    while True:
        rng.shuffle(order)
        chunks = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        for chunk in chunks or [list(order)]:
            if skip:
                skip -= 1
                continue
            yield collator([examples[i] for i in chunk])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def make_optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters (no weight decay: a prefix has nothing to decay to)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)


def train_steps(model, batches: list[dict], lr: float, device, *, progress: bool = True, desc: str = "training",
                explicit_positions: bool = False, on_step=None, total: int | None = None, optimizer=None,
                should_stop=None, initial: int = 0, thread_hint: bool = False) -> TrainLog:
    """AdamW over ``model``'s trainable parameters (``optimizer``, when given: a resumed one), one
    step per batch. ``explicit_positions`` passes position_ids counted over the mask (for PEFT,
    which otherwise ignores left padding). After each step ``on_step(step, log)`` runs, then the
    loop ends early when ``should_stop()`` is true; ``initial`` is where the progress bar starts.
    ``thread_hint``: after the first steps on a CPU, one line when torch's threads slow each other
    down (see :func:`slow_threads_hint`)."""
    from tqdm.auto import tqdm

    if optimizer is None:
        optimizer = make_optimizer(model, lr)
    log = TrainLog()
    model.train()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(batches, desc=desc, total=None if total is None else initial + total, initial=initial,
               disable=not progress, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        batch = {k: v.to(device) for k, v in batch.items()}
        if explicit_positions:
            batch["position_ids"] = _positions(batch["attention_mask"])
        _sync(device)
        start = time.perf_counter()
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        log.step_ms.append((time.perf_counter() - start) * 1e3)
        log.losses.append(loss.item())
        log.tokens.append(int(batch["attention_mask"].sum()))
        if not math.isfinite(log.losses[-1]):
            raise FloatingPointError(f"loss became {log.losses[-1]} at step {step}")
        bar.set_postfix(loss=f"{log.losses[-1]:.3f}", tok_s=f"{log.tokens[-1] / log.step_ms[-1] * 1e3:.0f}")
        if thread_hint and step == HINT_AFTER_STEPS - 1:
            hint = slow_threads_hint(device, log.step_ms)
            if hint:
                bar.write(hint)
        if on_step is not None:
            on_step(step, log)
        if should_stop is not None and should_stop():
            break
    bar.close()
    if cuda:
        log.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    model.eval()
    return log


HINT_AFTER_STEPS = 3
SLOW_THREADS = 1.25  # all threads this much slower than one on the same work: they compete for the cores


def thread_probe(threads: int, reps: int = 5, size: int = 256) -> tuple[float, float]:
    """(median ms with ``threads`` threads, median ms with one) of the same float32 matrix product,
    the two timed in turn so that a load that comes and goes weighs on both alike. Where the cores
    are free, ``threads`` threads are faster; where other processes hold them, the threads wait on
    each other and are slower than one (a tiny Llama's step: 1001 ms with 2 threads, 126 ms with 1)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    previous = torch.get_num_threads()
    times = {threads: [], 1: []}
    try:
        for _ in range(reps):
            for n in (threads, 1):
                torch.set_num_threads(n)
                start = time.perf_counter()
                for _ in range(4):
                    torch.mm(a, b)
                times[n].append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(previous)
    return statistics.median(times[threads]), statistics.median(times[1])


def slow_threads_hint(device, step_ms: list[float]) -> str | None:
    """One line when, on a CPU with several torch threads, a probe (:func:`thread_probe`) runs
    slower on all of them than on one: the cores are taken, and ``--threads 1`` (or
    OMP_NUM_THREADS=1) is likely faster. None otherwise (a GPU, one thread, free cores)."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads < 2:
        return None
    many, one = thread_probe(threads)
    if many <= SLOW_THREADS * one:
        return None
    return (f"(slow steps: median {statistics.median(step_ms):.0f} ms over the first {len(step_ms)}; the CPU is "
            f"loaded -- a probe ran {many / one:.1f}x slower on {threads} threads than on 1. Try --threads 1, or "
            f"OMP_NUM_THREADS=1, or fewer threads than the free cores)")


def interleaved(step_a, step_b, steps: int, clock=time.perf_counter, after=None) -> tuple[list[float], list[float]]:
    """Times ``step_a(i)`` and ``step_b(i)`` for i < ``steps`` in turn -- A B, then B A, A B, ... --
    so that a load that changes during the run falls on both sides alike (one side timed after the
    other measures the load as much as the code); ``after(i)``, untimed, follows each pair. Returns
    the milliseconds of each side per step."""
    times: dict[str, list[float]] = {"a": [], "b": []}
    for i in range(steps):
        order = (("a", step_a), ("b", step_b)) if i % 2 == 0 else (("b", step_b), ("a", step_a))
        for side, step in order:
            start = clock()
            step(i)
            times[side].append((clock() - start) * 1e3)
        if after is not None:
            after(i)
    return times["a"], times["b"]


TOO_SPREAD = 1.5  # quartiles of the per-pair ratio further apart than this factor: no conclusion


def ratio_summary(a_ms: list[float], b_ms: list[float], skip: int = 1) -> dict:
    """The per-pair ratios b / a of two interleaved timings (the first ``skip`` pairs left out when
    enough remain: warm-up), their median and interquartile range, and whether they allow a
    conclusion: ``conclusive`` is False when the quartiles are more than TOO_SPREAD apart or lie on
    both sides of 1 (B neither clearly slower nor clearly faster), or with fewer than 3 pairs."""
    pairs = list(zip(a_ms, b_ms))
    pairs = pairs[skip:] if len(pairs) - skip >= 3 else pairs
    ratios = [b / a for a, b in pairs if a > 0]
    if not ratios:
        return {"pairs": 0, "ratios": [], "median": None, "q1": None, "q3": None, "conclusive": False}
    median = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (median,) * 3
    conclusive = len(ratios) >= 3 and q3 <= TOO_SPREAD * q1 and (q1 > 1 or q3 < 1)
    return {"pairs": len(ratios), "ratios": ratios, "median": median, "q1": q1, "q3": q3, "conclusive": conclusive}


def eval_batches(examples: list[dict], collator, rows: int = 32) -> list[dict]:
    """The held-out examples, collated in chunks of ``rows`` (in order, no shuffling)."""
    return [collator(examples[i:i + rows]) for i in range(0, len(examples), rows)]


@torch.no_grad()
def mean_loss(model, batches: dict | list[dict], device) -> float:
    """Mean next-token loss over every label token of ``batches`` (one collated batch or a list)."""
    model.eval()
    total, count = 0.0, 0
    for batch in [batches] if isinstance(batches, dict) else batches:
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**{k: v.to(device) for k, v in batch.items()}).loss.item() * tokens
        count += tokens
    return total / max(count, 1)


def plot_loss_curve(path, train_losses: list[float], eval_points: list[tuple[int, float]] = (),
                    title: str = "prefix tuning", *, base_loss: float | None = None, unit: str = "nats/token",
                    accuracy_points: list[tuple[int, float | None]] = (), baseline_accuracy: float | None = None,
                    baseline_name: str = "linear probe") -> Path | None:
    """Writes the per-step training loss, the held-out points (step, loss), the base model's
    held-out loss (a horizontal line) and, for classification, the held-out accuracy on a second
    axis (with ``baseline_accuracy`` as a line), as a PNG (matplotlib's Agg canvas: no display
    needed). ``unit`` names the loss: per token, or per example. Without matplotlib it says so in
    one line and returns None."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("(matplotlib is not installed, so no loss curve PNG: pip install matplotlib)")
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(train_losses)), train_losses, lw=1, alpha=0.6, label="training batch")
    if eval_points:
        steps, losses = zip(*eval_points)
        ax.plot(steps, losses, "o-", label="held-out")
    if base_loss is not None:
        ax.axhline(base_loss, color="grey", ls="--", lw=1, label=f"base model, held-out ({base_loss:.3g})")
    ax.set(xlabel="step", ylabel=f"loss ({unit})", title=title)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    accuracy = [(s, a) for s, a in accuracy_points if a is not None]
    if accuracy:
        right = ax.twinx()
        steps, values = zip(*accuracy)
        right.plot(steps, values, "s-", color="tab:green", label="held-out accuracy")
        if baseline_accuracy is not None:
            right.axhline(baseline_accuracy, color="tab:green", ls=":", lw=1,
                          label=f"{baseline_name} accuracy ({baseline_accuracy:.3f})")
        right.set(ylabel="held-out accuracy", ylim=(0, 1.02))
        more_handles, more_labels = right.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_run(path, metrics: dict, title: str) -> Path | None:
    """:func:`plot_loss_curve` of a run's metrics (a classification run's loss is per example)."""
    classify = metrics.get("task") == "classification"
    return plot_loss_curve(path, metrics["train_loss"], metrics.get("eval_loss", []), title,
                           base_loss=metrics.get("base_model_loss"),
                           unit="nats/example" if classify else "nats/token",
                           accuracy_points=metrics.get("eval_accuracy", []) if classify else [],
                           baseline_accuracy=metrics.get("probe_eval_accuracy"))


def write_atomic(path, write) -> None:
    """``write(tmp)`` then a rename onto ``path``: an interrupted save never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_metrics(out, metrics: dict) -> Path:
    path = Path(out) / "metrics.json"
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8"))
    return path


def save_run(out, metrics: dict, title: str) -> list[Path]:
    """metrics.json and loss_curve.png (from metrics["train_loss"] / ["eval_loss"]) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    png = plot_run(out / "loss_curve.png", metrics, title)
    return [out / "metrics.json"] + ([png] if png else [])


# ---- stopping and resuming ------------------------------------------------------------------------
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_FORMAT = 1


class StopSignals:
    """Within the ``with`` block, SIGINT (Ctrl-C) and SIGTERM set :attr:`received` (the signal's
    name) instead of ending the process, so a training loop can stop between two steps and save;
    a second one raises KeyboardInterrupt at once (a step that takes too long), except while
    :attr:`saving` is set, so that a save is never cut short by it. The previous handlers come
    back on exit. Outside the main thread (where Python cannot install handlers) it does nothing."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self):
        self.received: str | None = None
        self.saving = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif not self.saving:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name)
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
        return False

    def __call__(self) -> bool:
        return self.received is not None


def _rng_tensors(device) -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        tensors.update({f"rng.cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return tensors


def save_trainer_tensors(out, optimizer: torch.optim.Optimizer, step: int, device) -> None:
    """``trainer_state.safetensors``: AdamW's moments and step counts per parameter and the torch RNG
    state, marked with ``step``. With the prefix and :func:`commit_trainer_state`, what continues a
    run as if it had not stopped (the data order is a function of the step)."""
    from safetensors.torch import save_file

    tensors = _rng_tensors(device)
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
    write_atomic(Path(out) / TRAINER_TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"step": str(step)}))


def commit_trainer_state(out, step: int, planned_steps: int, **info) -> None:
    """``trainer_state.json`` (the step done, the steps planned, ``info``), written after everything
    else of a save: a save cut short leaves files of another step than it names, which
    :func:`load_trainer_state` and ``--resume`` refuse."""
    state = {"format_version": TRAINER_FORMAT, "step": step, "planned_steps": planned_steps, **info}
    write_atomic(Path(out) / TRAINER_STATE,
                 lambda tmp: tmp.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8"))


def read_trainer_state(out) -> dict | None:
    """``trainer_state.json`` of ``out`` checked (None when there is none). Raises ValueError
    naming the file and what is wrong."""
    path = Path(out) / TRAINER_STATE
    if not path.exists():
        return None
    state = read_json_object(path)
    if state.get("format_version") != TRAINER_FORMAT:
        raise ValueError(f"{path}: format_version is {state.get('format_version')!r}, expected {TRAINER_FORMAT}")
    for key in ("step", "planned_steps"):
        if not _is_int(state.get(key)) or state[key] < 0:
            raise ValueError(f"{path}: {key} must be an integer >= 0, got {state.get(key)!r}")
    if state["step"] > state["planned_steps"]:
        raise ValueError(f"{path}: step {state['step']} is past planned_steps {state['planned_steps']}")
    return state


def load_trainer_state(out, optimizer: torch.optim.Optimizer, step: int, device) -> None:
    """Loads what :func:`save_trainer_state` wrote at ``step`` into ``optimizer`` and the torch RNG,
    checking everything first (nothing changes when it raises ValueError naming the file)."""
    from safetensors import SafetensorError, safe_open

    path = Path(out) / TRAINER_TENSORS
    try:
        with safe_open(str(path), framework="pt") as f:
            saved_step = (f.metadata() or {}).get("step")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"{path}: cannot read it ({exc})") from None
    if saved_step != str(step):
        raise ValueError(f"{path} is of step {saved_step}, but {TRAINER_STATE} says step {step} (a save was cut "
                         "short?)")
    current = optimizer.state_dict()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for name, tensor in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        if not index.isdigit() or int(index) >= len(params):
            raise ValueError(f"{path}: optimizer state for parameter {index}, but this run trains {len(params)} "
                             "parameters")
        state.setdefault(int(index), {})[key] = tensor
    for index, moments in state.items():
        shape = tuple(params[index].shape)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in moments or tuple(moments[key].shape) != shape:
                raise ValueError(f"{path}: optimizer {key} of parameter {index} is missing or not of shape {shape}")
    if "rng.cpu" not in tensors or tensors["rng.cpu"].dtype != torch.uint8:
        raise ValueError(f"{path}: no CPU RNG state (rng.cpu)")
    if step > 0 and len(state) != len(params):
        raise ValueError(f"{path}: optimizer state for {len(state)} parameters, but this run trains {len(params)}")
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if torch.device(device).type == "cuda":
        cuda = [tensors[f"rng.cuda.{i}"] for i in range(torch.cuda.device_count()) if f"rng.cuda.{i}" in tensors]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json_object(path: Path) -> dict:
    """A JSON object from ``path``; any reason it is not one is a ValueError naming the file."""
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def read_history(out) -> dict:
    """The loss history of the run in ``out`` (its metrics.json): {"steps", "train_loss",
    "eval_loss", "eval_accuracy"}, checked -- steps an integer >= 0, one finite train loss per step,
    held-out points [step, finite number or null] -- or ValueError naming the file and the field.
    No metrics.json: no history."""
    path = Path(out) / "metrics.json"
    history = {"steps": 0, "train_loss": [], "eval_loss": [], "eval_accuracy": []}
    if not path.exists():
        return history
    metrics = read_json_object(path)
    steps = metrics.get("steps", 0)
    if not _is_int(steps) or steps < 0:
        raise ValueError(f"{path}: steps must be an integer >= 0, got {steps!r}")
    train = metrics.get("train_loss", [])
    if not isinstance(train, list) or not all(_is_number(x) for x in train):
        raise ValueError(f"{path}: train_loss must be a list of finite numbers, got {_short(train)}")
    if len(train) != steps:
        raise ValueError(f"{path}: train_loss has {len(train)} values, but steps is {steps}")
    history.update(steps=steps, train_loss=train)
    for key in ("eval_loss", "eval_accuracy"):
        points = metrics.get(key, [])
        if not isinstance(points, list) or not all(
                isinstance(p, list) and len(p) == 2 and _is_int(p[0]) and 0 <= p[0] <= steps
                and (p[1] is None or _is_number(p[1])) for p in points):
            raise ValueError(f"{path}: {key} must be a list of [step, finite number] pairs with steps in "
                             f"[0, {steps}], got {_short(points)}")
        history[key] = [tuple(p) for p in points]
    return history


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], device, max_new_tokens: int = 48) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batch), cut at EOS or the first newline."""
    from prefix_kernels.data import encode_prompts

    ids, mask = encode_prompts(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]
