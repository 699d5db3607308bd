"""Saving and loading the prefixes of a :class:`~prefix_kernels.hf.model.PrefixTuningModel`.

Two formats, both safetensors (never pickle) plus a JSON config:

- ours, :func:`save_prefix` / :func:`load_prefix`: ``prefix_tuning.safetensors`` holds the wrapper's
  trainable tensors under their state_dict names (``prefix_embedding``, or ``prefix_encoder.embedding``
  and ``prefix_encoder.transform.{0,2}.{weight,bias}``; the ``trainable_modules``' tensors as
  ``base_model.<module path>.<name>``), never the frozen base weights; ``prefix_tuning_config.json``
  holds ``spec.to_dict()``, a ``format_version`` and the ``trainable_modules`` (absent: none).
- PEFT's, :func:`save_peft_adapter` / :func:`load_peft_adapter` / :func:`peft_adapter_size` (which
  :func:`~prefix_kernels.hf.model.from_peft_adapter` sizes a wrapper from): a directory
  that ``peft.PeftModel.from_pretrained`` loads (``adapter_config.json`` and ``adapter_model.safetensors``
  with ``prompt_embeddings`` [P, L * 2 * Hkv * D], and the ``modules_to_save`` weights under PEFT's
  names ``base_model.<module path>.<name>``), one row of the prefix bank; a prefix-tuning
  (``PREFIX_TUNING``) or a Cartridges (``CARTRIDGE``, whose first ``num_frozen_tokens`` tokens are
  not trained) adapter. PEFT is not needed to write or read it.

Saving writes a weights file and its config as a pair: after a failure at any point (an exception,
or a crash) the directory holds either the previous pair or the new one, never a mix, and the
files the user keeps there (metrics, plots, optimizer state) are left alone; see :func:`_save_pair`.

Loading validates everything (config fields, tensor names, shapes, dtypes) before it copies
anything, so a failed load leaves the model unchanged. Mismatches raise ValueError naming the file,
the field, the saved value and the model's value; a missing file raises FileNotFoundError.

Sharded prefixes. Saving and loading need the whole prefix parameters. Under FSDP2 ``fully_shard``
they are DTensor shards and under FSDP1 (``use_orig_params=True``) flattened views of this rank's
shard; every saver and loader here checks this first and raises RuntimeError naming the parameter
(nothing written or copied). Save from rank 0 inside ``unshard()`` (FSDP2) or
``summon_full_params()`` (FSDP1), or write a sharded checkpoint with torch.distributed.checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from prefix_kernels.hf.spec import PrefixSpec

PREFIX_WEIGHTS = "prefix_tuning.safetensors"
PREFIX_CONFIG = "prefix_tuning_config.json"
FORMAT_VERSION = 1

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLE_WEIGHTS = "adapter_model.bin"
PEFT_CONFIG = "adapter_config.json"
PEFT_KEY = "prompt_embeddings"  # the only tensor PEFT 0.21 saves for prefix tuning (BasePromptEncoder)
PEFT_TYPE = "PREFIX_TUNING"
CARTRIDGE_TYPE = "CARTRIDGE"
PEFT_TYPES = (PEFT_TYPE, CARTRIDGE_TYPE)


# ---- our format -----------------------------------------------------------------------------------
def prefix_tensors(wrapper) -> dict[str, torch.nn.Parameter]:
    """The wrapper's own parameters by state_dict name (what :func:`save_prefix` writes): the
    trainable ones and the frozen prefix tokens, never the base model's."""
    if wrapper.prefix_encoder is not None:
        return {f"prefix_encoder.{name}": p for name, p in wrapper.prefix_encoder.named_parameters()}
    if wrapper.frozen_prefix is not None:
        return {"frozen_prefix": wrapper.frozen_prefix, "prefix_embedding": wrapper.prefix_embedding}
    return {"prefix_embedding": wrapper.prefix_embedding}


