"""``prefix-kernels demo``: prefix-tunes SmolLM2-135M-Instruct (or a tiny random Llama when it is not
installed) on the packaged table-to-text task, on the GPU when there is one, else the CPU.

It prints generations for held-out inputs before and after, the held-out loss, and a comparison
with PEFT prefix tuning over the same first steps (same initial prefix, same batches, same
optimizer): step time, peak memory (CUDA) and the loss reached. The two are trained in turn, one
step each (A B, B A, ...), so that a load that changes during the run weighs on both: the step time
ratio is the median of the per-step ratios, with their interquartile range, and is called
inconclusive when that range is wide. Then it saves the prefix
(safetensors), a PEFT adapter, metrics.json and loss_curve.png into ``--out`` (default
``runs/demo-<date>-<time>/``).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import torch

from prefix_kernels.cli.common import (add_threads_argument, apply_threads, check_device, out_help, print_generations,
                                       require, user_errors)
from prefix_kernels.runs import run_dir

EVAL_POINTS = 4  # held-out evaluations over the run after the one at step 0
INSTRUCTION = "Write one fluent sentence that describes the restaurant using every attribute listed."


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="prefix-tune the default model on the packaged task (start here; --tiny: seconds)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: 40 on CPU, 150 on CUDA)")
    p.add_argument("--batch-size", type=int, default=8, help="training examples per step")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--compare-steps", type=int, default=None,
                   help="steps of the PEFT comparison (default: 5 on CPU, 20 on CUDA; 0 skips it)")
    p.add_argument("--examples", type=int, default=3, help="held-out inputs to generate for")
    p.add_argument("--out", type=Path, default=None, help=out_help("demo"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when there is a GPU, "
                                                   "else cpu)")
    add_threads_argument(p)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2 (a smoke run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


@user_errors("demo")
def run(args) -> int:
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.data import PromptCompletionCollator, demo_task_path, load_jsonl, split
    from prefix_kernels.models import load_default_model
    from prefix_kernels.training import (batch_stream, complete, eval_batches, make_optimizer, mean_loss, save_run,
                                         train_steps)

    for name, least in (("steps", 1), ("batch_size", 1), ("compare_steps", 0), ("examples", 0)):
        value = getattr(args, name)
        require(value is None or value >= least, f"--{name.replace('_', '-')} must be >= {least}, got {value}")
    device = check_device(args.device)
    apply_threads(args.threads)
    out = run_dir("demo", args.out)  # named by the start time
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    cuda = torch.device(device).type == "cuda"
    steps = args.steps or (150 if cuda else 40)
    compare_steps = min(steps, args.compare_steps if args.compare_steps is not None else (20 if cuda else 5))
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
    before = complete(model, tokenizer, prompts, device) if prompts else []
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
    eval_points = [(0, start_loss)]
    eval_every = max(1, steps // EVAL_POINTS)
    optimizer = make_optimizer(wrapped, args.lr)

    def evaluate(step):  # after ``step`` steps
        if step % eval_every == 0 and step < steps:
            eval_points.append((step, mean_loss(wrapped, eval_batch, device)))
            wrapped.train()

    comparison = None
    if peft_base is not None:  # the first steps, in turn with PEFT's
        comparison = compare_with_peft(wrapped, optimizer, peft_base, initial_table, batches[:compare_steps], args,
                                       device, after=lambda i: evaluate(i + 1))

    def on_step(step, log):
        evaluate(step + 1 + (comparison["steps"] if comparison else 0))

    done = comparison["steps"] if comparison else 0
    log = train_steps(wrapped, batches[done:], args.lr, device, progress=not args.no_progress, desc="prefix tuning",
                      optimizer=optimizer, on_step=on_step, thread_hint=True, initial=done,
                      total=steps - done)
    if comparison:
        ours = comparison.pop("ours_log")
        for name in ("losses", "step_ms", "tokens"):
            setattr(log, name, getattr(ours, name) + getattr(log, name))
    end_loss = mean_loss(wrapped, eval_batch, device)
    eval_points.append((steps, end_loss))
    print(f"train loss {log.losses[0]:.3f} -> {log.losses[-1]:.3f} over {steps} steps "
          f"({log.tokens_per_s:,.0f} tokens/s, median step {log.median_step_ms():.0f} ms)")
    print(f"held-out loss: base model {base_loss:.3f}, initial prefix {start_loss:.3f}, trained prefix {end_loss:.3f}")
    after = complete(wrapped, tokenizer, prompts, device) if prompts else []
    print_generations("after (trained prefix):", prompts, after)

    if comparison:
        print_comparison(comparison)

    wrapped.save_prefix(out)
    wrapped.save_peft_adapter(out / "peft_adapter")
    metrics = {"command": "demo", "model": loaded.name, "model_source": loaded.note, "device": device,
               "dtype": str(dtype).replace("torch.", ""), "steps": steps, "batch_size": args.batch_size,
               "lr": args.lr, "prefix_length": spec.num_virtual_tokens, "init": "text (the instruction)",
               "base_model_loss": base_loss, "final_eval_loss": end_loss, "train_loss": log.losses,
               "eval_loss": eval_points, "tokens_per_s": log.tokens_per_s,
               "median_step_ms": log.median_step_ms(), "peak_mib": log.peak_mib, "peft_comparison": comparison,
               "generations": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(prompts, before, after)]}
    written = save_run(out, metrics, f"prefix tuning {loaded.name} (demo)")
    print(f"\nsaved to {out}/: prefix_tuning.safetensors (+ config), peft_adapter/, "
          f"{', '.join(p.name for p in written)}")
    return 0


def compare_with_peft(wrapped, optimizer, base, initial_table, batches, args, device, after=None) -> dict:
    """Trains ``wrapped`` (ours, with ``optimizer``) and PEFT prefix tuning of ``base`` (the same
    initial prefix, a fresh AdamW) on ``batches``, one step of each in turn (see
    training.interleaved; ``after(i)`` follows the i-th pair, untimed). Returns the comparison
    (metrics.json's "peft_comparison") with "ours_log", the TrainLog of our steps, which the run's
    training goes on from."""
    import peft

    from prefix_kernels.training import TrainLog, interleaved, make_optimizer, ratio_summary

    with warnings.catch_warnings():
        # PEFT's own calls use transformers APIs that 5.2x deprecates (past_key_values,
        # is_gradient_checkpointing): not the user's to fix, so not shown in the demo.
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                    num_virtual_tokens=initial_table.shape[1]))
        with torch.no_grad():
            model.prompt_encoder["default"].embedding.weight.copy_(initial_table[0])
        sides = {"ours": (wrapped, optimizer, False), "peft": (model, make_optimizer(model, args.lr), True)}
        logs = {name: TrainLog() for name in sides}
        cuda = torch.device(device).type == "cuda"
        peaks = {}

        def stepper(name):
            module, opt, explicit_positions = sides[name]

            def step(i):
                batch = {k: v.to(device) for k, v in batches[i].items()}
                if explicit_positions:
                    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                module.train()
                loss = module(**batch).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cuda:
                    torch.cuda.synchronize()
                    peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
                logs[name].losses.append(loss.item())
                logs[name].tokens.append(int(batch["attention_mask"].sum()))
            return step

        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches), desc="ours and PEFT, in turn", disable=args.no_progress, dynamic_ncols=True)

        def ours_step(i):
            stepper("ours")(i)
            bar.update(1)

        ours_ms, peft_ms = interleaved(ours_step, stepper("peft"), len(batches), after=after)
        bar.close()
    wrapped.eval()
    logs["ours"].step_ms, logs["peft"].step_ms = ours_ms, peft_ms
    for name in logs:
        logs[name].peak_mib = peaks.get(name)
    summary = ratio_summary(ours_ms, peft_ms)
    return {"steps": len(batches), "order": "interleaved: ours, PEFT; then PEFT, ours; ...",
            "ours_step_ms": ours_ms, "peft_step_ms": peft_ms,
            "ours_median_step_ms": logs["ours"].median_step_ms(), "peft_median_step_ms": logs["peft"].median_step_ms(),
            "ours_peak_mib": logs["ours"].peak_mib, "peft_peak_mib": logs["peft"].peak_mib,
            "ours_loss": logs["ours"].losses[-1], "peft_loss": logs["peft"].losses[-1],
            "ratio_peft_over_ours": {k: summary[k] for k in ("median", "q1", "q3", "pairs", "conclusive")},
            "ratios": summary["ratios"], "ours_log": logs["ours"]}


def describe_ratio(summary: dict) -> str:
    """The step time ratio PEFT / ours of ratio_summary in one line, with whether it allows a conclusion."""
    if summary["median"] is None:
        return "step time ratio PEFT / ours: no timings"
    text = f"step time ratio PEFT / ours: median {summary['median']:.2f}x"
    if summary["pairs"] < 3:
        return f"{text} over {summary['pairs']} step pair(s): too few to conclude (--compare-steps 4 or more)"
    text += f" (interquartile range {summary['q1']:.2f}x-{summary['q3']:.2f}x over {summary['pairs']} step pairs)"
    if summary["conclusive"]:
        return f"{text}: PEFT is {'slower' if summary['median'] > 1 else 'faster'}"
    from prefix_kernels.training import TOO_SPREAD

    if summary["q3"] <= TOO_SPREAD * summary["q1"]:  # narrow, but on both sides of 1
        return f"{text}: no difference resolved (the range spans 1: about the same speed here)"
    return (f"{text}: too spread to conclude (the machine's load changed during the run?; more --compare-steps, "
            "--threads 1 or a quieter machine)")


def print_comparison(comparison: dict) -> None:
    steps = comparison["steps"]
    print(f"\nsame {steps} steps, same initial prefix and batches, one step of each in turn:")
    print(f"  {'':<18}{'median step':>12}{'peak memory':>14}{'loss at step ' + str(steps):>18}")
    for name, key in (("prefix_kernels", "ours"), ("PEFT", "peft")):
        peak = comparison[f"{key}_peak_mib"]
        peak_text = f"{peak:,.0f} MiB" if peak is not None else "n/a (CPU)"
        print(f"  {name:<18}{comparison[f'{key}_median_step_ms']:>9.0f} ms{peak_text:>14}"
              f"{comparison[f'{key}_loss']:>18.4f}")
    print(f"  {describe_ratio(comparison['ratio_peft_over_ours'])}")
