"""End-to-end benchmark on a transformers model: one prefix-tuning training step, ours vs PEFT, and
greedy decoding with a shared prefix against the same model without any prefix (the floor).

    PYTHONPATH=. python benchmarks/bench_hf.py --out benchmarks/results/        # CUDA, bf16
    PYTHONPATH=. python benchmarks/bench_hf.py --small --device cpu             # a smoke run
    PYTHONPATH=. python benchmarks/bench_hf.py --compile reduce-overhead       # + compiled steps

The model is randomly initialized with SmolLM2-135M's geometry (Llama, 30 layers, 9 query / 3 KV
heads, head dim 64) -- speed and memory do not depend on the weights. The training step is
forward + backward + AdamW step on the prefix only; PEFT 0.21 prefix tuning (expand + cat into the
KV cache, model's SDPA attention) is the baseline. Before timing, the two losses are compared.
``--compile MODE`` adds both models compiled alike (ours with fullgraph=True); with "reduce-overhead"
every step is a CUDA-graph replay (each step calls ``torch.compiler.cudagraph_mark_step_begin()``),
and the row's ``cudagraph_skips`` counts the graphs inductor ran without one (the reason is logged).
Rows go to <out>/hf_<device>.json and .csv.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, time_ms  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                    tie_word_embeddings=True)
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)


def build(geometry, dtype, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**geometry, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def peak_mib(device, fn):
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def training_rows(base, batch, seq, prefix_len, device, compile_mode=None):
    import peft

    ids = torch.randint(0, base.config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    mask[: batch // 2, : seq // 8] = 0  # left padding on half the rows
    labels = ids.masked_fill(mask == 0, -100)
    models = {"ours": add_prefix_tuning(copy.deepcopy(base), prefix_len)}
    reference = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=prefix_len))
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(models["ours"].prefix_embedding[0])
    models["peft"] = reference
    for model in models.values():
        model.train()  # before the loss check: the compiled models then compile once (train mode, with grad)
    if compile_mode:  # the same models' forward compiled (ours fullgraph: no graph break allowed)
        for name in list(models):
            compiled = torch.compile(models[name], mode=compile_mode, fullgraph=name == "ours")
            models[f"{name}+compile({compile_mode})"] = compiled
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels, position_ids=pos)
    losses, skips = {}, {}  # skips: inductor's count of graphs it runs without CUDA graphs (why: logged)
    for name, m in models.items():
        before = cudagraph_skips()
        torch.compiler.cudagraph_mark_step_begin()  # no-op unless CUDA graphs ("reduce-overhead")
        losses[name] = m(**inputs).loss.item()
        skips[name] = cudagraph_skips() - before
    if any(abs(loss - losses["peft"]) > 2e-2 * abs(losses["peft"]) for loss in losses.values()):
        raise AssertionError(f"losses differ before timing: {losses}")
    rows = []
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)

        def step():
            # CUDA graphs (mode="reduce-overhead") reuse their output memory from step to step: a new
            # step starts here (a no-op for eager and other modes)
            torch.compiler.cudagraph_mark_step_begin()
            opt.zero_grad(set_to_none=True)
            model(**inputs).loss.backward()
            opt.step()

        before = cudagraph_skips()
        for _ in range(3):  # compiles the backward and records the CUDA graphs outside the timed runs
            step()
        skips[name] += cudagraph_skips() - before
        ms = time_ms(step)
        row = dict(bench="train_step", provider=name, B=batch, N=seq, P=prefix_len, ms=ms,
                   tokens_per_s=batch * seq / ms * 1e3, peak_mib=peak_mib(device, step), loss=losses[name])
        if "+compile" in name:
            row["cudagraph_skips"] = skips[name]
        rows.append(row)
        print(rows[-1], flush=True)
        del opt
    return rows


def decode_rows(base, batch, prompt, new_tokens, prefix_len, device):
    ids = torch.randint(0, base.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    ours = add_prefix_tuning(copy.deepcopy(base), prefix_len)
    rows = []
    for name, fn in (("ours", lambda: ours.generate(input_ids=ids, attention_mask=mask, **gen)),
                     ("no_prefix(floor)", lambda: base.generate(input_ids=ids, attention_mask=mask, **gen))):
        fn()  # warm up (compiles)
        ms = time_ms(fn, warmup=1, reps=3)
        rows.append(dict(bench="greedy_decode", provider=name, B=batch, N=prompt, new_tokens=new_tokens,
                         P=prefix_len, ms=ms, tokens_per_s=batch * new_tokens / ms * 1e3,
                         peak_mib=peak_mib(device, fn)))
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="a tiny model and shapes (smoke test)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, metavar="MODE",
                        help="also time the training step of both models under torch.compile(mode=MODE) "
                             "(default 'default'; 'reduce-overhead' adds CUDA graphs)")
    args = parser.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build(SMALL if args.small else SMOLLM2_135M, dtype, device)
    rows = []
    if args.small:
        rows += training_rows(base, 2, 32, 4, device, args.compile)
        rows += decode_rows(base, 2, 8, 4, 4, device)
    else:
        for batch, seq, p in ((8, 1024, 64), (4, 2048, 256)):
            rows += training_rows(base, batch, seq, p, device, args.compile)
        rows += decode_rows(base, 64, 128, 64, 64, device)
    by_key = {(r["bench"], r["B"], r["N"], r["P"], r["provider"]): r for r in rows}
    for r in rows:
        mine = "ours" + r["provider"][len(r["provider"].split("+")[0]):]  # ours with the same +compile
        ours = by_key.get((r["bench"], r["B"], r["N"], r["P"], mine))
        if r["provider"] != mine and ours:
            r["ours_speedup"] = r["ms"] / ours["ms"]
    env = environment()
    for r in rows:
        r.update(env, dtype=str(dtype).replace("torch.", ""), model="llama(SmolLM2-135M geometry)" if not args.small
                 else "llama(tiny)")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"hf_{env['device'].replace(' ', '_')}{'_small' if args.small else ''}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {stem}.json/.csv")


if __name__ == "__main__":
    main()