def module_tensors(wrapper) -> dict[str, torch.Tensor]:
    """The tensors (parameters and persistent buffers) of the wrapper's ``trainable_modules`` by
    their state_dict names in the wrapper, ``base_model.<module path>.<name>``: the names PEFT gives
    ``modules_to_save`` weights in its adapter files, too."""
    model = wrapper.base_model
    return {f"base_model.{path}.{name}": t for path in wrapper.trainable_modules
            for name, t in model.get_submodule(path).state_dict(keep_vars=True).items()}


def expected_shapes(spec: PrefixSpec) -> dict[str, tuple[int, ...]]:
    """The shape of each of :func:`prefix_tensors` for a wrapper of ``spec`` (whole, not sharded)."""
    table = (spec.num_prefixes, spec.num_virtual_tokens)
    if spec.projection_hidden is None:
        k = spec.num_frozen_tokens
        if k:
            return {"frozen_prefix": (spec.num_prefixes, k, spec.width),
                    "prefix_embedding": (spec.num_prefixes, spec.num_virtual_tokens - k, spec.width)}
        return {"prefix_embedding": (*table, spec.width)}
    token_dim, hidden = spec.num_kv_heads * spec.head_dim, spec.projection_hidden
    return {"prefix_encoder.embedding": (*table, token_dim),
            "prefix_encoder.transform.0.weight": (hidden, token_dim), "prefix_encoder.transform.0.bias": (hidden,),
            "prefix_encoder.transform.2.weight": (spec.width, hidden), "prefix_encoder.transform.2.bias": (spec.width,)}


def save_prefix(wrapper, directory) -> None:
    """Writes ``prefix_tuning.safetensors`` and ``prefix_tuning_config.json`` into ``directory``: the
    prefix and the weights of the wrapper's ``trainable_modules`` (listed in the config).

    Raises RuntimeError (and writes nothing) when the prefixes are sharded (FSDP2/FSDP1): save from
    rank 0 inside ``unshard()`` / ``summon_full_params()``, see the module docstring."""
    params = {**_whole_tensors(wrapper, "save_prefix"), **module_tensors(wrapper)}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in params.items()}
    config = {"format_version": FORMAT_VERSION, **wrapper.spec.to_dict()}
    if wrapper.trainable_modules:  # absent: none (files without it load as before)
        config["trainable_modules"] = list(wrapper.trainable_modules)
    _save_pair(directory, {PREFIX_WEIGHTS: lambda path: _write_safetensors(path, tensors),
                           PREFIX_CONFIG: lambda path: _write_json(path, config)})


def load_prefix(wrapper, directory) -> None:
    """Loads what :func:`save_prefix` wrote into a wrapper built with the same settings (the same
    ``trainable_modules`` included)."""
    directory = Path(directory)
    config_path, weights_path = _pair_file(directory, PREFIX_CONFIG), _pair_file(directory, PREFIX_WEIGHTS)
    params = {**_whole_tensors(wrapper, "load_prefix"), **module_tensors(wrapper)}
    config = _read_json(config_path, "save_prefix() writes it")
    _check_prefix_config(config_path, config, wrapper.spec, wrapper.trainable_modules)
    tensors = _read_safetensors(weights_path, "save_prefix() writes it")
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{weights_path}: tensor names differ from this model's trainable parameters: "
                         f"missing {missing}, unexpected {unexpected} (the model expects {sorted(params)})")
    for name, p in params.items():
        _check_tensor(weights_path, name, tensors[name], tuple(p.shape))
    _copy(params, tensors)


def _copy(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.dtype))


_ADDED_FIELDS = {"layer_shapes": None, "num_frozen_tokens": 0, "placement": None}  # spec fields added after format_version 1


def _check_prefix_config(path: Path, config: dict, spec: PrefixSpec, modules: tuple[str, ...] = ()) -> None:
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version is {version!r} in the file, but this prefix_kernels reads "
                         f"format_version {FORMAT_VERSION}")
    ours = spec.to_dict()
    unknown = sorted(set(config) - set(ours) - {"format_version", "trainable_modules"})
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown} (written by another version of prefix_kernels?)")
    for field, value in ours.items():
        if field in _ADDED_FIELDS and value == _ADDED_FIELDS[field] and field not in config:
            continue  # written before the field existed, with the meaning of its default
        if field not in config:
            raise ValueError(f"{path}: field {field!r} is missing (this model has {field}={value!r})")
        _check_field(path, field, config[field], value,
                     hint="build the wrapper with the settings the checkpoint was saved with")
    _check_field(path, "trainable_modules", config.get("trainable_modules", []), list(modules),
                 hint="build the wrapper with add_prefix_tuning(..., trainable_modules=<the file's list>)")


