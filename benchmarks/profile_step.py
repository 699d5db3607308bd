"""Where a prefix-tuning training step spends its GPU time: torch.profiler over one step of ours and
one of PEFT on the SmolLM2-135M-shaped model of bench_hf.py; prints the top kernels of each and
writes Chrome/Perfetto traces.

    PYTHONPATH=. python benchmarks/profile_step.py --out OUT_DIR [--batch 8 --seq 1024 --prefix 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_hf import SMALL, SMOLLM2_135M, build  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("profiles"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--prefix", type=int, default=64)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--rows", type=int, default=18)
    args = parser.parse_args(argv)
    import peft

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build(SMALL if args.small else SMOLLM2_135M, dtype, device)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=device)
    mask = torch.ones_like(ids)
    mask[: args.batch // 2, : args.seq // 8] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100),
                  position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    models = {
        "ours": add_prefix_tuning(copy.deepcopy(base), args.prefix),
        "peft": peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=args.prefix)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    for name, model in models.items():
        model.train()

        def step():
            model(**inputs).loss.backward()

        for _ in range(2):  # warm up: Triton compiles, cuBLAS handles
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=activities) as prof:
            step()
            if device == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(str(args.out / f"trace_{name}.json"))
        table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
        (args.out / f"top_{name}.txt").write_text(table)
        print(f"==== {name}: B={args.batch} N={args.seq} P={args.prefix}\n{table}", flush=True)


if __name__ == "__main__":
    main()
