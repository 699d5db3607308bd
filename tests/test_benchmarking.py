"""The kernel benchmark (prefix_kernels.benchmarking) on CPU with tiny shapes: files and columns,
the correctness gate, FLOP/byte counts, the plot, the CLI entry and the benchmark wrappers."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch

from helpers import need, requires_triton
from prefix_kernels import prefix_attention_reference
from prefix_kernels.benchmarking import PRESETS, Provider, Shape, flops, kv_bytes, main, run_kernel_bench
from prefix_kernels.benchmarking.kernels import (
    COLUMNS,
    PROVIDERS,
    check_provider,
    make_inputs,
    ours,
    preset_shapes,
    prefix_mask_mod,
    resolve_providers,
    sdpa_no_prefix,
)
from prefix_kernels.benchmarking.report import device_slug, write_report
from prefix_kernels.reference import visibility_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = ["2x4x2x32x32x4x16", "2x4x2x1x64x4x16"]  # one training shape, one decode shape
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = run_kernel_bench(device="cpu", out_dir=out, shapes=TINY, warmup=1, reps=2, log=None)
    return rows, out


def test_flops_and_bytes_hand_computed():
    # B=1, Hq=2, N=3, M=5, P=2, D=4: queries see 3, 4, 5 sequence keys (12) plus 2 prefix keys each (6)
    shape = Shape("training", 1, 2, 1, 3, 5, 2, 4)
    assert flops(shape, "fwd") == 4 * 1 * 2 * 4 * (6 + 12) == 576
    assert flops(shape, "bwd") == 1440
    assert flops(shape, "fwd+bwd") == 2016
    decode = Shape("decode", 2, 4, 2, 1, 10, 3, 8)
    assert flops(decode, "decode") == 4 * 2 * 4 * 8 * (3 + 10) == 3328
    assert kv_bytes(decode, torch.float32) == 2 * (2 * 2 * 10 + 2 * 3) * 8 * 4 == 2944
    assert kv_bytes(decode, torch.bfloat16) == 1472


def test_shapes_and_presets():
    assert Shape.parse("8x16x4x1024x1024x64x128") == Shape("training", 8, 16, 4, 1024, 1024, 64, 128)
    assert Shape.parse("64x32x8x1x4096x64x128").kind == "decode"
    assert Shape.parse("64x32x8x1x4096x64x128").modes == ("decode",)
    with pytest.raises(ValueError):
        Shape.parse("1x2x3")
    with pytest.raises(ValueError):
        Shape("training", 1, 4, 3, 8, 8, 2, 16)  # Hq % Hkv != 0
    assert preset_shapes("auto", "cpu") == PRESETS["quick-cpu"]
    assert set(PRESETS["quick-cpu"]) <= set(PRESETS["cpu"])
    assert preset_shapes("auto", "cuda") == PRESETS["training"] + PRESETS["decode"]
    quick = PRESETS["quick"]
    assert [s.kind for s in quick] == ["training", "training", "decode"]
    assert all(512 <= s.N <= 8192 and 16 <= s.P <= 256 and s.D in (64, 128) and s.Hq > s.Hkv
               for s in PRESETS["training"])
    assert {s.M for s in PRESETS["decode"]} >= {1024, 32768} and {s.B for s in PRESETS["decode"]} >= {1, 64}
    with pytest.raises(ValueError, match="unknown preset"):
        preset_shapes("nope", "cpu")
    assert [p.name for p in resolve_providers("ours,peft,concat,floor")] == [
        "ours", "peft_style", "cat_sdpa", "sdpa_no_prefix"]
    with pytest.raises(ValueError, match="unknown provider"):
        resolve_providers(["nope"])


def test_run_writes_json_and_csv(tiny_run):
    rows, out = tiny_run
    slug = device_slug(rows[0]["device"])
    json_path, csv_path = out / slug / f"attention_{slug}.json", out / slug / f"attention_{slug}.csv"
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(rows))
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[: len(COLUMNS)] == list(COLUMNS)
        assert {"device", "torch", "triton", "transformers", "git_sha", "date", "threads"} <= set(reader.fieldnames)
        assert len(list(reader)) == len(rows)

    ok = [r for r in rows if r["status"] == "ok"]
    # 4 providers that run on CPU x (3 training modes + decode)
    assert sorted({r["provider"] for r in ok}) == ["cat_sdpa", "ours", "peft_style", "sdpa_no_prefix"]
    assert len(ok) == 16
    for r in ok:
        assert r["ms"] > 0 and r["error"] is None and r["peak_mib"] is None
        assert r["tflops"] == pytest.approx(r["flops"] / (r["ms"] * 1e-3) / 1e12)
        assert r["max_err"] < 2e-3
        ours = next(o for o in ok if (o["shape"], o["mode"], o["provider"]) == (r["shape"], r["mode"], "ours"))
        assert r["ratio_to_ours"] == pytest.approx(r["ms"] / ours["ms"])
        assert r["ratio_to_floor"] is not None
        assert (r["gb_per_s"] is not None) == (r["mode"] == "decode")
        assert r["device_type"] == "cpu" and r["dtype"] == "float32" and r["threads"] >= 1
    assert {r["mode"] for r in ok if r["kind"] == "training"} == {"fwd", "bwd", "fwd+bwd"}
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert {r["provider"] for r in skipped} == {"flex_attention", "flash_attn"}
    assert all(r["ms"] is None and "CUDA" in r["error"] for r in skipped)


def test_plot_written(tiny_run):
    pytest.importorskip("matplotlib")
    rows, out = tiny_run
    slug = device_slug(rows[0]["device"])
    png = out / slug / f"attention_{slug}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    messages = []
    rows = [dict(shape="1x1x1x1x2x1x1", kind="decode", dtype="float32", provider="ours", mode="decode", ms=1.0,
                 device="Some CPU")]
    paths = write_report(rows, tmp_path, log=messages.append)
    assert "png" not in paths and any("matplotlib" in m for m in messages)
    assert (tmp_path / "Some_CPU" / "attention_Some_CPU.csv").exists()


def test_correctness_gate_turns_a_wrong_provider_into_error_rows():
    def raises(q, k, v, pk, pv):
        raise RuntimeError("boom")

    providers = ["ours", Provider("forgets_prefix", sdpa_no_prefix), Provider("raises", raises)]
    rows = run_kernel_bench(device="cpu", out_dir=None, providers=providers, shapes=TINY, warmup=0, reps=1, log=None)
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("fwd", "bwd", "fwd+bwd", "decode"):
        assert by[("ours", mode)]["status"] == "ok"
        wrong = by[("forgets_prefix", mode)]
        assert wrong["status"] == "error" and wrong["ms"] is None and wrong["tflops"] is None
        assert wrong["error"].startswith("correctness check failed")
        assert by[("raises", mode)]["status"] == "error" and "boom" in by[("raises", mode)]["error"]


def test_floor_is_checked_without_prefix():
    shape = Shape("training", 1, 4, 2, 24, 40, 3, 16)  # N < M: bottom-right causal
    assert check_provider(PROVIDERS["sdpa_no_prefix"], shape, torch.float32, CPU) < 1e-4
    assert check_provider(PROVIDERS["sdpa_no_prefix"], Shape.parse(TINY[1]), torch.float32, CPU) < 1e-4


def test_flash_attn_wrapper_layout(monkeypatch):
    """flash_attn_cat with a stand-in flash_attn_func ([B, S, H, D], bottom-right causal, GQA)."""
    from torch.nn.attention.bias import causal_lower_right

    def flash_attn_func(q, k, v, causal=False):
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[3] == k.shape[3]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = causal_lower_right(q.shape[2], k.shape[2]) if causal else None
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return out.transpose(1, 2)

    fake = type(sys)("flash_attn")
    fake.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    for shape in (Shape("training", 2, 4, 2, 24, 40, 3, 16), Shape.parse(TINY[1])):
        assert check_provider(PROVIDERS["flash_attn"], shape, torch.float32, CPU) < 1e-4
    assert PROVIDERS["flash_attn"].why_unavailable(CPU, torch.float32)


def test_flex_mask_mod_matches_reference():
    """FlexAttention (eager, forward: CPU) with the benchmark's mask_mod gives the reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape = Shape("training", 2, 4, 2, 40, 56, 5, 16)
    q, k, v, pk, pv = make_inputs(shape, torch.float32, CPU, requires_grad=False)
    mask = create_block_mask(prefix_mask_mod(shape.P, shape.M - shape.N), None, None, shape.N, shape.P + shape.M,
                             device="cpu")
    keys, values = (torch.cat([p.expand(shape.B, -1, -1, -1), t], dim=2) for p, t in ((pk, k), (pv, v)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, keys, values, block_mask=mask, enable_gqa=True)
    ref, _ = prefix_attention_reference(q, k, v, pk, pv)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_cli_main(tmp_path, capsys):
    rc = main(["--shape", "1x2x1x16x16x2x8", "--providers", "ours,floor", "--no-plot", "--flat", "--out",
               str(tmp_path), "--reps", "1", "--warmup", "0", "--name", "k"])
    assert rc == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("k_") and files[0].endswith(".csv")
    rows = json.loads((tmp_path / files[1]).read_text())
    assert {(r["provider"], r["status"]) for r in rows} == {("ours", "ok"), ("sdpa_no_prefix", "ok")}
    with pytest.raises(SystemExit):
        main(["--preset", "nope", "--out", str(tmp_path)])


def test_default_out_dir_is_a_run_folder_like_the_cli(tmp_path, monkeypatch):
    """Without out_dir the Python API writes where ``prefix-kernels bench`` does: runs/bench-<time>/."""
    monkeypatch.chdir(tmp_path)
    rows = run_kernel_bench(device="cpu", shapes=TINY[:1], providers="ours", modes=["fwd"], warmup=0, reps=1,
                            plot=False, log=None)
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("bench-") and [p.name for p in tmp_path.iterdir()] == ["runs"]
    slug = device_slug(rows[0]["device"])
    assert json.loads((run / slug / f"attention_{slug}.json").read_text())[0]["status"] == "ok"



def test_benchmarking_imports_nothing_from_the_cli():
    """The layers run one way: the CLI uses benchmarking, benchmarking never imports the CLI (the
    run folder's name comes from prefix_kernels.runs, as the CLI's)."""
    package = ROOT / "prefix_kernels" / "benchmarking"
    for path in package.glob("*.py"):
        assert "prefix_kernels.cli" not in path.read_text(), path.name


def test_dtype_names():
    """run_kernel_bench's dtype: a name of the one table (prefix_kernels.dtypes) or a torch.dtype."""
    from prefix_kernels.dtypes import resolve_dtype

    assert resolve_dtype("bf16") is resolve_dtype("bfloat16") is resolve_dtype("torch.bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    assert resolve_dtype("fp32", ("float32",)) is torch.float32
    with pytest.raises(ValueError, match="dtype must be one of float16, bfloat16, float32, float64, got 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(ValueError, match="dtype must be one of bfloat16, float16, float32, got torch.float64"):
        resolve_dtype(torch.float64, ("bfloat16", "float16", "float32"))
    with pytest.raises(ValueError, match="dtype must be one of"):
        run_kernel_bench(device="cpu", shapes=TINY[:1], dtype="half-ish", out_dir=None, log=None)


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_script_keeps_its_files(tmp_path):
    need("cpu")
    bench_cpu = _load(ROOT / "benchmarks" / "bench_cpu.py")
    assert bench_cpu.main(["--out", str(tmp_path), "--shape", TINY[0], "--reps", "1", "--warmup", "0",
                           "--impls", "ours,peft,concat,floor"]) == 0
    rows = json.loads((tmp_path / "cpu_bench.json").read_text())
    assert (tmp_path / "cpu_bench.csv").exists()
    assert {r["provider"] for r in rows} == {"ours", "peft_style", "cat_sdpa", "sdpa_no_prefix"}
    common = _load(ROOT / "benchmarks" / "common.py")  # bench_hf.py / profile_step.py import these
    assert common.time_ms(lambda: None, warmup=0, reps=2, device="cpu") >= 0
    assert {"device", "torch", "git_sha", "date", "threads"} <= set(common.environment("cpu"))


@requires_triton
def test_tune_blocks_script_times_checks_and_restores(tmp_path, monkeypatch):
    """The block-size sweep: one row per (kernel, candidate), each checked against the default
    configuration's results; a candidate whose results differ is 'wrong', never timed; the
    launch policy is the default again afterwards."""
    from prefix_kernels.kernels import configs

    tune = _load(ROOT / "benchmarks" / "tune_blocks.py")
    args = ["--tiny", "--out", str(tmp_path)] + ([] if torch.cuda.is_available() else ["--device", "cpu"])
    assert tune.main(args) == 0
    assert configs.kernel_configs(16, torch.float32, None) == configs._default_configs(16, torch.float32, None)
    rows = json.loads(next(tmp_path.glob("blocks_*.json")).read_text())
    assert [r["kernel"] for r in rows] == ["forward", "forward", "dq", "dq", "backward", "backward"]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["max_rel_err"] <= 2e-2 for r in rows)
    assert {"device", "git_sha", "torch"} <= set(rows[0])

    # a launcher that computes a wrong result under one configuration is caught
    from prefix_kernels import ops

    real_forward = ops.prefix_attention_forward

    def forward_wrong_for_small_blocks(*a, **kw):
        out, lse = real_forward(*a, **kw)
        return (out * 2 if configs.kernel_configs(16, torch.float32, None).forward.block_n < 64 else out), lse

    monkeypatch.setattr(ops, "prefix_attention_forward", forward_wrong_for_small_blocks)
    rows = tune.sweep(tune.TINY[0], torch.float32, tune.torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                      {"forward": [(64, 32, 4, 3)], "dq": [], "backward": []}, reps_cpu=1)
    assert [(r["kernel"], r["default"], r["status"]) for r in rows] == [
        ("forward", True, "ok"), ("forward", False, "wrong"), ("dq", True, "ok"), ("backward", True, "ok")]


def test_kernels_module_reexports_the_pieces():
    # kernels.py is the runner; the scripts under benchmarks/ and these tests import every piece from it
    from prefix_kernels.benchmarking import accounting, correctness, kernels, metadata, providers, shapes, timing

    for name in kernels.__all__:
        assert hasattr(kernels, name), name
    assert kernels.check_provider is correctness.check_provider and kernels.Shape is shapes.Shape
    assert kernels.PROVIDERS is providers.PROVIDERS and kernels.flops is accounting.flops
    assert kernels.environment is metadata.environment and kernels.time_ms is timing.time_ms


def test_interleaved_times_drops_the_failing_step():
    from prefix_kernels.benchmarking.timing import interleaved_times

    def boom():
        raise RuntimeError("boom\nmore")

    times, failed = interleaved_times({"ok": lambda: None, "bad": boom}, warmup=1, reps=2)
    assert set(times) == {"ok"} and failed == {"bad": "RuntimeError: boom"}
    calls = {"n": 0}

    def flaky():  # fails in the interleaved run only, not when run alone afterwards
        calls["n"] += 1
        if calls["n"] == 2:
            raise ValueError("once")

    times, failed = interleaved_times({"ok": lambda: None, "flaky": flaky}, warmup=0, reps=3)
    assert times == {} and failed == {"ok": "ValueError: once", "flaky": "ValueError: once"}
    assert interleaved_times({}, warmup=0, reps=1) == ({}, {})


def test_gpu_check_script_parses():
    import shutil
    import subprocess

    if shutil.which("bash") is None:
        pytest.skip("no bash")
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- sliding windows

WINDOWED = ["1x4x2x48x48x4x16w8", "1x4x2x48x48x4x16w48", "2x4x2x1x64x4x16w16"]  # W < M, W = M, decode
CPU_PROVIDERS = ["ours", "peft_style", "cat_sdpa", "sdpa_no_prefix"]


def test_shape_with_a_window_parses_names_and_cuts_down():
    shape = Shape.parse("1x32x8x8192x8192x128x128w1024")
    assert shape == Shape("training", 1, 32, 8, 8192, 8192, 128, 128, 1024)
    assert shape.name == "1x32x8x8192x8192x128x128w1024" and Shape.parse(shape.name) == shape
    assert Shape.parse("8x16x4x1024x1024x64x128").W is None and Shape.parse(" 1X2X1X4X4X0X8W3 ").W == 3
    assert Shape.parse("2x4x2x1x64x4x16w16").kind == "decode"
    for bad in ("1x2x1x4x4x0x8w", "1x2x1x4x4x0x8w3w4", "1x2x1x4x4x0x8x3", "1x2x1x4x4x0x8:w3"):
        with pytest.raises(ValueError, match="optionally followed by wW"):
            Shape.parse(bad)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="window W must be an int >= 1"):
            Shape("training", 1, 2, 1, 4, 4, 0, 8, bad)
    # the gate's shape: a window shorter than M stays shorter than the cut-down M, one >= M is kept
    assert shape.cut_down() == Shape("training", 1, 32, 8, 256, 256, 128, 128, 32)
    assert Shape.parse("1x4x2x512x512x4x16w511").cut_down().W == 255
    assert Shape.parse("1x4x2x512x512x4x16w1").cut_down().W == 1
    assert Shape.parse("1x4x2x8192x8192x4x16w8192").cut_down().W == 8192
    assert Shape.parse("4x4x2x1x4096x4x16w1024").cut_down() == Shape("decode", 2, 4, 2, 1, 513, 4, 16, 129)


def test_window_presets():
    for name, m, windows in (("window", 8192, [1024, 8192]), ("window-cpu", 2048, [512, 2048])):
        shapes = preset_shapes(name, "cpu")
        assert [s.W for s in shapes] == windows and all(s.N == s.M == m and s.kind == "training" for s in shapes)
        assert len({s.name for s in shapes}) == len(shapes)  # rows of different windows never share a name
    assert all(s.W is None for s in preset_shapes("auto", "cpu") + preset_shapes("auto", "cuda"))


@pytest.mark.parametrize("text", ["1x2x1x7x7x3x4w1", "1x2x1x7x7x3x4w3", "1x2x1x7x7x3x4w7", "1x2x1x7x7x3x4w50",
                                  "2x3x1x5x9x2x8w4", "2x4x2x1x10x3x8w4", "2x4x2x1x10x3x8w10"])
def test_flops_count_only_the_keys_the_window_shows(text):
    """FLOPs and bytes against a count of the reference's visibility mask (prefix included)."""
    shape = Shape.parse(text)
    visible = visibility_mask(shape.N, shape.M, shape.P, causal=True, key_padding_mask=None, batch=1,
                              device=CPU, sliding_window=shape.W)
    fwd = 4 * shape.B * shape.Hq * shape.D * int(visible.sum())
    mode = "decode" if shape.kind == "decode" else "fwd"
    assert flops(shape, mode) == fwd
    if shape.kind == "decode":
        cache = int(visible[0, 0, 0, shape.P:].sum())
        assert kv_bytes(shape, torch.float32) == 2 * (shape.B * shape.Hkv * cache + shape.Hkv * shape.P) * shape.D * 4
    else:
        assert flops(shape, "fwd+bwd") == 3.5 * fwd
    # by hand, N = M = 7, P = 3, W = 3: the queries see 1, 2, 3, 3, 3, 3, 3 sequence keys, 3 prefix keys each
    assert flops(Shape.parse("1x2x1x7x7x3x4w3"), "fwd") == 4 * 2 * 4 * (18 + 21)


@pytest.mark.parametrize("text", WINDOWED + ["1x4x2x512x512x4x16w64"])
def test_window_reaches_every_providers_gate(text):
    """Every provider that runs on CPU passes the gate with the window; one that drops it fails."""
    shape = Shape.parse(text)
    for name in CPU_PROVIDERS:
        assert check_provider(PROVIDERS[name], shape, torch.float32, CPU) < 1e-4, name
    ignores_window = Provider("ignores_window", lambda *args, window: ours(*args), windowed=True)
    floor_ignores_window = Provider("floor_ignores", lambda *args, window: sdpa_no_prefix(*args), uses_prefix=False,
                                    windowed=True)
    if shape.W < shape.M:  # a window that hides keys, on the gate's cut-down shape too
        for wrong in (ignores_window, floor_ignores_window):
            with pytest.raises(AssertionError, match="out "):
                check_provider(wrong, shape, torch.float32, CPU)
    else:  # W >= M: the same keys as no window
        assert check_provider(ignores_window, shape, torch.float32, CPU) < 1e-4


def test_window_rows(tmp_path):
    """Rows of window shapes: W in the rows and files, ratios within a window, flash-attn and a
    provider that takes no window skipped as not applicable, the rest timed."""
    takes_no_window = Provider("no_window", PROVIDERS["ours"].fn)
    rows = run_kernel_bench(device="cpu", out_dir=tmp_path, shapes=WINDOWED + [TINY[0]], warmup=0, reps=1,
                            providers=CPU_PROVIDERS + ["flash_attn", takes_no_window], plot=False,
                            per_device_dir=False, device_suffix=False, log=None)
    assert {r["W"] for r in rows} == {8, 48, 16, None}
    ok = [r for r in rows if r["status"] == "ok"]
    assert {(r["shape"], r["provider"]) for r in ok} == {
        (s, p) for s in WINDOWED for p in CPU_PROVIDERS} | {(TINY[0], p) for p in CPU_PROVIDERS + ["no_window"]}
    for r in ok:
        same = next(o for o in ok if (o["shape"], o["mode"], o["provider"]) == (r["shape"], r["mode"], "ours"))
        assert r["ratio_to_ours"] == pytest.approx(r["ms"] / same["ms"]) and r["max_err"] < 1e-4
        assert r["flops"] == flops(Shape.parse(r["shape"]), r["mode"])
    skipped = {(r["shape"], r["provider"]): r["error"] for r in rows if r["status"] == "skipped"}
    assert skipped[(WINDOWED[0], "no_window")] == "not applicable with a sliding window: no_window takes no window"
    assert "CUDA" in skipped[(WINDOWED[0], "flash_attn")] and (TINY[0], "no_window") not in skipped
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert [r["W"] for r in saved] == [r["W"] for r in rows]
    with open(tmp_path / "attention.csv", newline="") as f:
        assert {r["W"] for r in csv.DictReader(f)} == {"8", "48", "16", ""}


def test_flash_attn_is_not_applicable_with_a_window(monkeypatch):
    """flash-attn's window would hide the prefix: on CUDA (its import faked here) it is skipped with
    that reason when the shape has a window, and runs without one."""
    monkeypatch.setitem(sys.modules, "flash_attn", type(sys)("flash_attn"))
    cuda = torch.device("cuda")
    assert PROVIDERS["flash_attn"].why_unavailable(cuda, torch.bfloat16) is None
    reason = PROVIDERS["flash_attn"].why_unavailable(cuda, torch.bfloat16, window=1024)
    assert reason.startswith("not applicable with a sliding window") and "prefix" in reason
    assert all(PROVIDERS[name].why_unavailable(CPU, torch.float32, window=8) is None for name in CPU_PROVIDERS)


def test_flex_mask_mod_with_a_window_matches_reference():
    """FlexAttention (eager, forward: CPU) with the benchmark's windowed mask_mod gives the reference."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    shape = Shape("training", 2, 4, 2, 40, 56, 5, 16, 9)
    q, k, v, pk, pv = make_inputs(shape, torch.float32, CPU, requires_grad=False)
    mask = create_block_mask(prefix_mask_mod(shape.P, shape.M - shape.N, shape.W), None, None, shape.N,
                             shape.P + shape.M, device="cpu")
    keys, values = (torch.cat([p.expand(shape.B, -1, -1, -1), t], dim=2) for p, t in ((pk, k), (pv, v)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, keys, values, block_mask=mask, enable_gqa=True)
    ref, _ = prefix_attention_reference(q, k, v, pk, pv, sliding_window=shape.W)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    unwindowed, _ = prefix_attention_reference(q, k, v, pk, pv)
    assert not torch.allclose(out, unwindowed, atol=1e-3)


def test_cli_and_bench_cpu_take_a_window(tmp_path):
    rc = main(["--shape", "1x2x1x16x16x2x8w4", "--providers", "ours,floor", "--no-plot", "--flat", "--out",
               str(tmp_path / "cli"), "--reps", "1", "--warmup", "0", "--name", "k"])
    rows = json.loads(next((tmp_path / "cli").glob("k_*.json")).read_text())
    assert rc == 0 and {(r["provider"], r["W"], r["status"]) for r in rows} == {("ours", 4, "ok"),
                                                                                ("sdpa_no_prefix", 4, "ok")}
    with pytest.raises(SystemExit):
        main(["--shape", "1x2x1x16x16x2x8w0", "--out", str(tmp_path)])
    need("cpu")
    bench_cpu = _load(ROOT / "benchmarks" / "bench_cpu.py")
    assert bench_cpu.main(["--preset", "window-cpu", "--out", str(tmp_path), "--shape", WINDOWED[0], "--reps", "1",
                           "--warmup", "0"]) == 0
    rows = json.loads((tmp_path / "window_cpu.json").read_text())
    assert (tmp_path / "window_cpu.csv").exists() and not (tmp_path / "cpu_bench.json").exists()
    assert {(r["provider"], r["W"], r["status"]) for r in rows} == {(p, 8, "ok") for p in CPU_PROVIDERS}


# ---------------------------------------------------------------- presets, progress, interrupts (CLI entry point)

def _bench_cli(args, capsys):
    from prefix_kernels.cli import main as cli_main

    rc = cli_main(["bench", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def tiny_gpu_preset(monkeypatch):
    """A preset marked as sized for a CUDA GPU, with a shape small enough to run here."""
    from prefix_kernels.benchmarking import shapes

    monkeypatch.setitem(shapes.PRESET_TABLE, "tiny-gpu", shapes.Preset("cuda", "test", (Shape.parse(TINY[0]),)))
    monkeypatch.setitem(shapes.PRESETS, "tiny-gpu", [Shape.parse(TINY[0])])
    return "tiny-gpu"


def test_bench_help_lists_every_preset_with_its_device_and_shapes(capsys):
    from prefix_kernels.benchmarking import PRESET_TABLE

    with pytest.raises(SystemExit) as exit_info:
        _bench_cli(["--help"], capsys)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    listing = text[text.index("\npresets"):]
    entries = {}  # name -> its lines, joined
    for line in listing.strip().splitlines()[1:]:
        if line[2:3] != " ":
            name = line.split()[0]
            entries[name] = line.strip()
        else:
            entries[name] += " " + line.strip()
    assert list(entries) == ["auto", *PRESET_TABLE]
    for name, preset in PRESET_TABLE.items():
        label = entries[name].split(maxsplit=1)[1]
        assert label.startswith("CUDA GPU" if preset.device == "cuda" else "CPU"), name
        assert all(s.name in entries[name].split() or s.name + "," in entries[name].split()
                   for s in preset.shapes), name
    assert PRESET_TABLE["quick"].device == "cuda" and PRESET_TABLE["quick-cpu"].device == "cpu"
    assert "here: quick-cpu" in entries["auto"] or torch.cuda.is_available()
    assert entries["quick-cpu"].split()[1:3] == ["CPU,", "about"]  # its measured run time
    assert " s on 2 cores" in entries["quick-cpu"] and "use quick-cpu" in entries["quick"]
    assert ":mod:" not in text and "``" not in text and ":class:" not in text


def test_bench_refuses_a_gpu_preset_on_cpu_unless_forced(tmp_path, capsys, tiny_gpu_preset):
    from prefix_kernels.benchmarking import gpu_sized

    assert gpu_sized("quick", "cpu") == ["quick"] and gpu_sized("cpu,training", "cpu") == ["training"]
    assert gpu_sized("auto", "cpu") == [] and gpu_sized("quick", "cuda") == []
    rc, out, err = _bench_cli(["--device", "cpu", "--preset", tiny_gpu_preset, "--out", str(tmp_path)], capsys)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "sized for a CUDA GPU" in err and "--preset quick-cpu" in err and "--force" in err
    assert not any(tmp_path.iterdir())
    rc, out, err = _bench_cli(["--device", "cpu", "--preset", tiny_gpu_preset, "--force", "--out", str(tmp_path),
                               "--providers", "ours", "--modes", "fwd", "--reps", "1", "--warmup", "0", "--no-plot",
                               "--flat", "--name", "k"], capsys)
    assert rc == 0 and "warning" in err and "sized for a CUDA GPU" in err
    assert [r["status"] for r in json.loads(next(tmp_path.glob("k_*.json")).read_text())] == ["ok"]


def test_bench_cpu_default_runs_and_writes_rows_as_each_step_finishes(tmp_path, capsys, monkeypatch):
    from prefix_kernels.benchmarking import report

    seen = []  # the rows in the JSON file after each write
    real_add = report.RowWriter.add

    def add(self, rows):
        real_add(self, rows)
        seen.append(len(json.loads(self.paths["json"].read_text())))

    monkeypatch.setattr(report.RowWriter, "add", add)
    rc, out, err = _bench_cli(["--device", "cpu", "--out", str(tmp_path), "--no-plot", "--flat", "--name", "k",
                               "--providers", "ours,floor", "--reps", "1", "--warmup", "0"], capsys)
    assert rc == 0, err
    cpu_shapes = PRESETS["quick-cpu"]
    steps = sum(len(s.modes) for s in cpu_shapes)
    assert seen == [2 * i for i in range(1, steps + 1)]  # each step's two rows, as it finished
    rows = json.loads(next(tmp_path.glob("k_*.json")).read_text())
    assert [r["shape"] for r in rows[::2]] == [s.name for s in cpu_shapes for _ in s.modes]
    assert all(r["status"] == "ok" for r in rows) and {"device", "torch", "date"} <= set(rows[0])
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert len(progress) == steps
    numbers = [re.match(r"\[ *(\d+)/(\d+) +(\d+\.\d) s\] ", line) for line in progress]
    assert [(int(m[1]), int(m[2])) for m in numbers] == [(i, steps) for i in range(1, steps + 1)]
    assert [float(m[3]) for m in numbers] == sorted(float(m[3]) for m in numbers)  # seconds since the start
    with open(next(tmp_path.glob("k_*.csv")), newline="") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_bench_interrupt_keeps_the_finished_rows(tmp_path, capsys, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) during the second step: exit status 130, one line saying where
    the first step's rows are, and they are in the files."""
    from prefix_kernels.benchmarking import kernels

    real = kernels._time_interleaved
    calls = {"n": 0}

    def interrupted_second_time(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "_time_interleaved", interrupted_second_time)
    try:
        rc, out, err = _bench_cli(["--device", "cpu", "--shape", TINY[0], "--shape", TINY[1], "--providers",
                                   "ours,floor", "--reps", "1", "--warmup", "0", "--out", str(tmp_path), "--flat",
                                   "--name", "k"], capsys)
    except KeyboardInterrupt:  # not to pytest, which would stop the session
        pytest.fail("the interrupt escaped prefix-kernels bench")
    json_path = next(tmp_path.glob("k_*.json"))
    assert rc == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "interrupted after 1 of 4 steps" in err and str(json_path) in err
    rows = json.loads(json_path.read_text())
    assert [(r["shape"], r["mode"], r["provider"], r["status"]) for r in rows] == [
        (TINY[0], "fwd", "ours", "ok"), (TINY[0], "fwd", "sdpa_no_prefix", "ok")]
    assert rows[0]["device"] and rows[0]["torch"]
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp"))


def test_bench_sigint_to_a_running_bench_keeps_the_first_step(tmp_path):
    """A real SIGINT to ``python -m prefix_kernels bench`` once the first step's rows are on disk."""
    import signal
    import subprocess
    import time

    out = tmp_path / "out"
    # the first step (a tiny shape) finishes in a second or so; the second would take minutes
    cmd = [sys.executable, "-m", "prefix_kernels", "bench", "--device", "cpu", "--shape", TINY[0], "--modes", "fwd",
           "--shape", "1x8x2x2048x2048x64x64", "--providers", "ours,floor", "--reps", "2000", "--warmup", "0",
           "--out", str(out), "--flat", "--name", "k", "--no-plot"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("k_*.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1].startswith("prefix-kernels bench: interrupted after 1 of 2 steps")
    assert "Traceback" not in stderr
    rows = json.loads(next(out.glob("k_*.json")).read_text())
    assert {(r["shape"], r["mode"]) for r in rows} == {(TINY[0], "fwd")} and len(rows) == 2
    assert "[1/2" in stdout
