"""`python -m jax_mfa`: what runs here, is it right, and how fast is it.

Prints the implementations available on this machine and, for each one other
than "xla", labelled checks (forward and gradients of q, k, v, on odd shapes
with GQA and every masking feature):
  * float64 against implementation="xla" (the same semantics in plain JAX):
    exactness, to rounding (float32 for the Metal paths, which have no float64);
  * float32 and bfloat16 against jax.nn.dot_product_attention, on the cases
    whose semantics jax.nn shares (no softcap);
then a short timing table against jax.nn.dot_product_attention measured in
the same run.
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

# Tolerances of the labelled checks (max error relative to the largest magnitude).
TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "bfloat16": 3e-2}


def _inputs(case, implementation, rng):
    B, T, S, N, K, H, opts = case
    if implementation == "metal-emulated":  # the emulator is slow
        T, S = min(T, 40), min(S, 40)
    q, k, v = (jnp.asarray(rng.standard_normal(shape)) for shape in
               ((B, T, N, H), (B, S, K, H), (B, S, K, H)))
    kw = dict(opts)
    if kw.pop("bias", False):
        kw["bias"] = jnp.asarray(rng.standard_normal((B, 1, T, S)))
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kw:
            kw[name] = jnp.minimum(jnp.asarray(kw[name], jnp.int32), T if name[0] == "q" else S)
    return (q, k, v), kw


def _value_and_grads(fn, q, k, v, dtype, kw):
    def loss(q, k, v):
        kw_cast = {n: (a.astype(dtype) if n == "bias" else a) for n, a in kw.items()}
        out = fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), **kw_cast)
        return jnp.sum(jnp.sin(out.astype(jnp.float64)))

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _error(got, want) -> float:
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        a, b = jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64)
        worst = max(worst, float(jnp.max(jnp.abs(a - b))) / max(float(jnp.max(jnp.abs(b))),
                                                                   1e-30))
    return worst


def _check(implementation: str, dtype, against: str) -> float:
    """Largest error over CHECK_CASES of `implementation` in `dtype` against
    implementation="xla" (against="xla") or jax.nn.dot_product_attention
    (against="jax.nn", only the cases whose semantics it shares)."""
    rng = np.random.default_rng(0)
    impl = None if implementation == "default" else implementation
    mine = lambda *a, **kw: jax_mfa.attention(*a, implementation=impl, **kw)  # noqa: E731
    if against == "xla":
        theirs = lambda *a, **kw: jax_mfa.attention(*a, implementation="xla", **kw)  # noqa: E731
    else:
        theirs = jax.nn.dot_product_attention
    worst = 0.0
    for case in CHECK_CASES:
        if against == "jax.nn" and "softcap" in case[-1]:
            continue  # jax.nn has no softcap
        (q, k, v), kw = _inputs(case, implementation, rng)
        worst = max(worst, _error(_value_and_grads(mine, q, k, v, dtype, kw),
                                  _value_and_grads(theirs, q, k, v, dtype, kw)))
    return worst


def _checks(implementation: str):
    """(label, dtype name, against) of the checks to run for an implementation."""
    exact = "float32" if implementation.startswith("metal") else "float64"
    return [(f"{exact} vs implementation='xla' (exactness)", exact, "xla"),
            ("float32 vs jax.nn.dot_product_attention", "float32", "jax.nn"),
            ("bfloat16 vs jax.nn.dot_product_attention", "bfloat16", "jax.nn")]


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
    print("checks (forward + gradients of q, k, v; max error relative to the largest value):")
    names = [i for i in impls if i != "xla"]
    if jax.default_backend() != "cpu":
        names.insert(0, "default")  # implementation=None: routed (see README)
    for impl in names:
        for label, dtype, against in _checks(impl):
            err = _check(impl, jnp.dtype(dtype), against)
            metal_exact = impl.startswith("metal") and against == "xla"
            tol = 1e-4 if metal_exact else TOLERANCE[dtype]
            ok = err <= tol
            failed |= not ok
            print(f"  {impl:15s} {label:43s} {err:.1e} (tolerance {tol:.0e}) "
                  f"{'OK' if ok else 'FAILED'}")

    if not args.no_bench:
        from jax_mfa import _benchmark

        print("\ntiming (median ms; ratio = jax.nn.dot_product_attention time / jax_mfa time):")
        print(_benchmark.short_table())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
