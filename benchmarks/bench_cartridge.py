"""Cartridges (long trained prefixes, issue 16): one training step -- forward, backward, AdamW on the
prefix -- of ours against PEFT 0.21's CARTRIDGE at P in {1024, 4096, 8192}, the first prefix token
frozen in both.

    PYTHONPATH=. python benchmarks/bench_cartridge.py --out benchmarks/results/   # CPU: the C++ op
    PYTHONPATH=. python benchmarks/bench_cartridge.py --device cuda --dtype bfloat16

A Llama of small geometry, randomly initialized (--layers, --hidden, heads 8 over 2 KV heads, head
dim hidden / 8), batch B of N tokens: PEFT expands the cartridge to every row and concatenates it
into the KV cache of every layer (B x P x L x 2 x Hkv x D per step); ours reads it from the
parameters. Times are interleaved medians (CPU) or ``do_bench`` (CUDA). Peak memory is reported on
CUDA (max_memory_allocated); on CPU tests/test_memory.py measures it (a cartridge of P=4096 grows a
step's peak by one table for ours, by B tables and more for PEFT). Rows go to
<out>/cartridge_<device>.json and .csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_median_ms  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402


def _model(layers: int, hidden: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                         attention_dropout=0.0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def _step(model, params, batch):
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prefix-lengths", default="1024,4096,8192")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="N, tokens per row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    import peft

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    base = _model(args.layers, args.hidden, device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1024, (args.batch, args.tokens), generator=g).to(device)
    mask = torch.ones_like(ids)
    positions = torch.arange(args.tokens, device=device).expand(args.batch, -1)
    rows = []
    for p in (int(x) for x in args.prefix_lengths.split(",")):
        ours = add_prefix_tuning(copy.deepcopy(base), p, num_frozen_tokens=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.CartridgeConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=p, num_frozen_tokens=1))
        theirs.train()
        steps = {
            "ours": _step(ours, [ours.prefix_embedding], dict(input_ids=ids, attention_mask=mask, labels=ids)),
            "peft": _step(theirs, [q for q in theirs.parameters() if q.requires_grad],
                          dict(input_ids=ids, attention_mask=mask, labels=ids, position_ids=positions)),
        }
        peaks = {}
        if device.type == "cuda":
            from triton.testing import do_bench

            times = {name: do_bench(step, warmup=5, rep=50) for name, step in steps.items()}
            for name, step in steps.items():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = interleaved_median_ms(steps, warmup=1, reps=args.reps)
        width = ours.spec.width
        for name in steps:
            rows.append(dict(impl=name, P=p, B=args.batch, N=args.tokens, layers=args.layers, hidden=args.hidden,
                             ms=round(times[name], 3), peak_mib=round(peaks[name], 1) if peaks else None,
                             expansion_mib=round(args.batch * p * width * dtype.itemsize / 2**20, 1)))
        print(f"P={p:5d}: ours {times['ours']:9.2f} ms, PEFT CARTRIDGE {times['peft']:9.2f} ms "
              f"({times['peft'] / times['ours']:.2f}x)" + (f"; peak ours {peaks['ours']:.0f} MiB, PEFT "
                                                           f"{peaks['peft']:.0f} MiB" if peaks else ""))
        del ours, theirs, steps
    args.out.mkdir(parents=True, exist_ok=True)
    tag = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    meta = environment(device)
    (args.out / f"cartridge_{tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(args.out / f"cartridge_{tag}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out / f'cartridge_{tag}.json'}, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
