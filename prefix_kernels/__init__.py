"""prefix_kernels: fused attention kernels for prefix tuning."""

from prefix_kernels.functional import prefix_attention
from prefix_kernels.reference import prefix_attention_reference

__all__ = ["add_prefix_tuning", "prefix_attention", "prefix_attention_reference"]
__version__ = "0.1.0"


def __getattr__(name):  # the transformers integration loads on first use (transformers is slow to import)
    if name == "add_prefix_tuning":
        from prefix_kernels.hf import add_prefix_tuning

        return add_prefix_tuning
    raise AttributeError(f"module 'prefix_kernels' has no attribute {name!r}")
