"""The output-layout rule (prefix_kernels/layout.py: out [B, Hq, N, Dv] laid out like q) against
the C++ op's actual output, and against the fake implementation torch.compile traces with."""

from __future__ import annotations

import pytest
import torch

from prefix_kernels import cpu
from prefix_kernels.layout import new_out
from helpers import need

B, H, N, D = 2, 4, 5, 8


@pytest.fixture(scope="module", autouse=True)
def ext():
    need("cpu")


def _contiguous(dv):
    return torch.randn(B, H, N, D), dv


def _hf_transposed(dv):
    """HF's attention: q as a transposed view of [B, N, H, D] storage."""
    return torch.randn(B, N, H, D).transpose(1, 2), dv


def _head_major(dv):
    """[H, B, N, D] storage seen as [B, H, N, D]."""
    return torch.randn(H, B, N, D).transpose(0, 1), dv


def _sliced(dv):
    """A slice of a wider fused qkv projection: q's rows are not dense."""
    return torch.randn(B, N, 3 * H, D)[:, :, :H].transpose(1, 2), dv


def _head_dim_outer(dv):
    """D not innermost: [B, D, N, H] storage permuted to [B, H, N, D]."""
    return torch.randn(B, D, N, H).permute(0, 3, 2, 1), dv


def _single_query(dv):
    """Decode: N = 1 (a size-one dim ties strides with its neighbour)."""
    return torch.randn(B, 1, H, D).transpose(1, 2), dv


LAYOUTS = {"contiguous": _contiguous, "hf transposed": _hf_transposed, "head major": _head_major,
           "sliced qkv": _sliced, "head dim outer": _head_dim_outer, "single query": _single_query}


def _run(q, dv):
    n = q.shape[2]
    k = torch.randn(B, 2, n + 3, D)
    v = torch.randn(B, 2, n + 3, dv)
    pk, pv = torch.randn(2, 3, D), torch.randn(2, 3, dv)
    return torch.ops.prefix_kernels.fwd_cpu(q, k, v, pk, pv, None, None, True, D ** -0.5)


@pytest.mark.parametrize("dv", [D, 12, 3], ids=lambda dv: f"Dv={dv}")
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_op_output_strides_follow_the_rule(layout, dv):
    q, dv = LAYOUTS[layout](dv)
    out, _ = _run(q, dv)
    want = new_out(q, dv)
    assert out.shape == want.shape == (*q.shape[:3], dv)
    assert out.stride() == want.stride(), (layout, q.stride())


@pytest.mark.parametrize("layout", ["hf transposed", "head dim outer"])
def test_fake_output_strides_follow_the_rule(layout):
    """Under FakeTensorMode the registered fake gives the rule's strides too (torch.compile)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, dv = LAYOUTS[layout](12)
    real, _ = _run(q, dv)
    with FakeTensorMode() as mode:
        fake, _ = _run(mode.from_tensor(q), dv)
    assert fake.stride() == real.stride()


def test_hf_layout_transposes_back_without_a_copy():
    q, dv = _hf_transposed(12)
    out, _ = _run(q, dv)
    assert out.transpose(1, 2).is_contiguous()


def test_contiguous_is_row_major_whatever_q():
    q, _ = _hf_transposed(D)
    assert new_out(q, 12, contiguous=True).is_contiguous()
    assert new_out(q, D, contiguous=True).is_contiguous()
