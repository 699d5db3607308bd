"""``prefix-kernels demo``: prefix-tunes SmolLM2-135M-Instruct (or a tiny random Llama when it is not
installed) on the packaged table-to-text task, on the GPU when there is one, else the CPU.

It prints generations for held-out inputs before and after, the held-out loss, and a comparison
with PEFT prefix tuning over the same first steps (same initial prefix, same batches, same
optimizer): step time, peak memory (CUDA) and the loss reached. Then it saves the prefix
(safetensors), a PEFT adapter, metrics.json and loss_curve.png into ``--out`` (default
``runs/demo-<date>-<time>/``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from prefix_kernels.cli.common import out_help, print_generations, run_dir

INSTRUCTION = "Write one fluent sentence that describes the restaurant using every attribute listed."


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prefix-tune the default model on the packaged task (default command)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 40 on CPU, 150 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps of the PEFT comparison (default: 5 on CPU, 20 on CUDA; 0 skips it)")
    p.add_argument("--examples", type=int, default=3, help="held-out inputs to generate for")
    p.add_argument("--out", type=Path, default=None, help=out_help("demo"))
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a smoke run)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import PromptCompletionCollator, demo_task_path, load_jsonl, split
    from prefix_kernels.models import load_default_model
    from prefix_kernels.training import batch_stream, complete, eval_batches, mean_loss, save_run, train_steps

    out = run_dir("demo", args.out)  # named by the start time
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    steps = args.steps or (150 if device == "cuda" else 40)
    compare_steps = min(steps, args.compare_steps if args.compare_steps is not None else (20 if device == "cuda" else 5))
    torch.manual_seed(0)
    loaded = load_default_model(dtype=dtype, device=device, tiny=args.tiny)
    model, tokenizer = loaded.model, loaded.tokenizer
    print(f"model: {loaded.name} ({loaded.note}); device {device}, {str(dtype).replace('torch.', '')}")

    train_set, eval_set = split(load_jsonl(demo_task_path()))
    collator = PromptCompletionCollator(tokenizer, max_length=256)
    stream = batch_stream(train_set, collator, args.batch_size, seed=0)
    batches = [next(stream) for _ in range(steps)]
    eval_batch = eval_batches(eval_set, collator)
    shown = eval_set[: args.examples]
    prompts = [ex["prompt"] for ex in shown]

    peft_base = None
    if compare_steps > 0:
        try:
            import peft  # noqa: F401

            peft_base = copy.deepcopy(model)
        except ImportError:
            print("(peft is not installed: the comparison with PEFT is skipped; pip install peft)")

    base_loss = mean_loss(model, eval_batch, device)
    before = complete(model, tokenizer, prompts, device)
    print_generations("before (the base model, no prefix):", prompts, before)

    init_ids = tokenizer(INSTRUCTION, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    wrapped = add_prefix_tuning(model, init_ids.numel(), init=init_ids)
    initial_table = wrapped.prefix_embedding.detach().clone()
    spec = wrapped.spec
    print(f"\nprefix: P={spec.num_virtual_tokens} virtual tokens (initialized from the instruction text) x "
          f"{spec.num_layers} layers x {spec.num_kv_heads} KV heads x head dim {spec.head_dim} = "
          f"{wrapped.prefix_embedding.numel():,} trainable parameters; the model's "
          f"{sum(p.numel() for p in wrapped.base_model.parameters()):,} stay frozen")
    start_loss = mean_loss(wrapped, eval_batch, device)
    log = train_steps(wrapped, batches, args.lr, device, progress=not args.no_progress, desc="prefix tuning")
    end_loss = mean_loss(wrapped, eval_batch, device)
    print(f"train loss {log.losses[0]:.3f} -> {log.losses[-1]:.3f} over {steps} steps "
          f"({log.tokens_per_s:,.0f} tokens/s, median step {log.median_step_ms():.0f} ms)")
    print(f"held-out loss: base model {base_loss:.3f}, initial prefix {start_loss:.3f}, trained prefix {end_loss:.3f}")
    after = complete(wrapped, tokenizer, prompts, device)
    print_generations("after (trained prefix):", prompts, after)

    if peft_base is not None:
        compare_with_peft(peft_base, initial_table, batches[:compare_steps], args, log, device)

    wrapped.save_prefix(out)
    wrapped.save_peft_adapter(out / "peft_adapter")
    metrics = {"command": "demo", "model": loaded.name, "model_source": loaded.note, "device": device,
               "dtype": str(dtype).replace("torch.", ""), "steps": steps, "batch_size": args.batch_size,
               "lr": args.lr, "prefix_length": spec.num_virtual_tokens, "init": "text (the instruction)",
               "base_model_loss": base_loss, "final_eval_loss": end_loss, "train_loss": log.losses,
               "eval_loss": [(0, start_loss), (steps, end_loss)], "tokens_per_s": log.tokens_per_s,
               "median_step_ms": log.median_step_ms(), "peak_mib": log.peak_mib,
               "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]}
    written = save_run(out, metrics, f"prefix tuning {loaded.name} (demo)")
    print(f"\nsaved to {out}/: prefix_tuning.safetensors (+ config), peft_adapter/, "
          f"{', '.join(p.name for p in written)}")
    return 0


def compare_with_peft(base, initial_table, batches, args, ours_log, device) -> None:
    import peft

    from prefix_kernels.training import train_steps

    steps = len(batches)
    with warnings.catch_warnings():
        # PEFT's own calls use transformers APIs that 5.2x deprecates (past_key_values,
        # is_gradient_checkpointing): not the user's to fix, so not shown in the demo.
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=initial_table.shape[1]))
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(initial_table[0])
        peft_log = train_steps(model, batches, args.lr, device, progress=not args.no_progress,
                               desc="PEFT (same steps)", explicit_positions=True)
    ours_ms = sorted(ours_log.step_ms[1:steps] or ours_log.step_ms[:1])
    ours_median = ours_ms[len(ours_ms) // 2]
    print(f"\nsame {steps} steps, same initial prefix and batches:")
    print(f"  {'':<18}{'median step':>12}{'peak memory':>14}{'loss at step ' + str(steps):>18}")
    for name, median, peak, loss in (
        ("prefix_kernels", ours_median, ours_log.peak_mib, ours_log.losses[steps - 1]),
        ("PEFT", peft_log.median_step_ms(), peft_log.peak_mib, peft_log.losses[-1]),
    ):
        peak_text = f"{peak:,.0f} MiB" if peak is not None else "n/a (CPU)"
        print(f"  {name:<18}{median:>9.0f} ms{peak_text:>14}{loss:>18.4f}")
    print(f"  step time ratio PEFT / ours: {peft_log.median_step_ms() / ours_median:.2f}x")
