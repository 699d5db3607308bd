"""Cartridges (long trained prefixes), two parts:

* ``train``: one training step -- forward, backward, AdamW on the prefix -- of ours against PEFT 0.21's
  CARTRIDGE at P in {1024, 4096, 8192}, the first prefix token frozen in both; rows to
  <out>/cartridge_<device>.json and .csv.
* ``decode``: greedy ``generate()`` of 64 rows sharing one cartridge of P in {1024, 4096} (prompt 16
  tokens, 32 new tokens): tokens/s and peak memory of ours (the prefix read from its table; on CPU the
  decode of one shared prefix goes to the C++ cascade), of ``cache_copied`` -- the base model's
  ``generate()`` with the prefix copied into a DynamicCache for every row (what PEFT does; the copy is
  inside the timed call, as in PEFT) -- and of ``peft_generate``, PEFT's own CARTRIDGE ``generate()``,
  timed but not a correct baseline under transformers 5.24 (its tokens are not those of its own
  forward; ``tokens_equal_ours`` in each row); rows to <out>/cartridge_decode_<device>.json and .csv.

    PYTHONPATH=. python benchmarks/bench_cartridge.py --out benchmarks/results/   # CPU: the C++ op
    PYTHONPATH=. python benchmarks/bench_cartridge.py --parts decode              # the decode part only
    PYTHONPATH=. python benchmarks/bench_cartridge.py --device cuda --dtype bfloat16

A Llama of small geometry, randomly initialized (--layers 4, --hidden 256, heads 8 over 2 KV heads, head
dim hidden / 8), batch B of N tokens: PEFT expands the cartridge to every row and concatenates it
into the KV cache of every layer (B x P x L x 2 x Hkv x D per step); ours reads it from the
parameters. Training times are interleaved medians (CPU) or ``do_bench`` (CUDA), peak memory on CUDA
(max_memory_allocated; on CPU tests/test_memory.py measures it: a cartridge of P=4096 grows a step's
peak by one table for ours, by B tables and more for PEFT). Decode times are medians of
``--decode-reps`` whole generate() calls after one warm-up, the impls in turn, with min and max;
peak memory of one more call (:func:`peak_step_mib`, CPU and CUDA).
"""

from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import ctypes.util
import json
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, interleaved_median_ms  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402


_PROC = Path("/proc/self")


def _status_bytes(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", (_PROC / "status").read_text(), re.M).group(1)) * 2**10


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def peak_step_mib(step, device) -> tuple[float | None, float | None]:
    """(peak above what was allocated when the step started, absolute peak) of one more ``step()``, MiB.

    CUDA: ``max_memory_allocated`` (absolute: model, optimizer state and inputs included) and its excess
    over ``memory_allocated`` at the start. CPU: the resident-set high-water mark, as tests/test_memory.py's
    ``rss_peak`` measures it -- ``malloc_trim(0)`` (freed heap pages go back, so the step's allocations
    touch fresh pages), ``/proc/self/clear_refs`` <- "5" (VmHWM := VmRSS), step, VmHWM - VmRSS before;
    it sees every allocation (c10's, the C++ op's scratch, MKL's buffers), to about a MiB; no absolute
    value (None). (None, None) where /proc/self/clear_refs or glibc is missing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - start) / 2**20, peak / 2**20
    libc = _libc()
    try:
        if libc is None:
            return None, None
        libc.malloc_trim(0)
        (_PROC / "clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    except (OSError, AttributeError):
        return None, None
    step()
    return (_status_bytes("VmHWM") - before) / 2**20, None


def _loadavg() -> float | None:
    """The 1-minute load average (other processes on the machine while timing), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


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


def _cached_prefix_generate(base, table, ids, mask, gen):
    """What PEFT's cartridge amounts to at decode time, done by hand: the prefix [P, L*2*Hkv*D] (K of layer l
    at 2l, V at 2l + 1, PEFT's layout) copied into a DynamicCache for every row, then the base model's
    generate() with the attention mask grown by P (the prompt's positions start at P, as ours)."""
    from transformers import DynamicCache

    config = base.config
    p, rows = table.shape[0], ids.shape[0]
    kv_heads, head_dim = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    layers = table.view(p, 2 * config.num_hidden_layers, kv_heads, head_dim).permute(1, 2, 0, 3)  # [2L, Hkv, P, D]
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        cache.update(layers[2 * layer].expand(rows, -1, -1, -1).contiguous(),
                     layers[2 * layer + 1].expand(rows, -1, -1, -1).contiguous(), layer)
    full_mask = torch.cat([mask.new_ones(rows, p), mask], 1)
    return base.generate(input_ids=ids, attention_mask=full_mask, past_key_values=cache, **gen)


def decode_rows(base, args, device, dtype) -> list[dict]:
    """Greedy generate() of ``--decode-rows`` rows sharing one cartridge: tokens/s and peak memory of ours
    (the prefix read from its table; on CPU one shared prefix goes to the C++ cascade), of the base model
    with the prefix copied into every row's DynamicCache (``cache_copied``: what PEFT does), and of PEFT
    0.21's own CARTRIDGE generate() (timed, but under transformers 5.24 its tokens are not its forward's:
    ``tokens_equal_ours`` says how many of its tokens agree with ours). ``cascade_calls`` (CPU): forwards of
    the C++ op that took the shared-prefix cascade during one generate() call."""
    import peft
    from prefix_kernels import cpu as pk_cpu
    from prefix_kernels import from_peft_adapter

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1024, (args.decode_rows, args.prompt), generator=g).to(device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for p in (int(x) for x in args.decode_prefix_lengths.split(",")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(copy.deepcopy(base), peft.CartridgeConfig(
                task_type="CAUSAL_LM", num_virtual_tokens=p, num_frozen_tokens=1)).eval()
            with tempfile.TemporaryDirectory() as directory:  # ours holds PEFT's cartridge: the same tokens
                theirs.save_pretrained(directory)
                ours = from_peft_adapter(copy.deepcopy(base), directory).eval()
        table = ours.prefix_table().detach().to(dtype)[0]
        outputs = {}

        def runner(name, fn, outputs=outputs):
            def call():
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    outputs[name] = fn()
                sync()
            return call

        runs = {
            "ours": runner("ours", lambda m=ours: m.generate(input_ids=ids, attention_mask=mask, **gen)),
            "cache_copied": runner("cache_copied",
                                   lambda t=table: _cached_prefix_generate(base, t, ids, mask, gen)),
            "peft_generate": runner("peft_generate",
                                    lambda m=theirs: m.generate(input_ids=ids, attention_mask=mask, **gen)),
        }
        if not args.peft_generate:
            del runs["peft_generate"]
        times = {name: [] for name in runs}
        for run in runs.values():  # warm-up, and the tokens compared
            run()
        new = {name: out[:, -args.new_tokens:] for name, out in outputs.items()}
        for _ in range(args.decode_reps):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1e3)
        load, cascades = _loadavg(), {}  # load: what else ran on the machine meanwhile
        for name, run in runs.items():
            before = pk_cpu.cascade_calls() if device.type == "cpu" else None
            peak, absolute = peak_step_mib(run, device)
            cascades[name] = pk_cpu.cascade_calls() - before if before is not None else None
            t = times[name]
            ms = statistics.median(t)
            rows.append(dict(bench="greedy_decode", impl=name, P=p, rows=args.decode_rows, prompt=args.prompt,
                             new_tokens=args.new_tokens, layers=args.layers, hidden=args.hidden,
                             dtype=str(dtype).replace("torch.", ""), ms=round(ms, 3), ms_min=round(min(t), 3),
                             ms_max=round(max(t), 3), reps=len(t),
                             tokens_per_s=round(args.decode_rows * args.new_tokens / ms * 1e3, 1),
                             tokens_equal_ours=round((new[name] == new["ours"]).float().mean().item(), 4),
                             peak_step_mib=None if peak is None else round(peak, 1),
                             peak_mib=None if absolute is None else round(absolute, 1),
                             cascade_calls=cascades[name], loadavg_1min=load,
                             prefix_copies_mib=round(args.decode_rows * p * table.shape[1] * dtype.itemsize / 2**20, 3)
                             if name != "ours" else 0.0))
        for row in rows[-len(runs):]:
            print(f"decode P={p:5d} {row['impl']:14s} {row['ms']:9.1f} ms (min {row['ms_min']:.1f}, max "
                  f"{row['ms_max']:.1f}) {row['tokens_per_s']:8.1f} tokens/s, peak +{row['peak_step_mib']} MiB, "
                  f"tokens equal to ours {row['tokens_equal_ours']:.3f}", flush=True)
        del ours, theirs, runs, outputs
    return rows


def train_rows(base, args, device, dtype) -> list[dict]:
    import peft

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
                                                           f"{peaks['peft']:.0f} MiB" if peaks else ""), flush=True)
        del ours, theirs, steps
    return rows


