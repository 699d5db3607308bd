"""The causal-LM architecture sweep (tests/hf_sweep.py) as tests: each architecture must match PEFT,
match an independent reference, or be refused at add_prefix_tuning time naming its model type.

By default every causal LM of the installed transformers, with and without a sliding window shorter
than the sequence: a transformers release that changes a model's own rule shows up here, whichever
model it is. ``PREFIX_KERNELS_SWEEP=subset`` runs a fast, diverse subset instead (for local
iteration). Every architecture runs in a forked process with a time limit, so a hang or a hard crash
fails one test; the selected architectures run ``PREFIX_KERNELS_SWEEP_JOBS`` (default 2) at a time,
all of them when the first sweep test runs, and each test reads its own record.
``PREFIX_KERNELS_SWEEP_RESULTS=DIR`` writes the full sweep's tables there (hf_sweep[_window].md/.json,
as ``python tests/hf_sweep.py`` does).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import hf_sweep  # noqa: E402

SUBSET = ["llama", "gpt2", "mistral", "gemma2", "gpt_oss", "phimoe", "bart", "nemotron", "deepseek_v3", "jamba",
          "diffllama", "hrm_text", "gemma3_text", "llama4_text", "qwen3_next", "bigbird_pegasus", "doge",
          "zamba2", "minicpm3", "gemma4_text", "roberta", "falcon_h1", "recurrent_gemma",
          # families served by prefix_kernels.hf.legacy (attention computed by hand), a vision tower left as is
          "gpt_neo", "roformer", "xglm", "falcon", "megatron-bert", "got_ocr2", "bloom", "moshi", "jetmoe",
          "gemma4_assistant", "musicgen", "dory"]
WINDOWED_SUBSET = ["mistral", "gemma2", "gpt_oss", "phimoe", "cohere2"]
MODE = os.environ.get("PREFIX_KERNELS_SWEEP", "full")
if MODE not in ("full", "subset"):
    raise ValueError(f"PREFIX_KERNELS_SWEEP={MODE!r}: expected 'full' (the default) or 'subset'")
JOBS = int(os.environ.get("PREFIX_KERNELS_SWEEP_JOBS", "2"))
RESULTS = os.environ.get("PREFIX_KERNELS_SWEEP_RESULTS")  # a folder: the full sweep's tables go there


def _cases():
    installed = hf_sweep.all_model_types()
    plain, windowed = (installed, installed) if MODE == "full" else (SUBSET, WINDOWED_SUBSET)

    def case(model_type, window):
        missing = [] if model_type in installed else [pytest.mark.skip(reason=f"no {model_type} in this transformers")]
        return pytest.param(model_type, window, id=f"{model_type}-window" if window else model_type, marks=missing)

    return [case(t, False) for t in plain] + [case(t, True) for t in windowed]


@pytest.fixture(scope="module")
def sweep_records(request) -> dict:
    """The records of every architecture test selected in this session, run JOBS at a time."""
    selected = [item.callspec.params for item in request.session.items
                if item.module is request.module and item.originalname == "test_architecture"
                and not item.get_closest_marker("skip")]
    records = {}
    for window in (False, True):
        types = [p["model_type"] for p in selected if p["window"] == window]
        start = time.perf_counter()
        found = hf_sweep.sweep(types, window, jobs=JOBS) if types else []
        records.update(((record["model_type"], window), record) for record in found)
        if RESULTS and MODE == "full" and len(found) == len(hf_sweep.all_model_types()):
            stem = Path(RESULTS) / ("hf_sweep_window" if window else "hf_sweep")
            hf_sweep.write_results(found, stem, window, time.perf_counter() - start)
    return records


@pytest.mark.parametrize(("model_type", "window"), _cases())
def test_architecture(sweep_records, model_type, window):
    record = sweep_records[model_type, window]
    if record["class"] == "harness_error" and record["detail"].startswith(hf_sweep.NO_TINY_MODEL):
        pytest.skip(f"{model_type}: nothing to test here: {record['detail'][:200]}")
    assert record["class"] in hf_sweep.OK_CLASSES, (
        f"{model_type}{' (window)' if window else ''}: {record['class']}: {record['detail']} "
        f"[reference {record['reference']}, PEFT {record['peft']}, diffs {record['diffs']}, at {record.get('where')}]")


def _patch_wrappers(monkeypatch, after):
    """Runs ``after`` on every wrapper the harness builds (from an adapter or with add_prefix_tuning)."""
    import prefix_kernels

    for name in ("from_peft_adapter", "add_prefix_tuning"):
        real = getattr(prefix_kernels, name)
        monkeypatch.setattr(prefix_kernels, name, lambda *a, _real=real, **kw: after(_real(*a, **kw)))


@pytest.mark.parametrize(("model_type", "reference"), [("llama", "peft"), ("jamba", "cache"), ("qwen3_next", "cache")])
def test_a_silent_mismatch_is_caught(monkeypatch, model_type, reference):
    """The harness can fail, on every route: our prefix negated (the PEFT route compares it with PEFT's)
    and our output layer scaled by 1.01 (the cache route reads our prefix values) are a mismatch."""
    import torch

    def corrupt(wrapped):
        with torch.no_grad():
            wrapped.prefix_embedding.neg_()
            wrapped.base_model.get_output_embeddings().weight.mul_(1.01)
        return wrapped

    _patch_wrappers(monkeypatch, corrupt)
    record = hf_sweep.run_arch(model_type)
    assert record["reference"] == reference and record["class"] == "mismatch", record
    assert "logits rel" in record["detail"], record


@pytest.mark.parametrize(("message", "expected"), [("model type 'llama': no", "refused"), ("no", "crash")])
def test_refusals_must_name_the_model_type(monkeypatch, message, expected):
    def refuse(wrapped):
        raise NotImplementedError(message)

    _patch_wrappers(monkeypatch, refuse)
    record = hf_sweep.run_arch("llama")
    assert record["class"] == expected and record["detail"].startswith("wrap: NotImplementedError"), record


def test_the_window_reference_keeps_the_prefix_visible():
    """Under a window shorter than the sequence the reference differs from PEFT's semantics (prefix in
    the cache's first slots, out of the window of later queries), so the override is in effect."""
    import torch

    config = hf_sweep.tiny_config("mistral", window=True)
    model = hf_sweep.build_model("mistral", config)
    ids, mask, with_positions, _ = hf_sweep.inputs(model, window=True)
    layers = hf_sweep.cache_layers(model, ids)
    table = torch.randn(hf_sweep.P, sum(h * (dk + dv) for _, (h, dk, dv) in layers))
    ours = hf_sweep.cache_reference(model, table, layers, ids, mask, with_positions, ids[:, :6], windowed=True)
    peft_like = hf_sweep.cache_reference(model, table, layers, ids, mask, with_positions, ids[:, :6], windowed=False)
    assert hf_sweep.rel(ours["logits"], peft_like["logits"], mask) > 1e-2


def test_a_hang_becomes_a_crash_record(monkeypatch):
    import time

    monkeypatch.setattr(hf_sweep, "run_arch", lambda model_type, window: time.sleep(60))  # inherited by the fork
    record = hf_sweep.run_isolated("llama", timeout=1)
    assert record["class"] == "crash" and record["detail"] == "process: no result within 1 s", record


def test_markdown_table_counts_and_groups():
    records = [
        {"model_type": "a", "class": "match_peft", "detail": "", "reference": "peft", "peft": "works",
         "diffs": {"logits": 1e-7}},
        {"model_type": "b", "class": "crash", "detail": "forward: KeyError: 'x'", "reference": None,
         "peft": "fails: E", "diffs": {}},
    ]
    meta = {"window": False, "transformers": "5", "peft": "0", "torch": "2", "git_sha": "abc", "seconds": 1.0}
    text = hf_sweep.markdown(records, meta)
    assert "| match_peft | 1 |" in text and "| crash | 1 |" in text and "| mismatch | 0 |" in text
    assert text.index("## match_peft") < text.index("## crash") and "`b`" in text
