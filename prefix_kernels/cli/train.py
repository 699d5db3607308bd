"""``prefix-kernels train``: prefix tuning of your causal LM on your JSONL data.

    prefix-kernels train --model PATH_OR_HF_DIR --data data.jsonl --out run/ [--steps 500 ...]

``--data``: one JSON object per line with "prompt" and "completion" strings (optional "split":
"train"/"eval"; otherwise the last 10% is held out); errors name the line. Saves the prefix
(safetensors + JSON) and a PEFT adapter into ``--out``; ``--resume`` continues from the prefix
saved there (the optimizer restarts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="prefix-tune a model (--model) on JSONL data (--data)")
    p.add_argument("--model", required=True, help="a local transformers model directory")
    p.add_argument("--data", type=Path, required=True, help='JSONL with "prompt" and "completion" fields')
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--prefix-length", type=int, default=16)
    p.add_argument("--projection-hidden", type=int, default=None, help="MLP reparameterization width")
    p.add_argument("--init-text", default=None, help="initialize the prefix from this text's keys/values")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="start from the prefix saved in --out")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import PromptCompletionCollator, load_jsonl, split
    from prefix_kernels.training import batch_stream, mean_loss, train_steps

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    train_set, eval_set = split(load_jsonl(args.data))  # validated before the model loads
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    init = "random"
    prefix_length = args.prefix_length
    if args.init_text:
        init = tokenizer(args.init_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
        prefix_length = init.numel()
    wrapped = add_prefix_tuning(model, prefix_length, projection_hidden=args.projection_hidden, init=init)
    state_path = args.out / "train_state.json"
    done = 0
    if args.resume:
        wrapped.load_prefix(args.out)
        done = json.loads(state_path.read_text())["steps"] if state_path.is_file() else 0
        print(f"resumed from {args.out} after {done} steps")

    collator = PromptCompletionCollator(tokenizer, max_length=args.max_length)
    stream = batch_stream(train_set, collator, args.batch_size, seed=done)
    eval_batch = collator(eval_set)
    print(f"{len(train_set)} training / {len(eval_set)} held-out examples; held-out loss "
          f"{mean_loss(wrapped, eval_batch, device):.4f}")

    def on_step(step, log):
        if args.eval_every and (step + 1) % args.eval_every == 0:
            print(f"\nstep {done + step + 1}: held-out loss {mean_loss(wrapped, eval_batch, device):.4f}")
            wrapped.train()

    log = train_steps(wrapped, (next(stream) for _ in range(args.steps)), args.lr, device,
                      progress=not args.no_progress, on_step=on_step, total=args.steps)
    print(f"train loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}; held-out loss "
          f"{mean_loss(wrapped, eval_batch, device):.4f}; {log.tokens_per_s:,.0f} loss tokens/s")
    args.out.mkdir(parents=True, exist_ok=True)
    wrapped.save_prefix(args.out)
    state_path.write_text(json.dumps({"steps": done + args.steps, "final_train_loss": log.losses[-1]}) + "\n")
    if wrapped.spec.projection_hidden is not None:
        wrapped.merge()
    wrapped.save_peft_adapter(args.out / "peft_adapter")
    print(f"saved to {args.out}/ (prefix_tuning.safetensors, PEFT adapter in peft_adapter/)")
    return 0
