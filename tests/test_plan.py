"""The launch plans (prefix_kernels/kernels/plan.py): pure functions of the shapes, dtype, features,
needed gradients and the device's properties, frozen and printable, computed once per distinct
call, overridden by ``override_configs``. No kernel runs here: the numbers are those of the
benchmark shapes on the GPUs the plans are made for (sm_80, sm_90 given as DeviceProps, no GPU)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import triton.language as tl

from prefix_kernels.kernels import configs
from prefix_kernels.kernels import plan as plan_mod
from prefix_kernels.kernels.configs import BlockConfig, DecodeConfig
from prefix_kernels.kernels.plan import (
    INTERPRETER, SM80, SM90, BackwardPlan, DecodePlan, ForwardPlan, Needs, Problem, ScoreTerms, describe, format_plan,
    plan_backward, plan_forward,
)

ALL = Needs(dq=True, dkdv=True, dprefix=True, dsinks=False, deterministic=False)


def problem(batch=8, heads=16, kv_heads=4, n=1024, m=1024, p=64, d=128, dtype=torch.bfloat16, n_prefixes=1,
            has_mask=False, has_ids=False, **terms) -> Problem:
    return Problem(batch=batch, n_heads=heads, n_kv_heads=kv_heads, n_queries=n, n_keys=m, n_prefix=p,
                   n_prefixes=n_prefixes, head_dim=d, head_dim_v=d, dtype=dtype, has_mask=has_mask, has_ids=has_ids,
                   scale=d ** -0.5, terms=ScoreTerms(causal=True, **terms))


def test_forward_plan_of_a_benchmark_shape():
    """8x16x4x1024x1024x64x128 bf16 on sm_90: 128 x 64 tiles over 8 warps, 3 stages (configs.py);
    one program per (query block, row, head); a sliding window takes the narrower 128 x 32 tiles."""
    plan = plan_forward(problem(), SM90)
    assert isinstance(plan, ForwardPlan)
    assert plan.block == BlockConfig(128, 64, 8, 3)
    assert plan.forward.grid == (8, 8 * 16)
    assert dict(plan.forward.options) == dict(num_warps=8, num_stages=3)
    args = plan.forward.args
    assert (args["BLOCK_M"], args["BLOCK_N"], args["HEAD_DIM_PAD"], args["group"]) == (128, 64, 128, 4)
    assert args["IS_CAUSAL"] and not args["HAS_KPM"] and not args["HAS_PREFIX_IDS"]
    assert args["qk_scale"] == pytest.approx(128 ** -0.5 * plan_mod.LOG2E)
    terms = plan.forward.terms  # no score term: every flag off
    assert (terms.WINDOW_MASK.value, terms.SOFTCAP.value, terms.HAS_SINKS.value) == (0, False, False)
    windowed = plan_forward(problem(sliding_window=256, softcap=50.0), SM90)
    assert windowed.block == BlockConfig(128, 32, 8, 3)
    terms = windowed.forward.terms
    assert terms.WINDOW_MASK.value == 1 and terms.SOFTCAP.value and terms.window == 256
    assert terms.softcap2 == pytest.approx(50.0 * plan_mod.LOG2E)
    assert isinstance(terms.WINDOW_MASK, tl.constexpr) and terms.sinks is None  # the launcher's tensor


def test_backward_plan_of_a_benchmark_shape():
    """The one-pass backward at D = 128: (32, 128) tiles; 8 key blocks x 8 rows x 4 kv heads of sequence
    programs, and the prefix (one 128-key block per kv head) cut into chunks no heavier than one of them:
    1024 items / 128 per sequence program = 8 chunks, programs heaviest first."""
    plan = plan_backward(problem(), ALL, SM90)
    assert isinstance(plan, BackwardPlan)
    assert plan.blocks == BlockConfig(32, 128, 8, 2) and plan.tiles == BlockConfig(128, 64, 8, 2)
    assert plan.chunks == 8 and plan.prefix_acc == 1 and plan.dq_atomic and plan.dq_acc
    assert plan.main.grid == (4 * 8 + 8 * 8 * 4,)
    assert plan.main.args["n_prefix_programs"] == 32 and plan.main.args["items_per_chunk"] == 128
    assert plan.prologue.grid == (8, 8 * 16) and plan.dq is None
    assert plan.convert_dq and plan.convert_dprefix and plan.epilogue is not None
    # deterministic: dq gets its own pass, the prefix gradients one partial per chunk
    det = plan_backward(problem(), dataclasses.replace(ALL, deterministic=True), SM90)
    assert det.dq is not None and not det.dq_atomic and det.prefix_acc == det.chunks
    # fp32: the accumulators are the gradients, no epilogue
    fp32 = plan_backward(problem(dtype=torch.float32), ALL, SM90)
    assert not fp32.convert_dq and not fp32.convert_dprefix and fp32.epilogue is None
    # only the prefix gradients (a frozen model's layer 0): no sequence programs
    prefix_only = plan_backward(problem(), Needs(False, False, True, False, False), SM90)
    assert prefix_only.main.args["SEQ_PROGRAMS"] is False and prefix_only.main.grid[0] == 4 * prefix_only.chunks


def test_plans_are_frozen_printable_and_json_ready():
    for plan in (plan_forward(problem(), SM90), plan_forward(problem(n=1), SM90), plan_backward(problem(), ALL, SM90)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.device = SM80
        launch = next(getattr(plan, f.name) for f in dataclasses.fields(plan)
                      if isinstance(getattr(plan, f.name), plan_mod.Launch))
        with pytest.raises(TypeError):
            launch.args["BLOCK_N"] = 16  # a cached plan is shared: its arguments cannot change
        text = format_plan(plan)
        assert type(plan).__name__ in text and "grid" in text
        data = json.loads(json.dumps(describe(plan)))
        assert isinstance(data, dict) and data


def test_device_props_choose_blocks_splits_and_options():
    """The plan reads the device from its argument: sm_80 and sm_90 share the 16-bit blocks but not the
    SM count (the decode split count fills waves of that many SMs); the interpreter gets its own
    blocks and no compile options."""
    decode = problem(batch=64, heads=32, kv_heads=8, n=1, m=4096, p=64, d=128)
    for props in (SM80, SM90):
        plan = plan_forward(decode, props)
        assert isinstance(plan, DecodePlan)
        keys = decode.n_prefix + decode.n_keys
        assert (plan.seq_splits, plan.rows.args["keys_per_split"]) == configs.decode_num_splits(
            keys, 64 * 8, props.num_sms, plan.config)
    assert plan_forward(problem(), SM80).block == plan_forward(problem(), SM90).block
    interpreted = plan_forward(problem(), INTERPRETER)
    assert interpreted.block == BlockConfig(64, 64) and dict(interpreted.forward.options) == {}
    assert plan_forward(problem(), SM90).forward.args["UPCAST"] is False
    assert interpreted.forward.args["UPCAST"] is True


def test_override_configs_overrides_plan_fields():
    base = plan_forward(problem(), SM90)
    with configs.override_configs(forward=BlockConfig(64, 32, 4, 2), backward=BlockConfig(16, 64, 4, 1)):
        plan = plan_forward(problem(), SM90)
        assert plan.block == BlockConfig(64, 32, 4, 2) and plan.forward.grid == (16, 128)
        assert dict(plan.forward.options) == dict(num_warps=4, num_stages=2)
        assert plan_backward(problem(), ALL, SM90).blocks == BlockConfig(16, 64, 4, 1)
    assert plan_forward(problem(), SM90) == base  # the cached plan without the override
    decode = problem(batch=64, heads=32, kv_heads=8, n=1, m=64, p=4096, d=128)
    assert plan_forward(decode, SM90).cascade  # the cost model takes it (test_decode_cascade)
    with configs.override_configs(shared_prefix_decode=False, decode=DecodeConfig(block_n=32, min_keys_per_split=64)):
        plan = plan_forward(decode, SM90)
        assert not plan.cascade and plan.shared_prefix is None and plan.config.block_n == 32
    with configs.override_configs(decode_kernel=False):
        assert isinstance(plan_forward(decode, SM90), ForwardPlan)


def test_decode_choices_are_made_once(monkeypatch):
    """A decode call consults the policy once per distinct call: the cascade's split count and the
    per-row split count on the first call, nothing on the next; and the plan's fields agree with
    each other (the cascade's splits come first, the per-row kernel skips the prefix)."""
    calls = []
    real = plan_mod.decode_num_splits
    monkeypatch.setattr(plan_mod, "decode_num_splits", lambda *a, **k: calls.append(a) or real(*a, **k))
    decode = problem(batch=64, heads=32, kv_heads=8, n=1, m=64, p=4095, d=128)  # a shape no other test plans
    plan = plan_forward(decode, SM90)
    assert len(calls) == 2
    assert plan_forward(decode, SM90) is plan and len(calls) == 2
    assert plan.cascade and plan.split_base == plan.shared_prefix.grid[1]
    assert plan.splits == plan.split_base + plan.seq_splits == plan.rows.args["num_splits"]
    assert plan.rows.args["n_prefix"] == 0 and plan.rows.grid == (64 * 8, plan.seq_splits)
    assert plan.partials_shape == (64, 32, 1, plan.splits, 128) and plan.ml_shape == (2, 64, 32, 1, plan.splits)


def test_launches_follow_the_plan(monkeypatch):
    """ops launches exactly what the plan lists: each kernel with the plan's grid and arguments."""
    from prefix_kernels import ops

    seen = {}

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen[self.name] = (grid, kwargs)
            return launch

    for name in ("prefix_attention_fwd_kernel", "backward_prologue_kernel", "backward_kernel",
                 "backward_epilogue_kernel"):
        monkeypatch.setattr(ops, name, Recorder(name))
    q = torch.empty(2, 4, 8, 16, dtype=torch.bfloat16)
    k = v = torch.empty(2, 2, 8, 16, dtype=torch.bfloat16)
    pk = pv = torch.empty(1, 2, 3, 16, dtype=torch.bfloat16)
    out, lse = ops.prefix_attention_forward(q, k, v, pk, pv, None, None, True, 0.25, device=SM90)
    ops.prefix_attention_backward(out, q, k, v, pk, pv, out, lse, None, None, True, 0.25, need_dq=True,
                                  need_dkdv=True, need_dprefix=True, deterministic=False, device=SM90)
    prob = Problem(batch=2, n_heads=4, n_kv_heads=2, n_queries=8, n_keys=8, n_prefix=3, n_prefixes=1, head_dim=16,
                   head_dim_v=16, dtype=torch.bfloat16, has_mask=False, has_ids=False, scale=0.25,
                   terms=ScoreTerms(causal=True))
    fwd, bwd = plan_forward(prob, SM90), plan_backward(prob, ALL, SM90)
    for name, launch in (("prefix_attention_fwd_kernel", fwd.forward), ("backward_prologue_kernel", bwd.prologue),
                         ("backward_kernel", bwd.main), ("backward_epilogue_kernel", bwd.epilogue)):
        grid, kwargs = seen[name]
        assert grid == launch.grid
        assert {k: kwargs[k] for k in launch.args} == dict(launch.args)
        assert {k: kwargs[k] for k in launch.options} == dict(launch.options) == dict(num_warps=kwargs["num_warps"],
                                                                                    num_stages=kwargs["num_stages"])