# ---- PEFT's format --------------------------------------------------------------------------------
_HEAD_TASKS = (("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
               ("ForQuestionAnswering", "QUESTION_ANS"))
# what PEFT 0.21 adds to modules_to_save for these task types (PeftModelForSequenceClassification etc.)
_HEAD_MODULES = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                 "QUESTION_ANS": ("qa_outputs",)}


def head_task(head: str) -> str | None:
    """The PEFT task type of a model class named ``head`` that has a task head (SEQ_CLS, TOKEN_CLS,
    QUESTION_ANS), else None."""
    return next((task for suffix, task in _HEAD_TASKS if head.endswith(suffix)), None)


def head_modules(head: str) -> tuple[str, ...]:
    """The module names PEFT trains and saves with the prefix for a model class named ``head``
    (``modules_to_save``: the classifier / score / qa_outputs head); () for other models."""
    return _HEAD_MODULES.get(head_task(head), ())


def peft_task(spec: PrefixSpec, head: str = "") -> tuple[str, int]:
    """(PEFT task_type, num_transformer_submodules) of an adapter for a wrapper of ``spec`` around a
    model class named ``head``; a ValueError where PEFT has no adapter for the placement."""
    if spec.placement == "paper":
        raise ValueError("placement='paper' (a prefix in the encoder, the decoder and the cross-attention) has no "
                         "PEFT adapter: PEFT's SEQ_2_SEQ_LM prefix tuning is placement='peft'; use save_prefix")
    if spec.placement == "peft":
        return "SEQ_2_SEQ_LM", 2
    return head_task(head) or "CAUSAL_LM", 1


def peft_adapter_config(spec: PrefixSpec, base_model_name_or_path: str | None = None,
                        peft_type: str = PEFT_TYPE, head: str = "", modules_to_save=()) -> dict:
    """The ``adapter_config.json`` of a PEFT 0.21 ``PrefixTuningConfig`` (or, ``peft_type="CARTRIDGE"``,
    ``CartridgeConfig`` with the spec's ``num_frozen_tokens``) for a model of ``spec`` (inference mode,
    no projection: the exported table is already merged), saving ``modules_to_save`` with it."""
    modules_to_save = list(modules_to_save) or None
    token_dim = spec.num_kv_heads * spec.head_dim
    task_type, submodules = peft_task(spec, head)
    if peft_type == CARTRIDGE_TYPE:
        return {
            "auto_mapping": None,
            "base_model_name_or_path": base_model_name_or_path,
            "inference_mode": True,
            "modules_to_save": modules_to_save,
            "num_attention_heads": spec.num_kv_heads,
            "num_frozen_tokens": spec.num_frozen_tokens,
            "num_layers": spec.num_layers,
            "num_transformer_submodules": submodules,
            "num_virtual_tokens": spec.num_virtual_tokens,
            "peft_type": CARTRIDGE_TYPE,
            "revision": None,
            "task_type": task_type,
            "token_dim": token_dim,
        }
    if peft_type != PEFT_TYPE:
        raise ValueError(f"peft_type must be one of {PEFT_TYPES}, got {peft_type!r}")
    return {
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "encoder_hidden_size": token_dim,  # PEFT's default; unused without prefix_projection
        "inference_mode": True,
        "init_weights": None,
        "modules_to_save": modules_to_save,
        "num_attention_heads": spec.num_kv_heads,  # PEFT's num_attention_heads is the KV head count (GQA)
        "num_layers": spec.num_layers,
        "num_transformer_submodules": submodules,
        "num_virtual_tokens": spec.num_virtual_tokens,
        "peft_type": PEFT_TYPE,
        "prefix_projection": False,
        "revision": None,
        "task_type": task_type,
        "token_dim": token_dim,
    }


