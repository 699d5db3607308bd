"""One rank of the torch.distributed checks in tests/test_distributed.py (CPU, gloo).

Run by the test (two subprocesses with torchrun's environment), or by hand::

    torchrun --nproc-per-node 2 tests/distributed_worker.py all /tmp/out    # or: ddp, fsdp

Each rank trains the tiny Llama's prefixes on its half of a fixed padded batch, for each prefix
configuration (one prefix, a bank with per-row ``prefix_ids``, the MLP reparameterization, both)
and each wrapping: ``ddp`` (DistributedDataParallel), ``fsdp`` (FSDP2 ``fully_shard`` on every
frozen decoder layer and on the root -- embeddings, head and the prefixes), ``fsdp_replicated``
(only the base model sharded; the prefixes stay whole on every rank, their gradients all-reduced by
hand), ``fsdp1`` (FullyShardedDataParallel, ``use_orig_params=True``, a unit per decoder layer).
It writes ``OUT/rank{r}.pt`` (after every run, so a later failure keeps what finished): full
(unsharded) gradients and the parameters after a few AdamW steps; under the FSDP wrappings also
the prefix saved by rank 0 (``OUT/prefix_{mode}_{config}``: inside ``unshard()`` for ``fsdp``,
``summon_full_params()`` for ``fsdp1``, directly for ``fsdp_replicated``), what ``save_prefix`` /
``save_peft_adapter`` / ``load_prefix`` raise on each rank while the prefixes are sharded, and,
under ``fsdp``, greedy ``generate()`` tokens. :func:`reference` computes the same quantities in one
process on the whole batch; the test compares the two.

Two loss conventions, both checked:

- ``grad_mean``: every rank's loss is HF's mean over its own tokens and DDP/FSDP average the
  gradients, so the step follows the *mean of the per-rank means* (not the whole batch's token mean
  when ranks hold different numbers of tokens).
- ``grad_token``: the whole batch's token mean, as one process would get: each rank passes
  ``num_items_in_batch`` = the global token count (all-reduced) and multiplies its loss by the world
  size to undo the gradient averaging (what ``Trainer(average_tokens_across_devices=True)`` does).
"""

from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import signal
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for path in (str(HERE), str(HERE.parent)):  # tiny_models, prefix_kernels
    if path not in sys.path:
        sys.path.insert(0, path)

from tiny_models import padded_batch, tiny_model  # noqa: E402

from prefix_kernels import add_prefix_tuning  # noqa: E402

P = 4
BATCH = 4  # rows: unpadded, right-padded, left-padded, unpadded (padded_batch); rank r takes rows 2r, 2r+1
CONFIGS = {
    "plain": {},
    "bank": {"num_prefixes": 3},
    "mlp": {"projection_hidden": 16},
    "mlp_bank": {"projection_hidden": 16, "num_prefixes": 3},
}
PREFIX_IDS = [0, 2, 1, 2]  # prefix 0 only in rank 0's rows, prefix 1 only in rank 1's, prefix 2 in both
STEPS = 3
LR = 1e-2
# (wrapping, prefix configuration) pairs, run one after the other in one process group
DDP_RUNS = [("ddp", config) for config in CONFIGS]
FSDP_RUNS = ([("fsdp", config) for config in CONFIGS] + [("fsdp_replicated", "plain"), ("fsdp_replicated", "mlp_bank")]
             + [("fsdp1", "plain"), ("fsdp1", "mlp_bank")])
GROUPS = {"ddp": DDP_RUNS, "fsdp": FSDP_RUNS, "all": DDP_RUNS + FSDP_RUNS}
TIMEOUT_S = 60  # gloo: any collective (and the rendezvous) fails after this instead of hanging
WATCHDOG_S = int(os.environ.get("PREFIX_KERNELS_DIST_WATCHDOG_S", "150"))  # whole-process limit


# ---- shared with the single-process reference --------------------------------------------------
def build(config: str):
    """The wrapped tiny Llama on CPU; same weights and prefix initialization in every process."""
    model = tiny_model("llama", seed=0).cpu()
    torch.manual_seed(1)
    return add_prefix_tuning(model, P, **CONFIGS[config]).train()


def whole_batch(config: str):
    """(model inputs, labels) of the whole batch; ``prefix_ids`` for a bank."""
    ids, mask = padded_batch(batch=BATCH, length=9, seed=1)
    ids, mask = ids.cpu(), mask.cpu()
    inputs = {"input_ids": ids, "attention_mask": mask}
    if CONFIGS[config].get("num_prefixes", 1) > 1:
        inputs["prefix_ids"] = torch.tensor(PREFIX_IDS)
    return inputs, ids.masked_fill(mask == 0, -100)


def rows(rank: int, world: int) -> slice:
    per = BATCH // world
    return slice(rank * per, (rank + 1) * per)


