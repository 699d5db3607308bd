"""torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 train the prefixes as one process would.

All the checks are one launch of tests/distributed_worker.py on two ranks, with torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free MASTER_PORT); every rank takes half of
a fixed padded batch. Compared with one process on the whole batch (``distributed_worker.reference``):

- DDP: gradients of every trainable parameter (one prefix; a bank of 3 with per-row ``prefix_ids``,
  where two of the prefixes are used on one rank only; the MLP reparameterization; bank + MLP) under
  both loss conventions (mean of the per-rank means, DDP's default; the whole batch's token mean via
  ``num_items_in_batch``), then 3 AdamW steps: bit-identical on both ranks and equal to one process.
- FSDP2 (``fully_shard``, CPU + gloo): the same, with the frozen base sharded layer by layer and the
  prefixes either sharded with the root or kept whole outside FSDP (gradients all-reduced by hand);
  FSDP1 (``FullyShardedDataParallel(use_orig_params=True)``) likewise. Under FSDP also: the frozen
  base really is split between the ranks; rank 0's ``save_prefix`` writes the trained prefix (FSDP2
  inside ``unshard()``, FSDP1 inside ``summon_full_params()``, prefixes outside FSDP directly);
  ``save_prefix``, ``save_peft_adapter`` and ``load_prefix`` on sharded prefixes raise on every rank
  and write or change nothing; ``generate()`` registered with ``register_fsdp_forward_method``
  decodes as one process (FSDP2).

A rank that fails or hangs fails the test with both ranks' logs (gloo collectives time out after
60 s, each worker dumps its stack and exits after 150 s, the launch is killed after 240 s).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import torch.distributed as dist  # noqa: E402

if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)
if not dist.is_gloo_available():
    pytest.skip("torch.distributed has no gloo backend in this torch build", allow_module_level=True)

import distributed_worker as worker  # noqa: E402

WORLD = 2
LAUNCH_TIMEOUT_S = 240  # both ranks, start to finish (about 10-15 s here)
GRACE_S = 5  # after one rank fails, how long the other may take to notice before it is killed
HERE = Path(__file__).resolve().parent
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
TRAINED_TOL = dict(rtol=1e-5, atol=2e-5)  # AdamW divides by sqrt(v): small gradients' rounding shows more


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return text if len(text) <= chars else "..." + text[-chars:]


def _env(rank: int, port: int) -> dict:
    env = dict(os.environ)
    paths = [str(HERE.parent), str(HERE)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS="1",  # two ranks on a few cores
               CUDA_VISIBLE_DEVICES="",  # the CPU/gloo path, also on a machine with a GPU
               PYTHONPATH=os.pathsep.join(paths))
    if sys.platform.startswith("linux") and Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # both ranks on this machine: stay on loopback
    return env


def _run_ranks(group: str, out_dir: Path, port: int) -> tuple[bool, str]:
    """Runs both ranks; (all exited 0, a report of exit codes and log tails)."""
    procs, logs = [], []
    for stale in out_dir.glob("rank*.pt"):
        stale.unlink()
    try:
        for rank in range(WORLD):
            log = out_dir / f"rank{rank}.log"
            logs.append(log)
            with open(log, "wb") as handle:
                command = [sys.executable, str(HERE / "distributed_worker.py"), group, str(out_dir)]
                procs.append(subprocess.Popen(command, env=_env(rank, port), stdout=handle, stderr=subprocess.STDOUT,
                                              cwd=str(HERE.parent)))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        failed_at = None
        why = ""
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if failed_at is not None and now - failed_at > GRACE_S:
                why = f"a rank failed; the others were killed {GRACE_S} s later"
                break
            if now > deadline:
                why = f"timed out after {LAUNCH_TIMEOUT_S} s; killed"
                break
            time.sleep(0.1)
    finally:
        alive = [p for p in procs if p.poll() is None]
        if alive and hasattr(signal, "SIGUSR1"):
            for p in alive:
                p.send_signal(signal.SIGUSR1)  # the worker prints its stack (faulthandler): where it hangs
            time.sleep(1)
        for p in alive:
            p.kill()
            p.wait()
    ok = not why and all(p.returncode == 0 for p in procs)
    report = [f"group {group!r}, MASTER_PORT={port}: {why or ('ok' if ok else 'a rank failed')}"]
    for rank, (p, log) in enumerate(zip(procs, logs)):
        report.append(f"---- rank {rank}: exit code {p.returncode}, log {log} ----\n{_tail(log)}")
    return ok, "\n".join(report)


def launch(group: str, out_dir: Path) -> tuple[list[dict], str | None, Path]:
    """Both ranks' results of ``group`` (a list indexed by rank; what finished, if a rank failed),
    None or the failure report with both ranks' logs, and ``out_dir`` (what the ranks wrote)."""
    from prefix_kernels import cpu

    cpu.is_available()  # build the C++ op here, once, not in both ranks at the same time
    for attempt in range(2):
        port = _free_port()
        ok, report = _run_ranks(group, out_dir, port)
        if ok or attempt or "address already in use" not in report.lower():  # retry only a port taken meanwhile
            break
    results = []
    for rank in range(WORLD):
        path = out_dir / f"rank{rank}.pt"
        saved = torch.load(path, weights_only=False) if path.exists() else {"results": {}}
        results.append(saved["results"])
        if ok:
            assert (saved["rank"], saved["world"], saved["group"]) == (rank, WORLD, group), path
    return results, None if ok else report, out_dir


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch of every check (DDP and FSDP): (per-rank results, failure report or None, directory)."""
    return launch("all", tmp_path_factory.mktemp("distributed"))


@contextlib.contextmanager
def one_thread():
    """As the ranks run (tiny shapes; also far faster than two OpenMP threads on busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    """config -> one process's results on the whole batch."""
    with one_thread():
        return {config: worker.reference(config, WORLD) for config in worker.CONFIGS}


def _runs(launched, mode: str, config: str) -> list[dict]:
    """Every rank's results of one run; fails with the logs when a rank did not get that far."""
    ranks, report, _ = launched
    if any((mode, config) not in r for r in ranks):
        why = f"{report.splitlines()[0]} (both ranks' logs: test_both_ranks_finish)" if report else "not run"
        pytest.fail(f"no results for {mode}/{config}: {why}", pytrace=False)
    runs = [r[(mode, config)] for r in ranks]
    if "skipped" in runs[0]:
        pytest.skip(runs[0]["skipped"])
    return runs


CASES = [pytest.param(mode, config, id=f"{mode}-{config}") for mode, config in worker.GROUPS["all"]]


def test_both_ranks_finish(launched):
    report = launched[1]
    if report is not None:
        pytest.fail(report, pytrace=False)


def _assert_close(actual: dict, expected: dict, what: str, **tol):
    assert actual.keys() == expected.keys(), f"{what}: parameters {sorted(actual)} != {sorted(expected)}"
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], **tol, msg=lambda m, n=name: f"{what}, {n}: {m}")