def save_peft_adapter(wrapper, directory, prefix_index: int = 0, peft_type: str | None = None) -> None:
    """Writes row ``prefix_index`` of the prefix table (through the MLP when reparameterized) as a PEFT
    adapter that ``peft.PeftModel.from_pretrained(base_model, directory)`` loads: ``peft_type``
    "PREFIX_TUNING" or "CARTRIDGE" (default: CARTRIDGE when the wrapper has frozen tokens). The
    ``trainable_modules`` go in as PEFT's ``modules_to_save``: listed in the config, their weights
    under PEFT's names ``base_model.<module path>.<name>``."""
    spec = wrapper.spec
    if peft_type is None:
        peft_type = CARTRIDGE_TYPE if spec.num_frozen_tokens else PEFT_TYPE
    head = type(wrapper.base_model).__name__
    peft_adapter_config(spec, None, peft_type, head)  # a bad peft_type or placement fails before anything is written
    if spec.position_offset != "peft":
        raise ValueError(f"position_offset={spec.position_offset!r} cannot be exported to PEFT: PEFT always places "
                         "the real tokens at positions P..P+N-1 (position_offset='peft'), so the adapter would "
                         "give different outputs")
    check_peft_layout(spec)
    _check_prefix_index(spec, prefix_index)
    _whole_tensors(wrapper, "save_peft_adapter")
    with torch.no_grad():
        table = wrapper.prefix_table()[prefix_index].detach().cpu().contiguous().clone()
    tensors = {PEFT_KEY: table, **{name: t.detach().cpu().contiguous() for name, t in module_tensors(wrapper).items()}}
    name_or_path = getattr(wrapper.base_model.config, "_name_or_path", None) or None
    config = peft_adapter_config(spec, name_or_path, peft_type, head, wrapper.trainable_modules)
    _save_pair(Path(directory), {PEFT_WEIGHTS: lambda path: _write_safetensors(path, tensors),
                                 PEFT_CONFIG: lambda path: _write_json(path, config)})


def load_peft_adapter(wrapper, directory, prefix_index: int = 0) -> None:
    """Copies a PEFT prefix-tuning adapter's ``prompt_embeddings`` into row ``prefix_index`` of
    ``wrapper.prefix_embedding`` (a reparameterized wrapper must be ``merge()``d first), and its
    ``modules_to_save`` weights into the wrapper's ``trainable_modules``, which must be the same
    modules (:func:`~prefix_kernels.hf.model.from_peft_adapter` builds the wrapper so)."""
    if wrapper.prefix_encoder is not None:
        raise ValueError("a PEFT adapter holds the prefix values themselves, which cannot be loaded into the "
                         f"projection MLP (projection_hidden={wrapper.spec.projection_hidden}): call merge() first")
    spec = wrapper.spec
    _check_prefix_index(spec, prefix_index)
    _whole_tensors(wrapper, "load_peft_adapter")
    config_path, config = _read_peft_config(directory)
    _check_peft_config(config_path, config, spec)
    table, modules = _read_peft_tensors(directory, wrapper, config)
    wrapper.set_prefix(prefix_index, table)
    _copy(module_tensors(wrapper), modules)


def peft_adapter_modules(directory) -> list[str]:
    """The adapter's ``modules_to_save`` (in order, without repeats; PEFT lists its defaults twice),
    [] when its weights file holds no module weights."""
    config_path, config = _read_peft_config(directory)
    names = config.get("modules_to_save") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{config_path}: modules_to_save is {names!r}, not a list of module names")
    if not names:
        return []
    return list(dict.fromkeys(names)) if set(_header_shapes(_peft_weights(directory))) - {PEFT_KEY} else []


