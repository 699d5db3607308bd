"""Encoder-decoders and encoders: one prefix-tuning training step -- forward, backward, AdamW on
the prefix -- of a BART-base-shaped and a BERT-base-shaped model, ours against PEFT (BART) and against a
concatenating baseline (BERT, where PEFT's prefix tuning fails under transformers 5).

    PYTHONPATH=. python benchmarks/bench_encoders.py                       # CPU, the full shapes below
    PYTHONPATH=. python benchmarks/bench_encoders.py --quick               # tiny models, a few seconds
    PYTHONPATH=. python benchmarks/bench_encoders.py --device cuda         # bfloat16 on CUDA

Models, randomly initialized (speed and memory do not depend on the weights), every dropout 0:

* ``bart``: BART-base geometry (d_model 768, 6 + 6 layers, 12 heads, FFN 3072, vocab 50265),
  BartForConditionalGeneration, B=8, source 256 tokens (half the rows right-padded by 32), target 64,
  P=32. Rows: ``ours(placement=peft)`` (the decoder's self-attention only, PEFT's layout) against
  ``peft`` (PEFT 0.21 SEQ_2_SEQ_LM prefix tuning: expand + cat into the decoder's KV cache), the
  like-for-like pair, both started from the same prefix and their losses compared before timing;
  and ``ours(placement=paper)`` (Li & Liang: a prefix in every encoder self-, decoder self- and
  cross-attention layer: more prefixes, and the gradient runs back through the encoder too).
* ``bert``: BERT-base geometry (768 hidden, 12 layers, 12 heads, FFN 3072, vocab 30522),
  BertForSequenceClassification with 2 labels, B=8, N=256 (half the rows right-padded by 32), P=32.
  Rows: ``ours`` against ``concat_sdpa``: the same frozen model with an attention function
  registered here that concatenates each layer's prefix K/V (an nn.Parameter [L, 2, H, P, D]
  expanded to the batch) in front of the keys/values, extends transformers' padding mask by P
  visible columns and calls SDPA; positions shifted by P as ours (and PEFT's cache) do; losses
  compared before timing. What trains besides the prefix follows ours: whatever of the model
  ``add_prefix_tuning`` leaves trainable (with ``trainable_modules``, the classifier by default) trains
  in the baseline too; the rows' ``trains`` says what it was.

Timing: per step, ``--warmup`` (2) steps, then ``--reps`` (5) rounds in which each provider runs one
step in turn (interleaved, so background load hits them alike); median, min and max ms. CUDA: the
same, with a synchronize after each step. Peak memory of one more step (:func:`peak_step_mib`): above
what was allocated when the step started (CPU: the resident-set high-water mark, CUDA:
max_memory_allocated); on CUDA also the absolute max_memory_allocated. Rows go to
<out>/encoders_<device>[_quick].json and .csv, with the environment (device, versions, git SHA).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cartridge import _loadavg, peak_step_mib, write_rows  # noqa: E402
from common import environment  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024)
BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
BART_TINY = dict(vocab_size=512, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)
BERT_TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=128)
# (geometry name, geometry, B, source or N tokens, target tokens, P)
SHAPES = {
    "full": {"bart": ("bart-base", BART_BASE, 8, 256, 64, 32), "bert": ("bert-base", BERT_BASE, 8, 256, None, 32)},
    "quick": {"bart": ("bart-tiny", BART_TINY, 4, 32, 8, 4), "bert": ("bert-tiny", BERT_TINY, 4, 32, None, 4)},
}
CONCAT = "prefix_kernels_bench_concat"


class Case(NamedTuple):
    """One provider of one model: its training step (forward + backward + AdamW), its loss before training."""

    provider: str
    step: Callable[[], None]
    loss: float
    trainable: int  # trainable parameter count
    trains: str  # what trains: "prefix", "prefix+classifier", ...


# ------------------------------------------------------------------------------------ models

def build_bart(geometry: dict, device, dtype) -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(**geometry, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return BartForConditionalGeneration(config).to(dtype).eval()


def build_bert(geometry: dict, device, dtype) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(**geometry, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        return BertForSequenceClassification(config).to(dtype).eval()


def _padded_batch(batch: int, tokens: int, vocab: int, device, pad_id: int | None = None):
    """ids [B, tokens] and a right-padding mask: the first half of the rows end with tokens // 8 pads."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (batch, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[: batch // 2, tokens - tokens // 8:] = 0
    if pad_id is not None:
        ids = ids.masked_fill(mask == 0, pad_id)
    return ids.to(device), mask.to(device)