def causal_lm_loss(logits, labels):
    """transformers' causal LM loss (shift by one, ignore -100, mean over the remaining tokens)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def trainable(model) -> dict:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of ``t`` (gathered when it is an FSDP2 DTensor shard)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def whole(**kwargs):
    """The parameters are whole already (one process, DDP; FSDP2 gathers DTensors in :func:`full`)."""
    return contextlib.nullcontext()


def gradients(model, loss_fn, after_backward=lambda: None, gathered=whole) -> dict:
    """Full gradients of the trainable parameters for one backward of ``loss_fn()``; ``gathered()``
    is the context in which the parameters are whole (FSDP1's ``summon_full_params``)."""
    for p in trainable(model).values():
        p.grad = None
    loss_fn().backward()
    after_backward()
    with gathered(with_grads=True):
        grads = {name: full(p.grad) for name, p in trainable(model).items()}
    for p in trainable(model).values():
        p.grad = None
    return grads


def reference(config: str, world: int = 2) -> dict:
    """One process, the whole batch: the gradients and trained parameters the ranks must reproduce."""
    model = build(config)
    inputs, labels = whole_batch(config)
    params = trainable(model)
    initial = {name: full(p) for name, p in params.items()}

    def mean_of_rank_means():  # one forward over the whole batch; the loss DDP's averaging optimizes
        logits = model(**inputs).logits
        return sum(causal_lm_loss(logits[rows(r, world)], labels[rows(r, world)]) for r in range(world)) / world

    out = {
        "grad_mean": gradients(model, mean_of_rank_means),
        "grad_token": gradients(model, lambda: model(**inputs, labels=labels).loss),
    }
    optimizer = torch.optim.AdamW(params.values(), lr=LR)
    for _ in range(STEPS):
        optimizer.zero_grad()
        mean_of_rank_means().backward()
        optimizer.step()
    out["trained"] = {name: full(p) for name, p in params.items()}
    out["initial"] = initial
    return out


# ---- one rank ------------------------------------------------------------------------------------
def fully_shard_fn():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 / 2.5
    return fully_shard


def wrap(mode: str, model):
    """(the module to call, a hook to run after each backward, the context in which the parameters
    are whole) for one wrapping ``mode``."""
    import torch.distributed as dist

    after_backward = lambda: None  # noqa: E731
    gathered = whole
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model), after_backward, gathered
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        # one flat parameter per decoder layer, one for the rest (frozen embeddings, head + trainable
        # prefixes: mixing them needs use_orig_params=True)
        policy = ModuleWrapPolicy({type(model.base_model.model.layers[0])})
        module = FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True,
                                          device_id=torch.device("cpu"))
        return module, after_backward, lambda **kw: FullyShardedDataParallel.summon_full_params(module, **kw)
    fully_shard = fully_shard_fn()
    for layer in model.base_model.model.layers:  # frozen decoder layers: one all-gather each
        fully_shard(layer)
    if mode == "fsdp":
        fully_shard(model)  # root group: embeddings, norm, head (frozen) and the prefixes (trainable)
    elif mode == "fsdp_replicated":
        fully_shard(model.base_model)  # the prefixes stay whole, outside FSDP: average their gradients
        world = dist.get_world_size()

        def after_backward():
            for p in trainable(model).values():
                dist.all_reduce(p.grad)
                p.grad /= world
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return model, after_backward, gathered


def held_numel(params) -> int:
    """Elements of ``params`` this rank holds (a DTensor's local shard; FSDP1's views of its shard)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)


def generation_inputs(config: str) -> dict:
    """Rows 0 (unpadded) and 2 (left-padded) of the batch, for greedy decoding."""
    inputs, _ = whole_batch(config)
    return {k: v[[0, 2]] for k, v in inputs.items()}


GENERATE = {"max_new_tokens": 4, "do_sample": False}


def sharded_target(mode: str, config: str, rank: int, out_dir: Path) -> Path:
    """Where a rank tries to save while the prefixes are sharded (nothing may appear there)."""
    return out_dir / f"sharded_{mode}_{config}_rank{rank}"


def attempts(calls: dict) -> dict:
    """name -> None, or (exception type, message) of what ``call()`` raised."""
    errors = {}
    for name, call in calls.items():
        try:
            call()
            errors[name] = None
        except Exception as error:  # noqa: BLE001 -- recorded; the test checks type and message
            errors[name] = (type(error).__name__, str(error))
    return errors


def local_values(model) -> dict:
    """This rank's own values of the trainable parameters (a DTensor's shard, FSDP1's view)."""
    return {name: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
            for name, p in trainable(model).items()}