def peft_adapter_size(directory, num_frozen_tokens: int | None = None) -> tuple[int, int]:
    """(num_virtual_tokens, num_frozen_tokens) of the PEFT adapter (prefix tuning or Cartridges) in
    ``directory``; ``num_frozen_tokens`` given must agree with a cartridge's (a prefix-tuning adapter
    takes any). The config's num_virtual_tokens is checked against the rows of the weights file's
    ``prompt_embeddings`` (read from its header, no tensor data), since a wrapper is sized from it."""
    config_path, adapter = _read_peft_config(directory)
    num_virtual_tokens = adapter.get("num_virtual_tokens")
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise ValueError(f"{config_path}: num_virtual_tokens is {num_virtual_tokens!r}, not a positive int")
    weights_path = _peft_weights(directory)
    shapes = _header_shapes(weights_path)
    if PEFT_KEY not in shapes:
        raise ValueError(f"{weights_path}: no tensor named {PEFT_KEY!r} (found {sorted(shapes)}); not a PEFT "
                         "prompt-learning adapter")
    shape = shapes[PEFT_KEY]
    if len(shape) != 2 or shape[0] != num_virtual_tokens:
        raise ValueError(f"{config_path}: num_virtual_tokens is {num_virtual_tokens} in the config, but {weights_path} "
                         f"holds {PEFT_KEY!r} of shape {shape}, expected ({num_virtual_tokens}, L * 2 * token_dim): "
                         "the config and the weights are not one adapter's")
    saved_frozen = adapter.get("num_frozen_tokens", 0) if adapter.get("peft_type") == CARTRIDGE_TYPE else 0
    if num_frozen_tokens is not None and adapter.get("peft_type") == CARTRIDGE_TYPE:
        _check_field(config_path, "num_frozen_tokens", saved_frozen, num_frozen_tokens,
                     hint="a cartridge keeps its own frozen tokens: leave num_frozen_tokens out")
    frozen = saved_frozen if num_frozen_tokens is None else num_frozen_tokens
    if isinstance(frozen, bool) or not isinstance(frozen, int) or not 0 <= frozen <= num_virtual_tokens:
        raise ValueError(f"{config_path}: num_frozen_tokens is {frozen!r}, not an int in [0, {num_virtual_tokens}]")
    return num_virtual_tokens, frozen


def _read_peft_config(directory) -> tuple[Path, dict]:
    path = _pair_file(Path(directory), PEFT_CONFIG)
    return path, _read_json(path, "a PEFT adapter directory holds it")


def _peft_weights(directory) -> Path:
    """The adapter's safetensors file; FileNotFoundError, or ValueError where PEFT wrote only a pickle."""
    directory = Path(directory)
    path = _pair_file(directory, PEFT_WEIGHTS)
    if not path.is_file() and (directory / PEFT_PICKLE_WEIGHTS).is_file():
        raise ValueError(f"{path}: not found, only the pickle file {directory / PEFT_PICKLE_WEIGHTS}, which is not "
                         "loaded (unsafe); re-save the adapter with safe_serialization=True")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a PEFT adapter directory holds it)")
    return path


def check_peft_layout(spec: PrefixSpec) -> None:
    if not spec.peft_layout:
        raise ValueError(f"model type {spec.model_type!r} has attention layers of different shapes (per layer "
                         f"(Hkv, Dk, Dv): {sorted(set(spec.shapes()))}), for which PEFT has no prefix layout: "
                         "use save_prefix / load_prefix")


