"""Smoke runs of benchmarks/bench_encoders.py (--quick) and of bench_cartridge.py's decode part at tiny
shapes: files, rows and columns, the baselines' losses / tokens against ours."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import need  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_encoders_quick_writes_rows(tmp_path):
    need("cpu")
    bench = _load(ROOT / "benchmarks" / "bench_encoders.py")
    assert bench.main(["--quick", "--out", str(tmp_path), "--warmup", "1", "--reps", "1"]) == 0
    data = json.loads((tmp_path / "encoders_cpu_quick.json").read_text())
    assert {"device", "torch", "transformers", "git_sha", "date", "threads"} <= set(data["meta"])
    rows = data["rows"]
    assert [(r["model"], r["provider"]) for r in rows] == [
        ("bart", "ours(placement=peft)"), ("bart", "peft"), ("bart", "ours(placement=paper)"),
        ("bert", "ours"), ("bert", "concat_sdpa")]
    by = {(r["model"], r["provider"]): r for r in rows}
    # like-for-like pairs start from the same prefix (checked in the script too)
    assert by["bart", "peft"]["loss"] == pytest.approx(by["bart", "ours(placement=peft)"]["loss"], rel=1e-4)
    assert by["bert", "concat_sdpa"]["loss"] == pytest.approx(by["bert", "ours"]["loss"], rel=1e-4)
    # only the prefix trains: ours' table [P, L * 2 * H * D], the baseline's [L, 2, H, P, D] alike
    assert by["bert", "concat_sdpa"]["trainable_params"] == by["bert", "ours"]["trainable_params"]
    assert by["bart", "ours(placement=paper)"]["trainable_params"] > by["bart", "ours(placement=peft)"]["trainable_params"]
    for r in rows:
        assert r["ms"] > 0 and r["ms_min"] <= r["ms"] <= r["ms_max"]
        assert r["peak_mib"] is None  # CPU: only the step's peak above its start
    with open(tmp_path / "encoders_cpu_quick.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_bench_cartridge_decode_part_writes_rows(tmp_path):
    need("cpu")
    bench = _load(ROOT / "benchmarks" / "bench_cartridge.py")
    assert bench.main(["--parts", "decode", "--out", str(tmp_path), "--layers", "1", "--hidden", "64",
                       "--decode-prefix-lengths", "8", "--decode-rows", "3", "--prompt", "4", "--new-tokens", "3",
                       "--decode-reps", "1"]) == 0
    assert not (tmp_path / "cartridge_cpu.json").exists()  # the training part did not run
    data = json.loads((tmp_path / "cartridge_decode_cpu.json").read_text())
    by = {r["impl"]: r for r in data["rows"]}
    assert set(by) == {"ours", "cache_copied", "peft_generate"}
    assert by["cache_copied"]["tokens_equal_ours"] == 1.0  # the same prefix, copied into every row's cache
    assert by["ours"]["prefix_copies_mib"] == 0.0 < by["cache_copied"]["prefix_copies_mib"]
    # one layer, 3 new tokens: the 2 single-token steps' attention takes the C++ shared-prefix cascade
    assert by["ours"]["cascade_calls"] >= 2 and by["cache_copied"]["cascade_calls"] == 0
    for r in data["rows"]:
        assert r["tokens_per_s"] > 0 and r["rows"] == 3 and r["new_tokens"] == 3
    assert (tmp_path / "cartridge_decode_cpu.csv").exists()