@pytest.mark.parametrize("mode, config", CASES)
def test_gradients_equal_one_process_on_the_whole_batch(launched, reference, mode, config):
    ranks = _runs(launched, mode, config)
    expected = reference[config]
    for convention in ("grad_mean", "grad_token"):
        for rank, result in enumerate(ranks):
            _assert_close(result[convention], expected[convention], f"{mode}/{config} rank {rank} {convention}",
                          **GRAD_TOL)
        assert all(g.abs().max() > 0 for g in expected[convention].values())
    # the ranks hold different numbers of tokens (13, 15), so the two conventions differ: each is checked
    name = next(iter(expected["grad_mean"]))
    assert not torch.allclose(expected["grad_mean"][name], expected["grad_token"][name], rtol=1e-3, atol=0)


@pytest.mark.parametrize("mode, config", CASES)
def test_optimizer_steps_keep_ranks_identical_and_match_one_process(launched, reference, mode, config):
    ranks = _runs(launched, mode, config)
    for name, value in ranks[0]["trained"].items():
        for rank in range(1, WORLD):
            assert torch.equal(ranks[rank]["trained"][name], value), f"{mode}/{config}: {name} differs between ranks"
    _assert_close(ranks[0]["trained"], reference[config]["trained"], f"{mode}/{config} after {worker.STEPS} steps",
                  **TRAINED_TOL)
    initial = reference[config]["initial"]
    assert all(not torch.equal(ranks[0]["trained"][n], p) for n, p in initial.items()), "nothing trained"


