"""prefix_kernels: fused attention kernels for prefix tuning."""

from prefix_kernels.functional import prefix_attention
from prefix_kernels.reference import prefix_attention_reference

__all__ = ["add_prefix_tuning", "from_peft_adapter", "prefix_attention", "prefix_attention_reference"]
__version__ = "0.1.0"


def __getattr__(name):  # the transformers integration loads on first use (transformers is slow to import)
    if name in ("add_prefix_tuning", "from_peft_adapter"):
        from prefix_kernels import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
