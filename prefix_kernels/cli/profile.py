"""``prefix-kernels profile``: torch.profiler traces (Chrome/Perfetto JSON) of one prefix-tuning
training step and of a greedy decode loop, with a top-kernels table for each.

Our op shows up as ``prefix_kernels::forward`` / ``prefix_kernels::backward`` ranges
(``torch.profiler.record_function``); under ``torch.autograd.profiler.emit_nvtx()`` (``--nvtx``)
they become NVTX ranges for Nsight Systems. Open the traces in https://ui.perfetto.dev or
chrome://tracing.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from prefix_kernels.cli.common import UserError, check_device, out_help, require, user_errors
from prefix_kernels.runs import run_dir


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="torch.profiler traces of a training step and a decode loop")
    p.add_argument("--out", type=Path, default=None, help=out_help("profile"))
    p.add_argument("--model", default="default",
                   help="default (SmolLM2-135M when installed, else tiny), tiny, smollm2, or a local model directory")
    p.add_argument("--batch", type=int, default=8, help="batch size")
    p.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    p.add_argument("--prefix", type=int, default=32, help="prefix length P, virtual tokens")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens generated in the decode loop")
    p.add_argument("--rows", type=int, default=15, help="rows of each top-kernels table")
    p.add_argument("--peft", action="store_true", help="also profile PEFT's training step (needs peft)")
    p.add_argument("--nvtx", action="store_true", help="emit NVTX ranges (for nsys) while profiling")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when there is a GPU, "
                                                   "else cpu)")
    p.set_defaults(run=run)


def left_padded_batch(batch: int, length: int, vocab: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids (never ``pad``) [batch, length], the first half of the rows left-padded by
    length // 8 (pad ids, mask 0): every row ends in a real token, as generate() expects."""
    ids = torch.randint(0, vocab - 1, (batch, length), device=device)
    ids += (ids >= pad).long()  # skip the pad id
    mask = torch.ones_like(ids)
    mask[: batch // 2, : length // 8] = 0
    return ids.masked_fill(mask == 0, pad), mask


def profile_call(fn, out: Path, name: str, cuda: bool, rows: int, nvtx: bool) -> str:
    """Warms ``fn`` up twice, profiles one call; writes trace_<name>.json and top_<name>.txt."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with torch.autograd.profiler.emit_nvtx(enabled=nvtx and cuda):
            fn()
            if cuda:
                torch.cuda.synchronize()
    prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)
    (out / f"top_{name}.txt").write_text(table)
    return table


@user_errors("profile")
def run(args) -> int:
    from prefix_kernels import add_prefix_tuning
    from prefix_kernels.models import ModelUnavailable, load_model

    for name in ("batch", "seq", "prefix", "decode_tokens", "rows"):
        require(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.peft:
        try:
            import peft
        except ImportError:
            raise UserError("--peft needs peft (pip install peft)") from None
    device = check_device(args.device)
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        base = load_model(args.model, dtype=dtype, device=device).model
    except ModelUnavailable as exc:
        raise UserError(f"--model {exc}") from None
    out = run_dir("profile", args.out)
    out.mkdir(parents=True, exist_ok=True)
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    ids, mask = left_padded_batch(args.batch, args.seq, base.config.vocab_size, pad, device)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    models = {"ours": add_prefix_tuning(copy.deepcopy(base) if args.peft else base, args.prefix)}
    if args.peft:
        models["peft"] = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                           num_virtual_tokens=args.prefix))
    for name, model in models.items():
        model.train()
        table = profile_call(lambda: model(**inputs).loss.backward(), out, f"train_step_{name}", cuda,
                             args.rows, args.nvtx)
        print(f"==== training step, {name}: B={args.batch} N={args.seq} P={args.prefix} on {device}\n{table}")
    ours = models["ours"].eval()
    prompt, prompt_mask = left_padded_batch(args.batch, min(args.seq, 64), base.config.vocab_size, pad, device)
    gen = dict(max_new_tokens=args.decode_tokens, min_new_tokens=args.decode_tokens, do_sample=False, pad_token_id=pad)
    table = profile_call(lambda: ours.generate(input_ids=prompt, attention_mask=prompt_mask, **gen), out,
                         "decode_ours", cuda, args.rows, args.nvtx)
    print(f"==== greedy decode, ours: B={args.batch}, {args.decode_tokens} new tokens\n{table}")
    print(f"traces and tables in {out}/ (open trace_*.json in https://ui.perfetto.dev)")
    return 0
