"""prefix_kernels: fused attention kernels for prefix tuning."""

from prefix_kernels.functional import prefix_attention
from prefix_kernels.reference import prefix_attention_reference

__all__ = ["prefix_attention", "prefix_attention_reference"]
__version__ = "0.1.0"
