"""What fixes the prefix tensors' shapes and meaning, shared by the wrapper
(:mod:`prefix_kernels.hf.model`) and the checkpoint formats (:mod:`prefix_kernels.hf.checkpoint`),
which therefore do not import each other's modules both ways.

Layout of the prefix table ``[T, P, width]`` (per virtual token):

- every attention layer the same (Hkv, D) with keys and values of one head dim -- the usual case:
  PEFT's layout, ``[L, 2, Hkv, D]`` (layer, key/value, kv head, head dim), ``layer_shapes`` None;
- otherwise (per-layer kv heads or head dims, as Gemma 4's global layers; MLA's Q/K head dim
  differing from its V head dim, as DeepSeek-V2/V3): ``layer_shapes[l] = (Hkv, Dk, Dv)`` and layer l
  holds ``Hkv * Dk`` key then ``Hkv * Dv`` value elements, layer after layer; a layer without
  attention (a hybrid's SSM/linear layer) holds none. PEFT has no layout for these models.
"""

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
    layer_shapes: tuple[tuple[int, int, int], ...] | None = None
    num_frozen_tokens: int = 0  # the first k virtual tokens get no gradient (Cartridges' attention sink)
    placement: str | None = None  # encoder-decoder models: "paper" or "peft" (prefix_kernels.hf.model)

    def __post_init__(self):
        if self.layer_shapes is not None:  # from JSON: lists
            object.__setattr__(self, "layer_shapes", tuple(tuple(int(x) for x in s) for s in self.layer_shapes))

    def shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(Hkv, Dk, Dv) of every layer."""
        if self.layer_shapes is not None:
            return self.layer_shapes
        return ((self.num_kv_heads, self.head_dim, self.head_dim),) * self.num_layers

    @property
    def width(self) -> int:
        """Elements per virtual token (for PEFT's layout: L * 2 * Hkv * D, its prompt_embeddings width)."""
        return sum(h * (dk + dv) for h, dk, dv in self.shapes())

    @property
    def peft_layout(self) -> bool:
        return self.layer_shapes is None

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.layer_shapes is not None:
            out["layer_shapes"] = [list(s) for s in self.layer_shapes]
        return out


def model_geometry(config) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a transformers config; head_dim from the config when given."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def field(name):
        try:
            return getattr(text, name, None)
        except Exception:  # noqa: BLE001 -- e.g. gemma4's per-layer attributes raise on global access
            return None

    def first(*names):
        for n in names:
            if field(n) is not None:
                return field(n)
        raise ValueError(f"{text.model_type} config has none of {names}: cannot size the prefix")

    layers = first("num_hidden_layers", "n_layer", "num_layers")
    heads = first("num_attention_heads", "n_head")
    kv_heads = field("num_key_value_heads") or heads
    head_dim = field("head_dim") or first("hidden_size", "n_embd") // heads
    return int(layers), int(kv_heads), int(head_dim)


def spec_for(config, num_virtual_tokens: int, num_prefixes: int = 1, projection_hidden: int | None = None,
             position_offset: str = "peft", layer_shapes=None, num_frozen_tokens: int = 0,
             placement: str | None = None) -> PrefixSpec:
    """The :class:`PrefixSpec` of prefixes for a model with transformers ``config``. ``layer_shapes``:
    what each attention layer was seen to take, {layer: (Hkv, Dk, Dv)} (:mod:`prefix_kernels.hf.probe`);
    PEFT's layout when they are all one (Hkv, D, D) -- sized by them, not by the config, where the
    two differ -- else the per-layer layout."""
    try:
        layers, kv_heads, head_dim = model_geometry(config)
    except ValueError:
        if not layer_shapes:
            raise
        layers, kv_heads, head_dim = 0, *next(iter(layer_shapes.values()))[:2]
    per_layer = None
    if layer_shapes:
        shapes = set(layer_shapes.values())
        kv, dk, dv = next(iter(shapes))
        if len(shapes) == 1 and dk == dv:  # one shape: PEFT's layout, sized by what the layers take
            kv_heads, head_dim = kv, dk
        layers = max(layers, max(layer_shapes) + 1)
        if any(shape != (kv_heads, head_dim, head_dim) for shape in layer_shapes.values()):
            per_layer = tuple(layer_shapes.get(layer, (0, 0, 0)) for layer in range(layers))
    return PrefixSpec(config.model_type, layers, kv_heads, head_dim, num_virtual_tokens, num_prefixes,
                      projection_hidden, position_offset, per_layer, num_frozen_tokens, placement)
