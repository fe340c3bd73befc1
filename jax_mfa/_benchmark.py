"""Timing helpers shared by ``python -m jax_mfa`` and benchmarks/bench_cpu.py.

Everything is jitted and timed after a warm-up call; figures are medians over
repeats, so that noise from other processes on the machine is damped. The
reference for "jax.nn" is ``jax.nn.dot_product_attention`` (XLA).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

REFERENCE = "jax.nn"  # jax.nn.dot_product_attention, as XLA compiles it


def median_times(calls: Sequence[tuple[Callable, tuple]], repeats: int = 5, warmup: int = 1,
                 min_time: float = 0.05, settle: float = 0.02,
                 settle_ratio: float = 0.25) -> list[float]:
    """Median wall time in seconds of each ``fn(*args)`` in ``calls`` (outputs
    blocked on). The calls are interleaved -- every repeat runs each of them
    once, in rotating order -- so that load from other processes hits them
    alike and their ratios stay meaningful on a shared machine. Calls shorter
    than ``min_time`` are repeated within a sample (the per-call time is kept).

    Between samples of interleaved calls the loop sleeps ``settle`` seconds,
    or ``settle_ratio`` times the previous sample's duration if longer:
    thread pools keep their workers spinning for a while after a call (torch's
    OpenMP, XLA's Eigen pool, OpenBLAS), and on a machine with few cores those
    spinning threads take the CPU from whatever runs next (measured on 2
    cores: a call timed right after another library's ran up to 1.4x slower
    than alone). A long XLA call leaves more behind: on 2 cores of the AMX
    Xeon, jax_mfa and torch calls started 20 ms after a 2.3 s XLA call ran
    1.1-2.0x slower than alone; jax_mfa 100 ms after it as fast as alone
    (benchmarks/probe_after_xla.py; benchmarks/RESULTS.md, "what a long XLA
    call leaves behind").
    """
    inner = []
    for fn, args in calls:
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        once = max(time.perf_counter() - t0, 1e-6)
        inner.append(max(1, int(min_time / once)) if min_time > 0 else 1)
    samples: list[list[float]] = [[] for _ in calls]
    last = 0.0  # the previous sample's duration
    for rep in range(repeats):
        for j in range(len(calls)):
            idx = (j + rep) % len(calls)
            fn, args = calls[idx]
            pause = max(settle, settle_ratio * last) if len(calls) > 1 else 0.0
            if pause > 0:
                time.sleep(pause)
            t0 = time.perf_counter()
            for _ in range(inner[idx]):
                out = fn(*args)
            jax.block_until_ready(out)
            last = time.perf_counter() - t0
            samples[idx].append(last / inner[idx])
    return [statistics.median(s) for s in samples]


def median_time(fn: Callable, *args, repeats: int = 5, warmup: int = 1,
                min_time: float = 0.0) -> float:
    """Median wall time in seconds of ``fn(*args)``; see :func:`median_times`."""
    return median_times([(fn, args)], repeats=repeats, warmup=warmup, min_time=min_time)[0]


def median_ms(fn: Callable, *args, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time in milliseconds of ``fn(*args)`` (kept for callers of
    the first version of this module)."""
    return median_time(fn, *args, repeats=repeats, warmup=warmup) * 1e3


def sgemm_call(n: int = 2048) -> tuple[Callable, tuple]:
    """(function, arguments) of a NumPy float32 n x n x n matmul (2 n^3 flops):
    the machine's practical GEMM rate on all cores."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return np.matmul, (a, b)


def sgemm_gflops(n: int = 2048, repeats: int = 5) -> float:
    """NumPy float32 matmul rate (GFLOP/s) on n x n x n, all cores."""
    return 2.0 * n**3 / median_times([sgemm_call(n)], repeats=repeats, min_time=0)[0] / 1e9


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def peak_rss_during(fn: Callable, *args):
    """(result, peak RSS during fn(*args) above the RSS before it, RSS before),
    in bytes. Linux only: the peak (VmHWM) is reset through /proc/self/clear_refs
    first, so earlier peaks (compilation) cannot hide this call's."""
    before = _proc_status_bytes("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    result = jax.block_until_ready(fn(*args))
    return result, _proc_status_bytes("VmHWM:") - before, before


def attention_flops(B, T, S, N, H, *, backward=False) -> float:
    """Dense-equivalent flops: 4*B*N*T*S*H forward (QK^T and PV), 2.5x that
    more for the backward (five products)."""
    fwd = 4.0 * B * N * T * S * H
    return fwd * (3.5 if backward else 1.0)


def make_inputs(B, T, S, N, K, H, dtype=jnp.float32, seed=0):
    """Random (q, k, v, dout) in the (B, L, heads, H) layout."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (B, T, N, H), jnp.float32).astype(dtype)
    return jax.block_until_ready((q, k, v, do))


def attention_fn(implementation: str, *, is_causal=False, local_window_size=None):
    """``f(q, k, v)`` for jax_mfa's implementation (``"cpu"``, ``"xla"``, ...)
    or ``"jax.nn"`` (jax.nn.dot_product_attention)."""
    if implementation == REFERENCE:
        def f(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, is_causal=is_causal,
                                                local_window_size=local_window_size)
    else:
        import jax_mfa

        def f(q, k, v):
            return jax_mfa.attention(q, k, v, is_causal=is_causal,
                                     local_window_size=local_window_size,
                                     implementation=implementation)
    return f


def forward_and_backward(f):
    """Jitted ``(q, k, v, dout) -> (dq, dk, dv)``: one forward and one backward."""
    def loss(q, k, v, do):
        return jnp.sum(f(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def attention_call(implementation: str, q, k, v, do, *, backward=False, is_causal=False,
                   local_window_size=None) -> tuple[Callable, tuple]:
    """(jitted function, arguments) of one forward (or forward+backward) call."""
    f = attention_fn(implementation, is_causal=is_causal, local_window_size=local_window_size)
    if backward:
        return forward_and_backward(f), (q, k, v, do)
    return jax.jit(f), (q, k, v)


def time_attention(implementation: str, q, k, v, do, *, backward=False, is_causal=False,
                   local_window_size=None, repeats=5) -> float:
    """Median seconds of one jitted forward (or forward+backward) call."""
    call = attention_call(implementation, q, k, v, do, backward=backward, is_causal=is_causal,
                          local_window_size=local_window_size)
    return median_times([call], repeats=repeats)[0]


def compare_attention(implementations: Sequence[str], q, k, v, do, *, repeats=5,
                      **kw) -> list[float]:
    """Median seconds of each implementation on the same inputs, interleaved."""
    return median_times([attention_call(i, q, k, v, do, **kw) for i in implementations],
                        repeats=repeats)


def short_table(implementations: Sequence[str] | None = None) -> str:
    """A short Markdown table: float32, B=1, N=8, H=64, T=S in {1024, 2048},
    forward and forward+backward, each implementation (default: the fused
    ones available, not the emulator) against jax.nn.dot_product_attention,
    interleaved. Takes a few tens of seconds."""
    if implementations is None:  # the fast fused ones (not the emulator)
        import jax_mfa
        implementations = [i for i in jax_mfa.available_implementations()
                           if i not in ("xla", "xla-blockwise", "metal-emulated")] or ["xla"]
    elif isinstance(implementations, str):
        implementations = [implementations]
    implementations = [i for i in implementations if i != REFERENCE]
    names = [REFERENCE] + list(implementations)
    lines = ["| pass | T=S | " + " | ".join(f"{n} (ms)" for n in names) + " | " +
             " | ".join(f"{n} speed-up" for n in implementations) + " |",
             "|" + "---|" * (2 + len(names) + len(implementations))]
    B, N, H = 1, 8, 64
    for backward in (False, True):
        for L in (1024, 2048):
            q, k, v, do = make_inputs(B, L, L, N, N, H)
            times = dict(zip(names, compare_attention(names, q, k, v, do, backward=backward,
                                                      repeats=3)))
            ref = times[REFERENCE]
            lines.append(f"| {'fwd+bwd' if backward else 'fwd'} | {L} | " +
                         " | ".join(f"{times[n] * 1e3:.1f}" for n in names) + " | " +
                         " | ".join(f"{ref / times[n]:.2f}x" for n in implementations) + " |")
    return "\n".join(lines)
