"""What fixes the prefix tensors' shapes and meaning, shared by the wrapper
(:mod:`prefix_kernels.hf.model`) and the checkpoint formats (:mod:`prefix_kernels.hf.checkpoint`),
which therefore do not import each other's modules both ways."""

from __future__ import annotations

from dataclasses import asdict, dataclass

POSITION_OFFSETS = ("peft", "none")


@dataclass(frozen=True)
class PrefixSpec:
    """Everything that fixes the prefix tensors' shapes and meaning (saved as JSON with them)."""

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    num_virtual_tokens: int
    num_prefixes: int = 1
    projection_hidden: int | None = None
    position_offset: str = "peft"

    @property
    def width(self) -> int:
        """Elements per virtual token: L * 2 * Hkv * D (PEFT's prompt_embeddings width)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    def to_dict(self) -> dict:
        return asdict(self)


def model_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config; head_dim from the config when given."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names):
        for n in names:
            if getattr(text, n, None) is not None:
                return getattr(text, n)
        raise ValueError(f"{text.model_type} config has none of {names}: cannot size the prefix")

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or first("hidden_size", "n_embd") // heads
    return int(layers), int(kv_heads), int(head_dim)


def spec_for(config, num_virtual_tokens: int, num_prefixes: int = 1, projection_hidden: int | None = None,
             position_offset: str = "peft") -> PrefixSpec:
    """The :class:`PrefixSpec` of prefixes for a model with transformers ``config``."""
    return PrefixSpec(config.model_type, *model_geometry(config), num_virtual_tokens, num_prefixes,
                      projection_hidden, position_offset)