@pytest.mark.parametrize("mode, config", CASES)
def test_what_each_rank_holds(launched, mode, config):
    """DDP: everything whole on every rank. FSDP: the frozen base split between the ranks; the
    prefixes split too (``fsdp``, ``fsdp1``) or whole on every rank (``fsdp_replicated``)."""
    ranks = _runs(launched, mode, config)
    total = ranks[0]["base_numel"][1]
    held = [r["base_numel"][0] for r in ranks]
    if mode == "ddp":
        assert held == [total] * WORLD, f"base: ranks hold {held} of {total}"
    else:
        assert sum(held) == total and max(held) < total, f"base not sharded: ranks hold {held} of {total}"
    for name, value in ranks[0]["trained"].items():
        numel = value.numel()
        held = [r["local_prefix_numel"][name] for r in ranks]
        if mode in ("fsdp", "fsdp1"):  # each element on one rank (FSDP2: dim 0, so a bank of one is all on rank 0)
            assert sum(held) == numel, f"{name}: ranks hold {held} of {numel}"
        else:
            assert held == [numel] * WORLD, f"{name}: ranks hold {held} of {numel}"


@pytest.mark.parametrize("config", list(worker.CONFIGS))
def test_fsdp_save_from_unshard_and_generate(launched, config):
    """Under FSDP2, ``save_prefix`` on rank 0 inside ``unshard()`` writes the trained prefixes, and
    ``generate()`` registered with ``register_fsdp_forward_method`` decodes as one process with them."""
    ranks = _runs(launched, "fsdp", config)
    saved = launched[2] / f"prefix_fsdp_{config}"
    one = worker.build(config).load_prefix(saved)
    _assert_close(worker.trainable(one), ranks[0]["trained"], f"fsdp/{config} saved prefix", rtol=0, atol=0)
    with one_thread():
        expected = one.generate(**worker.generation_inputs(config), **worker.GENERATE)
    for rank, result in enumerate(ranks):
        assert torch.equal(result["generated"], expected), f"rank {rank}: {result['generated']} != {expected}"


SAVED_CASES = [pytest.param(mode, config, id=f"{mode}-{config}") for mode, config in worker.GROUPS["all"]
               if mode in ("fsdp1", "fsdp_replicated")]
SHARDED_CASES = [pytest.param(mode, config, id=f"{mode}-{config}") for mode, config in worker.GROUPS["all"]
                 if mode in ("fsdp", "fsdp1")]


@pytest.mark.parametrize("mode, config", SAVED_CASES)
def test_save_from_rank_0(launched, mode, config):
    """FSDP1: ``save_prefix`` on rank 0 inside ``summon_full_params()``; prefixes kept whole outside
    FSDP2: ``save_prefix`` on rank 0 as is. Both write the trained prefixes."""
    ranks = _runs(launched, mode, config)
    one = worker.build(config).load_prefix(launched[2] / f"prefix_{mode}_{config}")
    _assert_close(worker.trainable(one), ranks[0]["trained"], f"{mode}/{config} saved prefix", rtol=0, atol=0)


@pytest.mark.parametrize("mode, config", SHARDED_CASES)
def test_saving_or_loading_a_sharded_prefix_raises_and_touches_nothing(launched, mode, config):
    """On every rank, ``save_prefix`` / ``save_peft_adapter`` while the prefixes are sharded (FSDP2:
    DTensors; FSDP1: views of the rank's flat shard) raise a RuntimeError naming the parameter and
    what to do instead, and create nothing; ``load_prefix`` raises likewise and changes nothing."""
    ranks = _runs(launched, mode, config)
    first = next(iter(ranks[0]["trained"]))  # the first parameter checked: prefix_embedding / prefix_encoder.embedding
    what = "DTensor" if mode == "fsdp" else "summon_full_params()?"
    for rank, result in enumerate(ranks):
        errors = {**result["sharded_save"], **result["sharded_load"]}
        assert set(errors) == {"save_prefix", "save_peft_adapter", "load_prefix"}
        for call, error in errors.items():
            assert error is not None, f"rank {rank}: {call} on sharded prefixes did not raise"
            kind, message = error
            assert kind == "RuntimeError", f"rank {rank}: {call} raised {kind}: {message}"
            assert message.startswith(f"{call}: parameter {first!r}") and what in message, message
            hints = ("unshard()", "summon_full_params(module)", "full_tensor()") if call.startswith("save") else \
                ("before fully_shard()",)
            assert all(h in message for h in hints + ("torch.distributed.checkpoint",)), message
        target = worker.sharded_target(mode, config, rank, launched[2])
        assert not target.exists(), f"rank {rank}: a failed save created {sorted(target.rglob('*'))}"
        assert result["sharded_load_unchanged"], f"rank {rank}: a failed load_prefix changed the prefix"