def write_rows(rows: list[dict], out: Path, stem: str, meta: dict) -> Path:
    """``out/stem.json`` ({"meta", "rows"}) and ``out/stem.csv``; returns the JSON's path (bench_encoders.py too)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    with open(out / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    return out / f"{stem}.json"


def _write(rows, out: Path, stem: str, meta: dict) -> None:
    print(f"wrote {write_rows(rows, out, stem, meta)}, .csv")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--parts", default="train,decode", help="train (cartridge_<device>.*), decode "
                        "(cartridge_decode_<device>.*) or both")
    parser.add_argument("--prefix-lengths", default="1024,4096,8192", help="P of the training part")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="N, tokens per row")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--decode-prefix-lengths", default="1024,4096", help="P of the decode part")
    parser.add_argument("--decode-rows", type=int, default=64, help="rows sharing the cartridge in generate()")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--decode-reps", type=int, default=5, help="timed generate() calls (after one warm-up)")
    parser.add_argument("--no-peft-generate", dest="peft_generate", action="store_false",
                        help="leave out the peft_generate rows")
    args = parser.parse_args(argv)

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    parts = set(args.parts.split(","))
    if not parts <= {"train", "decode"}:
        raise SystemExit(f"--parts: train and/or decode, got {args.parts!r}")
    load_start = _loadavg()
    base = _model(args.layers, args.hidden, device, dtype)
    tag = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    if "train" in parts:
        rows = train_rows(base, args, device, dtype)
        _write(rows, args.out, f"cartridge_{tag}", {**environment(device), "loadavg_1min": [load_start, _loadavg()]})
    if "decode" in parts:
        rows = decode_rows(base, args, device, dtype)
        meta = environment(device)
        meta.update(timing=f"one warm-up generate() per impl, then {args.decode_reps} timed rounds (impls in turn);"
                           " median/min/max ms of a whole generate() call (prefill of the prompt included); "
                           "tokens_per_s = rows * new_tokens / median",
                    peak_step_mib="above the allocation at the call's start: " + (
                        "CUDA max_memory_allocated" if device.type == "cuda" else
                        "CPU resident-set high-water mark (VmHWM after clear_refs; about 1 MiB resolution)"),
                    peft_generate="PEFT 0.21 CARTRIDGE generate() under this transformers: its tokens are not "
                                  "those of its forward (see tokens_equal_ours); cache_copied is the correct baseline",
                    loadavg_1min=[load_start, _loadavg()])
        _write(rows, args.out, f"cartridge_decode_{tag}", meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