def _check_peft_config(path: Path, config: dict, spec: PrefixSpec) -> None:
    check_peft_layout(spec)
    if spec.position_offset != "peft":
        raise ValueError(f"PEFT adapters assume position_offset='peft' (real tokens at P..P+N-1), but this model "
                         f"has position_offset={spec.position_offset!r}")
    task_type, submodules = peft_task(spec)
    saved_task = config.get("task_type")
    if saved_task is not None and (saved_task == "SEQ_2_SEQ_LM") != (task_type == "SEQ_2_SEQ_LM"):
        raise ValueError(f"{path}: task_type is {saved_task!r} in the file, but this model ({spec.model_type}) takes "
                         f"{task_type!r} adapters" + (" (placement='peft')" if spec.placement else ""))
    token_dim = spec.num_kv_heads * spec.head_dim
    required = {"peft_type": PEFT_TYPE, "num_virtual_tokens": spec.num_virtual_tokens,
                "num_layers": spec.num_layers, "token_dim": token_dim}
    for field, value in required.items():
        if config.get(field) is None:
            raise ValueError(f"{path}: field {field!r} is missing (this model needs {field}={value!r})")
    if config["peft_type"] not in PEFT_TYPES:
        raise ValueError(f"{path}: peft_type is {config['peft_type']!r} in the file; only {PEFT_TYPES} adapters "
                         "(prefix tuning, Cartridges) can be loaded")
    if config["peft_type"] == CARTRIDGE_TYPE:
        _check_field(path, "num_frozen_tokens", config.get("num_frozen_tokens", 0), spec.num_frozen_tokens,
                     hint="build the wrapper with the cartridge's num_frozen_tokens (or use from_peft_adapter)")
    _check_field(path, "num_virtual_tokens", config["num_virtual_tokens"], spec.num_virtual_tokens,
                 hint="build the wrapper with the adapter's num_virtual_tokens (or use from_peft_adapter)")
    _check_field(path, "num_layers", config["num_layers"], spec.num_layers, hint="the adapter is for another model")
    saved_dim = config["token_dim"]
    saved_width = spec.num_layers * 2 * saved_dim if type(saved_dim) is int else "?"
    _check_field(path, "token_dim", saved_dim, token_dim,
                 hint=f"token_dim is Hkv * head_dim: the adapter's prompt_embeddings width L * 2 * token_dim = "
                      f"{saved_width} differs from this model's {spec.width} (Hkv={spec.num_kv_heads}, "
                      f"head_dim={spec.head_dim}, what model type {spec.model_type!r}'s attention layers take); the "
                      "adapter is for another model, or PEFT sized it from the config where the layers take another "
                      "shape")
    optional = {"num_attention_heads": spec.num_kv_heads, "num_transformer_submodules": submodules}
    for field, value in optional.items():
        if config.get(field) is not None:
            _check_field(path, field, config[field], value, hint="the adapter is for another model")


