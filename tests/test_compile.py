"""The real (non-interpreted) kernels compile for sm_80 and sm_90 with no GPU, for every dtype, and fit
the chip's shared memory: CI catches a kernel that would not build on a GPU.

Each combination runs the real launchers through prefix_kernels.inspection (Triton's binder, the
launchers' own block configs and specializations; see tests/test_inspect.py for what the
compiled kernels cost): a small training step with a padding mask and a prefix bank (forward and
all five gradients), and the decode path at its largest tile (N * G = 64 rows, split over the
keys, so the combine kernel runs too). All in one subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import pytest

from prefix_kernels import inspection

# A spread over archs, dtypes and head dims (D = 80 pads to 128). fp64 on sm_90 is here because
# tl.dot on fp64 hit an assertion in Triton 3.6 there (H200, 2026-11-26); fp64 has no decode path.
COMBOS = [("sm_90", "float16", 64), ("sm_80", "bfloat16", 128), ("sm_90", "float16", 80), ("sm_90", "float32", 64),
          ("sm_90", "float64", 16)]
IDS = [f"{arch}-{dtype}-d{d}" for arch, dtype, d in COMBOS]


def _requests(arch, dtype, head_dim):
    """{"train": ..., "decode": ...} requests for inspection.inspect_launches."""
    train = dict(shape=f"2x4x2x256x256x16x{head_dim}", dtype=dtype, arch=arch, key_padding_mask=True, prefix_bank=2,
                 deterministic=head_dim % 128 != 0)
    return {"train": train, **({"decode": dict(train, shape=f"2x64x1x1x1024x16x{head_dim}")} if dtype != "float64"
                               else {})}


@pytest.fixture(scope="module")
def reports():
    requests = [(combo, kind, r) for combo in COMBOS for kind, r in _requests(*combo).items()]
    got = inspection.inspect_in_subprocess([r for _, _, r in requests], timeout=900)
    out = {combo: {} for combo in COMBOS}
    for (combo, kind, _), report in zip(requests, got):
        out[combo][kind] = report
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=IDS)
def test_kernels_compile_for_gpu(reports, combo):
    arch = inspection.resolve_arch(combo[0])
    for kind, report in reports[combo].items():
        assert "error" not in report, f"{kind}: {report['error_type']}: {report['error']}"
        phases = [k["phase"] for k in report["kernels"]]
        if kind == "decode":  # N = 1: the split decode kernel and its combine
            assert phases == ["decode", "decode"], report["kernels"]
        else:
            assert phases.count("forward") == 1 and phases.count("backward") >= 2, report["kernels"]
        for k in report["kernels"]:
            assert k["shared_bytes"] <= arch.smem_per_block, (
                f"{k['name']} needs {k['shared_bytes']} B of shared memory on {arch.name}")
            assert k["blocks_per_sm"] >= 1 and k["registers"] <= 255, k