def _train_step(model: nn.Module, inputs: dict, device) -> tuple[Callable[[], None], int, str]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    heads = sorted({name.rsplit(".", 1)[0].split(".")[-1] for name, p in model.named_parameters() if p.requires_grad
                    and not any(word in name for word in ("prefix", "prompt_encoder"))})

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
    return step, sum(p.numel() for p in params), "+".join(["prefix", *heads])


def _loss(model: nn.Module, inputs: dict) -> float:
    with torch.no_grad():
        return model(**inputs).loss.float().item()


def _check_losses(losses: dict[str, float], pairs, tolerance: float) -> None:
    for ours, theirs in pairs:
        if abs(losses[ours] - losses[theirs]) > tolerance * abs(losses[theirs]):
            raise AssertionError(f"losses differ before timing: {losses}")


def bart_cases(geometry: dict, batch: int, source: int, target: int, prefix_len: int, device, dtype) -> list[Case]:
    import peft

    base = build_bart(geometry, device, dtype)
    src, src_mask = _padded_batch(batch, source, geometry["vocab_size"], device, pad_id=1)
    labels, _ = _padded_batch(batch, target, geometry["vocab_size"], device)
    inputs = dict(input_ids=src, attention_mask=src_mask, labels=labels)
    models = {"ours(placement=peft)": add_prefix_tuning(copy.deepcopy(base), prefix_len, placement="peft")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
            task_type="SEQ_2_SEQ_LM", num_virtual_tokens=prefix_len))
    with torch.no_grad():  # the same start: PEFT's decoder self-attention prefix is rows [:P] of its table
        theirs.prompt_encoder["default"].embedding.weight[:prefix_len].copy_(
            models["ours(placement=peft)"].prefix_embedding[0])
    models["peft"] = theirs
    models["ours(placement=paper)"] = add_prefix_tuning(base, prefix_len, placement="paper")
    cases = []
    for name, model in models.items():
        model.train()  # PEFT's prompt encoder gets gradients in train mode (every dropout is 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step, count, trains = _train_step(model, inputs, device)
            cases.append(Case(name, step, _loss(model, inputs), count, trains))
    _check_losses({c.provider: c.loss for c in cases}, [("ours(placement=peft)", "peft")],
                  2e-2 if dtype != torch.float32 else 1e-4)
    return cases


class ConcatPrefix(nn.Module):
    """The concatenating baseline: the frozen model, its attention registered as :data:`CONCAT` (SDPA on
    each layer's prefix K/V concatenated in front of its keys/values), the prefix one Parameter
    [L, 2, H, P, D], positions after P cached tokens (as ours and PEFT's cache make them)."""

    def __init__(self, model: nn.Module, table: torch.Tensor):
        super().__init__()
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        config = model.config
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim, p = config.hidden_size // heads, table.shape[0]
        self.model = model
        for q in model.parameters():
            q.requires_grad_(False)
        # PEFT's [P, L * 2 * H * D] (K of layer l at 2l, V at 2l + 1) as [L, 2, H, P, D]
        self.prefix = nn.Parameter(table.detach().reshape(p, layers, 2, heads, head_dim)
                                   .permute(1, 2, 3, 0, 4).contiguous().to(next(model.parameters()).dtype))
        AttentionInterface.register(CONCAT, _concat_sdpa)
        AttentionMaskInterface.register(CONCAT, AttentionMaskInterface._global_mapping["sdpa"])
        model.set_attn_implementation(CONCAT)
        modules = [m for m in model.modules() if hasattr(m, "query") and hasattr(m, "key")]
        if len(modules) != layers:
            raise RuntimeError(f"found {len(modules)} attention modules for {layers} layers")
        for index, module in enumerate(modules):
            module.bench_concat = (self, index)
        model.base_model.embeddings.register_forward_pre_hook(
            lambda module, args, kwargs: (args, {**kwargs, "cache_length": kwargs.get("cache_length", 0) + p}),
            with_kwargs=True)

    def forward(self, **kwargs):
        return self.model(**kwargs)


