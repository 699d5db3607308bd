"""The training loop shared by ``prefix-kernels demo`` and ``prefix-kernels train``: batches of
prompt/completion examples, AdamW on the trainable parameters, a progress bar with loss and
tokens/s, held-out loss, greedy generations, and the run's metrics.json + loss_curve.png.
"""

from __future__ import annotations

import json
import math
import random
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


def batch_stream(examples: list[dict], collator, batch_size: int, seed: int = 0):
    """Endless batches: shuffled epochs over ``examples``, collated."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collator([examples[i] for i in order[start:start + batch_size]])
        if len(order) < batch_size:
            yield collator([examples[i] for i in order])


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp_min(0)


def train_steps(model, batches: list[dict], lr: float, device, *, progress: bool = True, desc: str = "training",
                explicit_positions: bool = False, on_step=None, total: int | None = None) -> TrainLog:
    """AdamW over ``model``'s trainable parameters, one step per batch. ``explicit_positions``
    passes position_ids counted over the mask (for PEFT, which otherwise ignores left padding)."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    log = TrainLog()
    model.train()
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    total = total if total is not None else (len(batches) if hasattr(batches, "__len__") else None)
    bar = tqdm(batches, desc=desc, total=total, disable=not progress, dynamic_ncols=True)
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
        if on_step is not None:
            on_step(step, log)
    if cuda:
        log.peak_mib = torch.cuda.max_memory_allocated() / 2**20
    model.eval()
    return log


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
                    title: str = "prefix tuning") -> Path | None:
    """Writes the per-step training loss and the held-out points (step, loss) as a PNG (matplotlib's
    Agg canvas: no display needed). Without matplotlib it says so in one line and returns None."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("(matplotlib is not installed, so no loss curve PNG: pip install matplotlib)")
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(train_losses)), train_losses, lw=1, alpha=0.8, label="training batch")
    if eval_points:
        steps, losses = zip(*eval_points)
        ax.plot(steps, losses, "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def save_run(out, metrics: dict, title: str) -> list[Path]:
    """metrics.json and loss_curve.png (from metrics["train_loss"] / ["eval_loss"]) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    png = plot_loss_curve(out / "loss_curve.png", metrics["train_loss"], metrics.get("eval_loss", []), title)
    return [out / "metrics.json"] + ([png] if png else [])


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