def save_checks(mode: str, model, gathered, config: str, rank: int, out_dir: Path) -> dict:
    """FSDP: every rank tries to save while the prefixes are sharded (``fsdp``: DTensors; ``fsdp1``:
    views of its flat shard), which must raise; then rank 0 saves the whole prefix to
    ``OUT/prefix_{mode}_{config}`` -- inside ``unshard()`` (FSDP2), inside ``summon_full_params()``
    (FSDP1), or directly when the prefixes stay outside FSDP (``fsdp_replicated``); then every rank
    tries to load that save into the sharded prefixes, which must raise and change nothing."""
    import torch.distributed as dist

    sharded = mode in ("fsdp", "fsdp1")
    out = {}
    if sharded:
        target = sharded_target(mode, config, rank, out_dir)
        out["sharded_save"] = attempts({"save_prefix": lambda: model.save_prefix(target),
                                        "save_peft_adapter": lambda: model.save_peft_adapter(target)})
    saved = out_dir / f"prefix_{mode}_{config}"
    if mode == "fsdp":
        model.unshard()  # every rank: the root group (embeddings, head, prefixes) all-gathered
        if rank == 0:
            model.save_prefix(saved)
        model.reshard()
    elif mode == "fsdp1":
        with gathered():  # every rank
            if rank == 0:
                model.save_prefix(saved)
    elif rank == 0:
        model.save_prefix(saved)
    dist.barrier()  # the save is complete before any rank reads it
    if sharded:
        before = local_values(model)
        out["sharded_load"] = attempts({"load_prefix": lambda: model.load_prefix(saved)})
        after = local_values(model)
        out["sharded_load_unchanged"] = all(torch.equal(before[n], after[n]) for n in before)
    return out


def fsdp_generate(model, config: str) -> torch.Tensor:
    """FSDP2: ``generate()``, registered as an FSDP forward method so that it gathers the root's
    parameters, decodes on every rank."""
    try:
        from torch.distributed.fsdp import register_fsdp_forward_method  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import register_fsdp_forward_method

    register_fsdp_forward_method(model, "generate")
    return model.generate(**generation_inputs(config), **GENERATE)


def run_config(mode: str, config: str, rank: int, world: int, out_dir: Path) -> dict:
    import torch.distributed as dist

    model = build(config)
    base_numel = sum(p.numel() for p in model.base_model.parameters())
    module, after_backward, gathered = wrap(mode, model)
    inputs, labels = whole_batch(config)
    mine = rows(rank, world)
    inputs = {k: v[mine] for k, v in inputs.items()}
    labels = labels[mine]
    items = (labels[:, 1:] != -100).sum()  # the loss's token count on this rank ...
    dist.all_reduce(items)  # ... and over all ranks

    def local_mean():
        return module(**inputs, labels=labels).loss

    def global_token_mean():
        return module(**inputs, labels=labels, num_items_in_batch=items).loss * world

    out = {
        "grad_mean": gradients(model, local_mean, after_backward, gathered),
        "grad_token": gradients(model, global_token_mean, after_backward, gathered),
    }
    optimizer = torch.optim.AdamW(trainable(model).values(), lr=LR)  # after sharding: holds the shards
    for _ in range(STEPS):
        optimizer.zero_grad()
        local_mean().backward()
        after_backward()
        optimizer.step()
    with gathered():
        out["trained"] = {name: full(p) for name, p in trainable(model).items()}
    out["base_numel"] = (held_numel(model.base_model.parameters()), base_numel)
    out["local_prefix_numel"] = {name: held_numel([p]) for name, p in trainable(model).items()}
    if mode != "ddp":
        out.update(save_checks(mode, model, gathered, config, rank, out_dir))
    if mode == "fsdp":
        out["generated"] = fsdp_generate(model, config)
    return out


def main(argv: list[str]) -> int:
    import torch.distributed as dist

    if len(argv) != 3 or argv[1] not in GROUPS:
        print(f"usage: {argv[0]} {{{','.join(GROUPS)}}} OUT_DIR (with torchrun's RANK, WORLD_SIZE, MASTER_ADDR, "
              "MASTER_PORT)", file=sys.stderr)
        return 2
    group, out_dir = argv[1], Path(argv[2])
    faulthandler.enable()
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)  # a hung rank prints where it hangs, then exits
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher asks before it kills a rank
    torch.set_num_threads(1)
    out_dir.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if BATCH % world:
            raise ValueError(f"the batch of {BATCH} rows does not split over {world} ranks")
        try:
            fully_shard_fn()
            no_fsdp = None
        except ImportError as error:
            no_fsdp = f"no FSDP2 fully_shard in torch {torch.__version__}: {error}"
        results = {}
        for mode, config in GROUPS[group]:
            if mode in ("fsdp", "fsdp_replicated") and no_fsdp:
                results[(mode, config)] = {"skipped": no_fsdp}
            else:
                results[(mode, config)] = run_config(mode, config, rank, world, out_dir)
            # saved after every run: what finished survives a later failure
            tmp = out_dir / f"rank{rank}.pt.tmp"
            torch.save({"rank": rank, "world": world, "group": group, "results": results}, tmp)
            os.replace(tmp, out_dir / f"rank{rank}.pt")
        dist.barrier()  # no rank leaves (and tears the group down) while another still needs it
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