def _concat_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    owner, layer = module.bench_concat
    b = key.shape[0]
    prefix_k, prefix_v = owner.prefix[layer, 0], owner.prefix[layer, 1]  # [H, P, D]
    key = torch.cat([prefix_k.expand(b, -1, -1, -1), key], 2)
    value = torch.cat([prefix_v.expand(b, -1, -1, -1), value], 2)
    if attention_mask is not None:  # transformers' SDPA mask: bool [B, 1, N, M] (True = attend)
        if attention_mask.dtype != torch.bool:
            raise TypeError(f"expected a bool mask, got {attention_mask.dtype}")
        visible = attention_mask.new_ones(*attention_mask.shape[:-1], prefix_k.shape[1])
        attention_mask = torch.cat([visible, attention_mask], -1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def bert_cases(geometry: dict, batch: int, tokens: int, prefix_len: int, device, dtype) -> list[Case]:
    base = build_bert(geometry, device, dtype)
    ids, mask = _padded_batch(batch, tokens, geometry["vocab_size"], device, pad_id=0)
    labels = torch.tensor([i % 2 for i in range(batch)], device=device)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    ours = add_prefix_tuning(copy.deepcopy(base), prefix_len)
    concat = ConcatPrefix(base, ours.prefix_embedding[0])
    for name, p in ours.base_model.named_parameters():  # what ours trains besides the prefix (its default:
        if p.requires_grad:                              # the head, with a trainable_modules option) trains here too
            concat.model.get_parameter(name).requires_grad_(True)
    cases = []
    for name, model in (("ours", ours), ("concat_sdpa", concat)):
        model.train()
        step, count, trains = _train_step(model, inputs, device)
        cases.append(Case(name, step, _loss(model, inputs), count, trains))
    _check_losses({c.provider: c.loss for c in cases}, [("ours", "concat_sdpa")],
                  2e-2 if dtype != torch.float32 else 1e-4)
    return cases


# ------------------------------------------------------------------------------------ timing

def interleaved_runs(steps: dict[str, Callable], *, warmup: int, reps: int) -> dict[str, list[float]]:
    """ms of each step's ``reps`` timed runs after ``warmup`` untimed ones, one run of each step in turn."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(max(reps, 1)):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def bench_model(model: str, shape: str, device, dtype, warmup: int, reps: int, log=print) -> list[dict]:
    geometry_name, geometry, batch, tokens, target, prefix_len = SHAPES[shape][model]
    if model == "bart":
        cases = bart_cases(geometry, batch, tokens, target, prefix_len, device, dtype)
    else:
        cases = bert_cases(geometry, batch, tokens, prefix_len, device, dtype)
    times = interleaved_runs({c.provider: c.step for c in cases}, warmup=warmup, reps=reps)
    load = _loadavg()  # what else ran on the machine meanwhile
    reference = cases[0].provider  # ours, like-for-like placement
    rows = []
    for case in cases:
        peak, absolute = peak_step_mib(case.step, device)
        t = times[case.provider]
        rows.append(dict(model=model, geometry=geometry_name, provider=case.provider, B=batch,
                         N=tokens, target=target, P=prefix_len, dtype=str(dtype).replace("torch.", ""),
                         ms=round(statistics.median(t), 3), ms_min=round(min(t), 3), ms_max=round(max(t), 3),
                         reps=len(t), warmup=warmup, peak_step_mib=None if peak is None else round(peak, 1),
                         peak_mib=None if absolute is None else round(absolute, 1), loss=round(case.loss, 6),
                         trains=case.trains, trainable_params=case.trainable, loadavg_1min=load))
    for row in rows:
        row["ms_vs_ours"] = round(row["ms"] / next(r["ms"] for r in rows if r["provider"] == reference), 3)
        log(f"{model:4s} {row['provider']:22s} {row['ms']:10.1f} ms (min {row['ms_min']:.1f}, max "
            f"{row['ms_max']:.1f}; {row['ms_vs_ours']:.2f}x ours)  peak +{row['peak_step_mib']} MiB  "
            f"loss {row['loss']:.4f}")
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--models", default="bart,bert")
    parser.add_argument("--quick", action="store_true", help="tiny models and shapes (a smoke run, seconds)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = "quick" if args.quick else "full"
    rows, load_start = [], _loadavg()
    for model in args.models.split(","):
        rows += bench_model(model, shape, device, dtype, args.warmup, args.reps)
    meta = environment(device)
    meta.update(timing=f"interleaved, {args.warmup} warm-up steps then {args.reps} timed rounds; median/min/max ms",
                peak_step_mib="above the allocation at the step's start: " + (
                    "CUDA max_memory_allocated" if device.type == "cuda" else
                    "CPU resident-set high-water mark (VmHWM after clear_refs; about 1 MiB resolution)"),
                peak_mib="CUDA max_memory_allocated, absolute (CPU: None)",
                loadavg_1min=[load_start, _loadavg()])
    tag = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    path = write_rows(rows, args.out, f"encoders_{tag}{'_quick' if args.quick else ''}", meta)
    print(f"wrote {path}, .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
