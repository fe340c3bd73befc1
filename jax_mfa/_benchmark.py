"""Timing helpers shared by `python -m jax_mfa` and benchmarks/."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_mfa


def median_ms(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def short_table(implementation: str | None = None) -> str:
    """Markdown table: forward and forward+backward at a few lengths, float32."""
    impl = implementation or jax_mfa.available_implementations()[0]
    rows = ["| T=S | B,N,H | causal | XLA fwd | jax_mfa fwd | ratio | XLA fwd+bwd | jax_mfa fwd+bwd | ratio |",
            "|---|---|---|---|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for T, causal in ((1024, False), (2048, False), (2048, True)):
        B, N, H = 1, 8, 64
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32) for _ in range(3))
        ours = lambda q, k, v: jax_mfa.attention(q, k, v, is_causal=causal, implementation=impl)  # noqa: E731
        ref = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
        cells = []
        for f in (ref, ours):
            fwd = jax.jit(f)
            cells.append(median_ms(fwd, q, k, v))
        for f in (ref, ours):
            grad = jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
            cells.append(median_ms(grad, q, k, v))
        rows.append(f"| {T} | {B},{N},{H} | {causal} | {cells[0]:.1f} | {cells[1]:.1f} | "
                    f"{cells[0] / cells[1]:.2f}x | {cells[2]:.1f} | {cells[3]:.1f} | "
                    f"{cells[2] / cells[3]:.2f}x |")
    return "\n".join(rows)
