"""Quick correctness sweep: the fused "cpu" kernels against the "xla" path.

Odd shapes, every feature (GQA, bias with broadcast dims and its gradient, mask,
causal, local window, sequence lengths, softcap, fully-masked rows), every
dtype, forward (out, lse) and gradients. float64 cases are checked tightly.

    python benchmarks/check_cpu_kernels.py [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mfa  # noqa: E402

TOL = {  # (forward, gradient) max-abs-error bounds, relative to the reference's scale
    jnp.float64: (1e-11, 1e-10),
    jnp.float32: (2e-5, 1e-4),
    jnp.float16: (4e-3, 2e-2),
    jnp.bfloat16: (3e-2, 1e-1),
}


def run_case(rng, dtype, B, T, S, N, K, H, *, bias=None, mask=False, causal=False, window=None,
             qlen=False, kvlen=False, softcap=None, grads=True):
    ks = jax.random.split(rng, 8)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    acc = jnp.float64 if dtype == jnp.float64 else jnp.float32
    kw = dict(is_causal=causal, local_window_size=window, softcap=softcap)
    b = None
    if bias is not None:
        shape = tuple(full if keep else 1 for keep, full in zip(bias, (B, N, T, S)))
        b = jax.random.normal(ks[3], shape, acc)
    m = None
    if mask:
        m = jax.random.uniform(ks[4], (B, 1, T, S)) > 0.3
        m = m.at[:, :, 0, :].set(False)  # a fully-masked row
    if qlen:
        kw["query_seq_lengths"] = jnp.array([max(1, T - 3)] + [T] * (B - 1), jnp.int32)[:B]
    if kvlen:
        kw["key_value_seq_lengths"] = jnp.array([max(1, S // 2)] + [0] * (B - 1), jnp.int32)[:B]
    do = jax.random.normal(ks[5], (B, T, N, H), jnp.float32).astype(dtype)
    dl = jax.random.normal(ks[6], (B, T, N), acc)

    def f(impl, q, k, v, b):
        out, lse = jax_mfa.attention(q, k, v, b, m, return_residual=True, implementation=impl,
                                     **kw)
        lse_f = jnp.where(jnp.isfinite(lse), lse, 0)
        loss = jnp.sum(out.astype(acc) * do.astype(acc)) + jnp.sum(lse_f * dl)
        return loss, (out, lse)

    res = {}
    for impl in ("cpu", "xla"):
        if grads:
            g = jax.jit(jax.grad(lambda *a: f(impl, *a), argnums=(0, 1, 2, 3), has_aux=True),
                        )(q, k, v, b)
            res[impl] = g
        else:
            res[impl] = (None, jax.jit(lambda *a: f(impl, *a)[1])(q, k, v, b))
    (gc, (oc, lc)), (gx, (ox, lx)) = res["cpu"], res["xla"]
    ftol, gtol = TOL[dtype]

    def err(a, b):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if not np.array_equal(np.isfinite(a), np.isfinite(b)):
            return np.inf
        fin = np.isfinite(b)
        if not np.array_equal(a[~fin], b[~fin]):
            return np.inf
        scale = max(1.0, np.max(np.abs(b[fin]), initial=0))
        return np.max(np.abs(a[fin] - b[fin]), initial=0) / scale

    errs = {"out": err(oc, ox), "lse": err(lc, lx)}
    if grads:
        for name, a, c in zip(("dq", "dk", "dv", "dbias"), gc, gx):
            if a is not None:
                errs[name] = err(a, c)
    ok = all(e <= (ftol if n in ("out", "lse") else gtol) for n, e in errs.items())
    return ok, errs


def cases(quick):
    shapes = [  # B, T, S, N, K, H
        (1, 1, 1, 1, 1, 8),
        (2, 37, 53, 4, 2, 24),
        (1, 130, 300, 6, 3, 64),
        (2, 67, 67, 4, 4, 40),
        (1, 8, 700, 8, 1, 64),  # decode-like, GQA 8:1
        (1, 1, 1300, 8, 1, 32),  # decode, split keys
        (1, 200, 129, 2, 1, 128),
        (1, 65, 90, 2, 2, 256),
    ]
    features = [
        {},
        {"causal": True},
        {"window": (17, 5)},
        {"window": 8, "causal": True},
        {"bias": (1, 1, 1, 1)},
        {"bias": (0, 1, 1, 1)},
        {"bias": (1, 0, 0, 1)},
        {"bias": (1, 1, 1, 0)},
        {"bias": (0, 0, 1, 1), "causal": True},
        {"mask": True},
        {"qlen": True, "kvlen": True},
        {"softcap": 5.0},
        {"softcap": 3.0, "bias": (1, 1, 1, 1), "mask": True, "window": (30, 30), "qlen": True},
    ]
    dtypes = [jnp.float64, jnp.float32, jnp.float16, jnp.bfloat16]
    out = []
    for i, (shape, feat) in enumerate(itertools.product(shapes, features)):
        if quick and i % 3:
            continue
        for dt in dtypes:
            if dt in (jnp.float16, jnp.bfloat16) and i % 2:
                continue
            out.append((shape, feat, dt))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rng = jax.random.PRNGKey(0)
    failed = 0
    all_cases = cases(args.quick)
    worst = {}
    for n, (shape, feat, dt) in enumerate(all_cases):
        B, T, S, N, K, H = shape
        ok, errs = run_case(jax.random.fold_in(rng, n), dt, B, T, S, N, K, H, **feat)
        name = jnp.dtype(dt).name
        worst[name] = max(worst.get(name, 0), max(errs.values()))
        if not ok:
            failed += 1
            print(f"FAIL {name} {shape} {feat}: " +
                  ", ".join(f"{k}={v:.2e}" for k, v in errs.items()))
    print(f"{len(all_cases) - failed}/{len(all_cases)} cases passed; worst relative errors: " +
          ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