def _read_peft_tensors(directory, wrapper, config: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(prompt_embeddings, the module weights by name), the names checked against the wrapper's
    :func:`module_tensors`."""
    spec, modules, trainable = wrapper.spec, module_tensors(wrapper), list(wrapper.trainable_modules)
    path = _peft_weights(directory)
    tensors = _read_safetensors(path, "a PEFT adapter directory holds it")
    if PEFT_KEY not in tensors:
        raise ValueError(f"{path}: no tensor named {PEFT_KEY!r} (found {sorted(tensors)}); not a PEFT prompt-learning "
                         "adapter")
    extra = set(tensors) - {PEFT_KEY}
    unexpected, missing = sorted(extra - set(modules)), sorted(set(modules) - extra)
    if unexpected:
        saved = config.get("modules_to_save")
        raise ValueError(f"{path}: besides {PEFT_KEY!r} it holds {unexpected} (modules_to_save {saved!r} in the "
                         f"config), which this wrapper does not train (trainable_modules="
                         f"{trainable}): build it with add_prefix_tuning(..., "
                         "trainable_modules=<those modules>), or use from_peft_adapter")
    if missing:
        raise ValueError(f"{path}: no weights for {missing} of this wrapper's trainable_modules "
                         f"{trainable} (the adapter's modules_to_save: "
                         f"{config.get('modules_to_save')!r}); build the wrapper with trainable_modules=[] to load "
                         "the prefix alone")
    _check_tensor(path, PEFT_KEY, tensors[PEFT_KEY], (spec.num_virtual_tokens, spec.width))
    for name, t in modules.items():
        _check_tensor(path, name, tensors[name], tuple(t.shape))
    return tensors[PEFT_KEY], {name: tensors[name] for name in modules}


# ---- checks and files -----------------------------------------------------------------------------
def _is_dtensor(t) -> bool:
    """Whether ``t`` is a torch.distributed DTensor (FSDP2's parameters). Works without
    torch.distributed: a DTensor can only exist once its module has been imported."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):  # torch >= 2.5, 2.4
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if isinstance(cls, type) and isinstance(t, cls):
            return True
    return False


_SAVE_HINT = ("save the whole prefix from one rank instead: FSDP2, call unshard() on every rank on the "
              "fully_shard-ed module that holds the prefixes, save on rank 0, then reshard() on every rank; FSDP1, "
              "save on rank 0 inside `with FullyShardedDataParallel.summon_full_params(module):` (entered on every "
              "rank); or gather each parameter with p.full_tensor() (a collective: every rank) and write it "
              "yourself, or write a sharded checkpoint with torch.distributed.checkpoint")
_LOAD_HINT = ("load the prefix before fully_shard() / FullyShardedDataParallel wraps the model (it shards the loaded "
              "values), or load a sharded checkpoint with torch.distributed.checkpoint")


def _whole_tensors(wrapper, what: str) -> dict[str, torch.nn.Parameter]:
    """:func:`prefix_tensors`, checked to be whole (not FSDP shards) before ``what`` touches any file."""
    params = prefix_tensors(wrapper)
    shapes = expected_shapes(wrapper.spec)
    hint = _LOAD_HINT if what.startswith("load") else _SAVE_HINT
    if set(params) != set(shapes):
        raise RuntimeError(f"{what}: the wrapper's trainable parameters are {sorted(params)}, but a wrapper of this "
                           f"spec has {sorted(shapes)} (flattened into a wrapper such as FSDP1 without "
                           f"use_orig_params=True?); {hint}")
    for name, p in params.items():
        if _is_dtensor(p):
            kind = f"{type(p).__module__}.{type(p).__qualname__}"
            raise RuntimeError(f"{what}: parameter {name!r} is a {kind} (placements {tuple(p.placements)}, this "
                               f"rank's shard {tuple(p.to_local().shape)} of {tuple(p.shape)}): the prefixes are "
                               f"sharded by FSDP2 (fully_shard), not whole on this rank, so nothing was "
                               f"{'written' if what.startswith('save') else 'loaded'}; {hint}")
        if tuple(p.shape) != shapes.get(name):
            raise RuntimeError(f"{what}: parameter {name!r} ({type(p).__name__}) has shape {tuple(p.shape)}, but the "
                               f"whole parameter has {shapes.get(name)}: it is this rank's part of a sharded "
                               f"parameter (FSDP1 outside summon_full_params()?), so nothing was "
                               f"{'written' if what.startswith('save') else 'loaded'}; {hint}")
    for name, t in module_tensors(wrapper).items():
        if _is_dtensor(t):
            raise RuntimeError(f"{what}: {name!r} of the trainable_modules is a DTensor (sharded by FSDP2), not whole "
                               f"on this rank, so nothing was {'written' if what.startswith('save') else 'loaded'}; "
                               f"{hint}")
    return params


def _check_field(path: Path, field: str, saved, ours, hint: str) -> None:
    if saved != ours or type(saved) is not type(ours):
        raise ValueError(f"{path}: {field} is {saved!r} in the file, but {ours!r} in this model ({hint})")


def _check_tensor(path: Path, name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} in the file, but {shape} in "
                         "this model")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{path}: tensor {name!r} has dtype {tensor.dtype} in the file; a floating dtype is needed")


def _check_prefix_index(spec: PrefixSpec, prefix_index) -> None:
    if isinstance(prefix_index, bool) or not isinstance(prefix_index, int) \
            or not 0 <= prefix_index < spec.num_prefixes:
        raise ValueError(f"prefix_index must be an int in [0, {spec.num_prefixes}) (num_prefixes="
                         f"{spec.num_prefixes}), got {prefix_index!r}")


def _read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({hint})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON (truncated or corrupt?): {e}") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def _read_safetensors(path: Path, hint: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file ({hint})")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file declares, from its header alone (no tensor data read)."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e


