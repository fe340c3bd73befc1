"""jax_mfa: FlashAttention for JAX, with fused CPU kernels and Metal kernels
for Apple-silicon GPUs.

    out = jax_mfa.attention(query, key, value, is_causal=True)
"""

from jax_mfa._api import (attention, available_implementations, implementation_diagnostics,
                          ring_attention)

__version__ = "0.1.0"
__all__ = ["attention", "available_implementations", "implementation_diagnostics",
           "ring_attention", "__version__"]
