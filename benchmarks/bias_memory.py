"""Memory of T5's relative position bias: materialized (what transformers builds) against what a kernel
that computes the bias itself needs.

    python benchmarks/bias_memory.py --out benchmarks/results/     # bias_memory_cpu.json

For t5-small-like (8 heads) and t5-large-like (16 heads) attention, T5's default 32 buckets and max
distance 128, N = M in (1024, 2048, 4096), fp32, one row per (heads, N, method):
    materialized   T5Attention.compute_bias(N, M): the [1, H, N, M] bias transformers hands the
                   attention function (built once per stack, encoder and decoder each)
    per_distance   the bias of every key - query distance, [H, N + M - 1]: table[bucket(d), h], built
                   once per forward by t5_relative_bucket; a kernel gathers its tiles from it
    in_kernel      the table [num_buckets, H] and three scalars; the bias emulated tile by tile
                   (128 x 128 tiles by t5_relative_bias, each reduced and dropped) to show the working
                   set of computing the buckets in-kernel
Columns: ``tensor_bytes`` (what the method keeps: the output's or the inputs' nbytes) and
``peak_rss_delta_bytes``: the peak resident set size (``ru_maxrss``) of a fresh subprocess after the
method ran, minus its resident set size just before (after imports, a module with tiny projections and
a small warm-up, whose own peak stays below): the high-water mark of the method including its
intermediates and what glibc's malloc keeps of them (tracemalloc does not see torch's allocations).
The median of --repeats fresh processes (all of them in ``peak_rss_delta_bytes_runs``), about 1 MiB of
page noise, more at 1024 where the allocator's reuse varies. Also ``ms``: wall clock of one run, one
thread (in_kernel's is a Python emulation, not a kernel's time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFIX_KERNELS_DISABLE_CPU_EXT", "1")  # no C++ op here: do not build it

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefix_kernels.benchmarking.metadata import environment  # noqa: E402
from prefix_kernels.reference import t5_relative_bias, t5_relative_bucket  # noqa: E402

METHODS = ("materialized", "per_distance", "in_kernel")
HEADS = {"t5-small": 8, "t5-large": 16}
LENGTHS = (1024, 2048, 4096)
NUM_BUCKETS, MAX_DISTANCE, TILE = 32, 128, 128


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def _attention(heads: int):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    config = T5Config(d_model=64, d_kv=8, num_heads=heads,  # the projections do not matter here relative_attention_num_buckets=NUM_BUCKETS,
                      relative_attention_max_distance=MAX_DISTANCE, is_decoder=False)
    return T5Attention(config, has_relative_attention_bias=True, layer_idx=0).eval()


def _run(method: str, table: torch.Tensor, attn, n: int) -> int:
    """Runs ``method`` for N = M = n; returns the bytes it keeps."""
    if method == "materialized":
        return attn.compute_bias(n, n).nbytes
    if method == "per_distance":
        distance = torch.arange(-(n - 1), n)
        bucket = t5_relative_bucket(distance, bidirectional=True, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE)
        return table[bucket].T.contiguous().nbytes
    total = torch.zeros((), dtype=table.dtype)
    for q0 in range(0, n, TILE):
        for k0 in range(0, n, TILE):
            tile = t5_relative_bias(table, torch.arange(q0, q0 + TILE), torch.arange(k0, k0 + TILE),
                                    bidirectional=True, max_distance=MAX_DISTANCE)
            total += tile.sum()
    return table.nbytes + 3 * 8  # the table, num_buckets, max_distance, bidirectional


def measure_one(heads: int, n: int, method: str) -> dict:
    """One measurement in this process (run it in a fresh one: ru_maxrss only grows)."""
    torch.set_num_threads(1)
    with torch.no_grad():
        attn = _attention(heads)
        table = attn.relative_attention_bias.weight.detach()
        _run(method, table, attn, TILE)  # warm-up: lazy inits, first allocations
        before = _rss_bytes()
        start = time.perf_counter()
        kept = _run(method, table, attn, n)
        ms = (time.perf_counter() - start) * 1e3
        peak = _peak_rss_bytes() - before
    return dict(heads=heads, N=n, M=n, method=method, tensor_bytes=kept, peak_rss_delta_bytes=peak, ms=ms)


def _child(heads: int, n: int, method: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--one", f"{heads},{n},{method}"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per measurement (median)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # heads,n,method: child process
    args = parser.parse_args(argv)
    if args.one:
        heads, n, method = args.one.split(",")
        print(json.dumps(measure_one(int(heads), int(n), method)))
        return 0
    env = environment(torch.device("cpu"))
    rows = []
    for model, heads in HEADS.items():
        for n in map(int, args.lengths.split(",")):
            for method in METHODS:
                runs = [_child(heads, n, method) for _ in range(args.repeats)]
                peaks = sorted(r["peak_rss_delta_bytes"] for r in runs)
                row = dict(model=model, **runs[0], **env)
                row.update(peak_rss_delta_bytes=peaks[len(peaks) // 2], peak_rss_delta_bytes_runs=peaks)
                rows.append(row)
                print(f"{model:9s} N=M={n:5d} {method:13s} keeps {row['tensor_bytes'] / 2**20:10.3f} MiB  "
                      f"peak +{row['peak_rss_delta_bytes'] / 2**20:8.1f} MiB  {row['ms']:8.1f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bias_memory_cpu.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
