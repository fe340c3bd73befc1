"""`python -m jax_mfa`: what runs here, is it right, and how fast is it.

Prints the implementations available on this machine, checks each fused one
against the XLA implementation in float64 (forward and gradients) on a few
shapes, and prints a short timing table against jax.nn.dot_product_attention
measured in the same run.
"""

from __future__ import annotations

import argparse
import platform
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mfa  # noqa: E402

# (B, T, S, N, K, H, options): odd sizes, GQA and every masking feature.
CHECK_CASES = [
    (2, 37, 53, 4, 2, 16, dict()),
    (1, 130, 130, 6, 1, 64, dict(is_causal=True)),
    (2, 65, 97, 2, 2, 80, dict(local_window_size=(9, 3), softcap=20.0)),
    (2, 50, 70, 4, 4, 32, dict(query_seq_lengths=[50, 17], key_value_seq_lengths=[3, 70],
                               bias=True)),
]


def _check(implementation: str) -> float:
    """Largest error (relative to the value's magnitude) over CHECK_CASES."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for B, T, S, N, K, H, opts in CHECK_CASES:
        if implementation == "metal-emulated":
            T, S = min(T, 40), min(S, 40)
        q = jnp.asarray(rng.standard_normal((B, T, N, H)))
        k = jnp.asarray(rng.standard_normal((B, S, K, H)))
        v = jnp.asarray(rng.standard_normal((B, S, K, H)))
        kw = dict(opts)
        if kw.pop("bias", False):
            kw["bias"] = jnp.asarray(rng.standard_normal((B, 1, T, S)))
        for name in ("query_seq_lengths", "key_value_seq_lengths"):
            if name in kw:
                kw[name] = jnp.minimum(jnp.asarray(kw[name], jnp.int32), T if name[0] == "q" else S)
        dtype = jnp.float32 if implementation.startswith("metal") else jnp.float64

        def loss(q, k, v, impl):
            out = jax_mfa.attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                    implementation=impl, **kw)
            return jnp.sum(jnp.sin(out.astype(jnp.float64)))

        got = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, implementation)
        want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, "xla")
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            scale = max(float(jnp.max(jnp.abs(b))), 1e-30)
            worst = max(worst, float(jnp.max(jnp.abs(a - b))) / scale)
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jax_mfa", description=__doc__.split("\n")[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the timing table")
    args = parser.parse_args(argv)

    print(f"jax_mfa {jax_mfa.__version__} on {platform.machine()} {platform.system()}, "
          f"jax {jax.__version__}, JAX platform {jax.default_backend()}")
    impls = jax_mfa.available_implementations()
    print(f"available implementations (best first): {', '.join(impls)}")
    from jax_mfa import _native

    if _native.load_error():
        print(f"warning: fused kernels unavailable: {_native.load_error()}")
    metal_ok, _, metal_device = _native.metal_diagnostics()
    if metal_ok:
        print(f"metal: {metal_device}")
    for name, reason in jax_mfa.implementation_diagnostics().items():
        if reason is not None:
            print(f"not available: {name}: {reason}")
    print()

    failed = False
    print("check against the XLA implementation (forward + gradients of q, k, v):")
    for impl in impls:
        if impl == "xla":
            continue
        err = _check(impl)
        tol = 1e-4 if impl.startswith("metal") else 1e-10
        ok = err <= tol
        failed |= not ok
        print(f"  {impl:15s} max relative error {err:.2e} (tolerance {tol:.0e}) "
              f"{'OK' if ok else 'FAILED'}")

    if not args.no_bench:
        from jax_mfa import _benchmark

        print("\ntiming (median ms; ratio = jax.nn.dot_product_attention time / jax_mfa time):")
        print(_benchmark.short_table())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