def _write_json(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


# ---- writing a weights file and its config as one ---------------------------------------------
# Two renames cannot replace two files at once, so a save goes through a stage folder next to the
# pair (inside ``directory``: the same filesystem, where a rename is atomic):
#   1. both new files are written into the stage and fsynced; the old pair is hard-linked (or
#      copied) into ``<stage>/old``;
#   2. the COMPLETE marker is written: from here on the stage holds the rest of the new pair;
#   3. the new files are renamed into ``directory`` one by one; 4. the stage is removed.
# Readers resolve each file through :func:`_pair_file`: while a COMPLETE stage exists, a file still
# in the stage is read from there, so a crash (no handler runs) between the renames of step 3 leaves
# the new pair readable, and before step 2 the old one. An exception undoes step 3 in an order that
# keeps that true at each rename (see :func:`_roll_back`), ending with the old pair and no stage.
_COMPLETE = "COMPLETE"
_OLD = "old"
_PAIRS = ((PREFIX_WEIGHTS, PREFIX_CONFIG), (PEFT_WEIGHTS, PEFT_CONFIG))


def _stage(directory: Path, name: str) -> Path:
    weights = next(pair[0] for pair in _PAIRS if name in pair)
    return directory / f".{weights}.saving"


def _pair_file(directory: Path, name: str) -> Path:
    """Where to read ``name`` of a pair: from the stage of an interrupted save that had written the
    whole new pair (it has not been renamed into place yet), else ``directory / name``."""
    stage = _stage(directory, name)
    if (stage / _COMPLETE).is_file() and (stage / name).is_file():
        return stage / name
    return directory / name


def _save_pair(directory: Path, writers: dict) -> None:
    """Writes the files ``writers`` name (name: function writing it to the path given) into
    ``directory`` as one pair, through the stage described above. Files of ``directory`` other than
    the pair's are never touched."""
    names = list(writers)
    directory.mkdir(parents=True, exist_ok=True)
    stage = _stage(directory, names[0])
    _finish_interrupted_save(directory, stage, names)
    os.mkdir(stage)
    replaced = []
    try:
        for name, write in writers.items():
            write(stage / name)
            _fsync(stage / name)
        os.mkdir(stage / _OLD)
        for name in names:
            if (directory / name).is_file():
                _keep(directory / name, stage / _OLD / name)
        _fsync(stage / _OLD)
        with open(stage / _COMPLETE, "wb") as f:
            os.fsync(f.fileno())
        _fsync(stage)
        for name in names:
            os.replace(stage / name, directory / name)
            replaced.append(name)
        _fsync(directory)
    except BaseException as error:
        try:
            _roll_back(directory, stage, names, replaced)
        except BaseException as undo:
            error.add_note(f"restoring the previous {' and '.join(names)} in {directory} failed too ({undo!r}); "
                           f"the new ones remain readable through {stage} (loading reads them from there; the next "
                           "save finishes or replaces them)")
        raise
    shutil.rmtree(stage, ignore_errors=True)


def _roll_back(directory: Path, stage: Path, names: list[str], replaced: list[str]) -> None:
    """Undoes a failed save: back to the old pair, the stage removed. The new files move back into
    the still COMPLETE stage first (readers see the new pair throughout), then the old ones are
    restored, and only then is COMPLETE removed (readers see the old pair)."""
    for name in replaced:
        os.replace(directory / name, stage / name)
    for name in replaced:
        if (stage / _OLD / name).is_file():
            os.replace(stage / _OLD / name, directory / name)
    if replaced:
        _fsync(directory)
    if (stage / _COMPLETE).exists():
        os.unlink(stage / _COMPLETE)
        _fsync(stage)
    shutil.rmtree(stage)


def _finish_interrupted_save(directory: Path, stage: Path, names: list[str]) -> None:
    """A stage left by a crashed save: completes its renames when it had written the whole pair
    (what readers see), else drops it (the old pair is in place)."""
    if not os.path.lexists(stage):
        return
    if (stage / _COMPLETE).is_file():
        for name in names:
            if (stage / name).is_file():
                os.replace(stage / name, directory / name)
        _fsync(directory)
    shutil.rmtree(stage)


def _keep(path: Path, backup: Path) -> None:
    try:
        os.link(path, backup)
    except OSError:  # a filesystem without hard links
        shutil.copy2(path, backup)
        _fsync(backup)


def _fsync(path: Path) -> None:
    """Flushes a file, or a folder's entries, to disk (folders: not on Windows, which cannot open them)."""
    if os.name == "nt" and path.is_dir():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
