"""CPU benchmark: jax_mfa's fused kernels against jax.nn.dot_product_attention
and, when PyTorch is installed, torch's fused CPU scaled_dot_product_attention.

Reproduces every figure of the CPU performance targets in one process (ratios
are only meaningful within one run: the machine is shared), prints a Markdown
table and writes a plot of time against sequence length. Without torch (an
optional dependency: `pip install .[bench]`) its rows are skipped with a note.

    python benchmarks/bench_cpu.py [--quick] [--out DIR] [--repeats N] [--no-torch]
        [--only STEPS] [--torch-lengths L,..] [--dtypes float16,bfloat16] [--passes fwd]

Timing helpers live in jax_mfa/_benchmark.py (shared with ``python -m jax_mfa``).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
try:
    from tqdm import tqdm  # progress bars, optional
except ImportError:
    def tqdm(iterable, **_):
        return iterable

from jax_mfa import _benchmark as bm  # noqa: E402

REF = bm.REFERENCE

try:
    import torch
except ImportError:  # optional: only the torch rows need it
    torch = None


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
           if f in flags]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} "
            f"usable cores ({', '.join(isa) or 'no AVX flags read'}), load average {load:.1f} "
            f"at the start, Python {platform.python_version()}, jax {jax.__version__}")


class Bench:
    def __init__(self, quick: bool, repeats: int, settle: float, settle_ratio: float):
        self.quick = quick
        self.repeats = repeats
        self.settle = settle  # median_times' pauses before each interleaved sample
        self.settle_ratio = settle_ratio
        self.rows: list[tuple[str, str, str]] = []  # (section, config, result)
        self.curve: dict[tuple[str, bool], list[tuple[int, float]]] = {}
        self.verdicts: list[tuple[str, str, bool]] = []
        self.notes: list[str] = []
        # (dtype, H, case, pass, jax_mfa s, XLA s, torch s)
        self.torch_table: list[tuple] = []

    def times(self, calls):
        """Interleaved medians of several (fn, args) calls."""
        return bm.median_times(calls, repeats=self.repeats, settle=self.settle,
                               settle_ratio=self.settle_ratio)

    def check(self, name: str, figure: str, ok: bool):
        self.verdicts.append((name, figure, ok))


def call(impl, inputs, **kw):
    return bm.attention_call(impl, *inputs, **kw)


def main_rows(b: Bench, L: int):
    """Forward and forward+backward, float32, B=1, N=8, H=64, T=S=L, against
    jax.nn (interleaved) and the SGEMM rate (numpy 2048^3, measured just before
    and just after: not interleaved, as numpy's OpenBLAS threads keep spinning
    for a while after each call and would slow down whatever runs next)."""
    B, N, H = 1, 8, 64
    x = bm.make_inputs(B, L, L, N, N, H)
    for backward in (False, True):
        before = bm.sgemm_gflops(2048)
        calls = [call("cpu", x, backward=backward), call(REF, x, backward=backward)]
        if backward:  # "in each of five runs": five separate interleaved pairs
            runs = [bm.median_times(calls, repeats=1, min_time=0, settle=b.settle,
                                    settle_ratio=b.settle_ratio)
                    for _ in range(3 if b.quick else 5)]
            ratios = sorted(tx / tc for tc, tx in runs)
            tc = statistics.median(r[0] for r in runs)
            tx = statistics.median(r[1] for r in runs)
        else:
            tc, tx = b.times(calls)
        gf = (before + bm.sgemm_gflops(2048)) / 2
        rate = bm.attention_flops(B, L, L, N, H, backward=backward) / tc / 1e9
        name = "fwd+bwd" if backward else "fwd"
        b.rows.append(("main", f"{name} T=S={L}",
                       f"cpu {tc * 1e3:.1f} ms, {REF} {tx * 1e3:.1f} ms: **{tx / tc:.2f}x**; "
                       f"{rate:.0f} GFLOP/s = {100 * rate / gf:.0f}% of SGEMM ({gf:.0f} GFLOP/s)"))
        b.curve.setdefault(("cpu", backward), []).append((L, tc))
        b.curve.setdefault((REF, backward), []).append((L, tx))
        if backward:
            b.check(f"fwd+bwd T=S={L} >= 2.5x XLA in each of {len(ratios)} runs",
                    "runs " + ", ".join(f"{r:.2f}x" for r in ratios), ratios[0] >= 2.5)
        else:
            b.check(f"fwd T=S={L} >= 3x XLA", f"{tx / tc:.2f}x", tx / tc >= 3)
            b.check(f"fwd T=S={L} >= 55% SGEMM", f"{100 * rate / gf:.0f}%", rate / gf >= 0.55)


def curve_rows(b: Bench, L: int):
    """Extra points of the time-vs-length plot."""
    x = bm.make_inputs(1, L, L, 8, 8, 64)
    for backward in (False, True):
        tc, tx = b.times([call("cpu", x, backward=backward), call(REF, x, backward=backward)])
        b.curve.setdefault(("cpu", backward), []).append((L, tc))
        b.curve.setdefault((REF, backward), []).append((L, tx))
        b.rows.append(("curve", f"{'fwd+bwd' if backward else 'fwd'} T=S={L}",
                       f"cpu {tc * 1e3:.1f} ms, {REF} {tx * 1e3:.1f} ms: **{tx / tc:.2f}x**"))


def mask_rows(b: Bench, L: int):
    """Causal and local window against our own non-causal time."""
    x = bm.make_inputs(1, L, L, 8, 8, 64)
    full, causal, win = b.times([call("cpu", x), call("cpu", x, is_causal=True),
                                 call("cpu", x, local_window_size=(256, 0))])
    b.rows.append(("masks", f"fwd T=S={L}",
                   f"full {full * 1e3:.1f} ms; causal {causal * 1e3:.1f} ms "
                   f"(**{causal / full:.2f}x**); window (256, 0) {win * 1e3:.1f} ms "
                   f"({win / full:.3f}x)"))
    b.check(f"causal <= 0.55x non-causal (T=S={L})", f"{causal / full:.2f}x", causal / full <= 0.55)


def packed_rows(b: Bench, L: int, segments: int = 32):
    """A packed batch (T=S=L made of `segments` equal sequences, segment ids)
    against the same through jax.nn with the equivalent dense (T, S) mask."""
    import jax_mfa

    q, k, v, _ = bm.make_inputs(1, L, L, 8, 8, 64)
    ids = jnp.repeat(jnp.arange(segments, dtype=jnp.int32), L // segments)[None]
    dense = ids[0][:, None] == ids[0][None, :]
    ours = jax.jit(lambda q, k, v: jax_mfa.attention(
        q, k, v, query_segment_ids=ids, key_value_segment_ids=ids, implementation="cpu"))
    ref = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense))
    tc, tx = b.times([(ours, (q, k, v)), (ref, (q, k, v))])
    b.rows.append(("packed", f"fwd T=S={L}, {segments} segments",
                   f"cpu (segment ids) {tc * 1e3:.1f} ms, {REF} (dense mask) {tx * 1e3:.1f} ms: "
                   f"**{tx / tc:.1f}x**"))


def window_scaling_rows(b: Bench, lengths):
    inputs = [bm.make_inputs(1, L, L, 8, 8, 64) for L in lengths]
    times = b.times([call("cpu", x, local_window_size=(256, 0)) for x in inputs])
    per_row = [t / L * 1e6 for t, L in zip(times, lengths)]
    b.rows.append(("masks", "window (256, 0) vs length",
                   ", ".join(f"T=S={L}: {t * 1e3:.1f} ms ({pr:.2f} us/query row)"
                             for L, t, pr in zip(lengths, times, per_row))))
    growth = per_row[-1] / per_row[0]
    b.check("window 256: time per query row flat in S",
            f"{growth:.2f}x per row from S={lengths[0]} to {lengths[-1]}", growth < 1.3)


def head_dim_rows(b: Bench, L: int):
    ratios = {}
    for H in (64, 128, 256):
        x = bm.make_inputs(1, L, L, 8, 8, H)
        res = []
        for backward in (False, True):
            tc, tx = b.times([call("cpu", x, backward=backward), call(REF, x, backward=backward)])
            ratios[(H, backward)] = tx / tc
            res.append(f"{'fwd+bwd' if backward else 'fwd'} cpu {tc * 1e3:.1f} ms, {REF} "
                       f"{tx * 1e3:.1f} ms: **{tx / tc:.2f}x**")
        b.rows.append(("head dim", f"H={H}, T=S={L}", "; ".join(res)))
    for H in (128, 256):
        for backward in (False, True):
            r, r64 = ratios[(H, backward)], ratios[(64, backward)]
            b.check(f"H={H} {'fwd+bwd' if backward else 'fwd'} ahead of XLA as much as H=64",
                    f"{r:.2f}x vs {r64:.2f}x", r >= 0.95 * r64)


def dtype_rows(b: Bench, L: int):
    dts = (jnp.float32, jnp.float16, jnp.bfloat16)
    inputs = [bm.make_inputs(1, L, L, 8, 8, 64, dtype=dt) for dt in dts]
    for backward in (False, True):
        name = "fwd+bwd" if backward else "fwd"
        times = b.times([call("cpu", x, backward=backward) for x in inputs])
        for dt, t in zip(dts[1:], times[1:]):
            if backward:
                b.check(f"{jnp.dtype(dt).name} {name} no slower than float32",
                        f"{t / times[0]:.2f}x float32's time", t / times[0] <= 1.05)
            else:
                b.check(f"{jnp.dtype(dt).name} {name} >= 1.8x faster than float32",
                        f"{times[0] / t:.2f}x", times[0] / t >= 1.8)
        b.rows.append(("dtype", f"{name}, T=S={L}",
                       ", ".join(f"{jnp.dtype(dt).name} {t * 1e3:.1f} ms "
                                 f"(**{t / times[0]:.2f}x** float32's)"
                                 for dt, t in zip(dts, times))
                       + f" ({REF} rejects float16 on the CPU)"))
    sixteen_bit_paths_rows(b, L)


def with_env(env, fn):
    """fn with the environment variables of `env` set around each call (the
    kernels read their switches on every call)."""
    def wrapped(*args):
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)
        try:
            return jax.block_until_ready(fn(*args))
        finally:
            for name, value in saved.items():
                if value is None:
                    del os.environ[name]
                else:
                    os.environ[name] = value
    return wrapped


# 16-bit forward paths (cpp/cpu/cpu_bf16.h): environment of each.
SIXTEEN_BIT_PATHS = {
    "bfloat16": {"best": {}, "avx512-bf16": {"JAX_MFA_BF16_DOT": "avx512"},
                 "portable": {"JAX_MFA_BF16_DOT": "0"}},
    "float16": {"default": {}, "split": {"JAX_MFA_F16_SPLIT": "1"},
                "portable": {"JAX_MFA_F16_SPLIT": "0"}},
}


def sixteen_bit_paths_rows(b: Bench, L: int):
    """16-bit forwards on each tile-product path the CPU has, interleaved with
    float32's: bfloat16 on AMX-BF16 (best where present), AVX512-BF16 or the
    portable float path; float16 split into bfloat16 parts or portable."""
    calls, names = [call("cpu", bm.make_inputs(1, L, L, 8, 8, 64))], ["float32"]
    for dt, paths in SIXTEEN_BIT_PATHS.items():
        fn, args = call("cpu", bm.make_inputs(1, L, L, 8, 8, 64, dtype=getattr(jnp, dt)))
        for name, env in paths.items():
            calls.append((with_env(env, fn), args))
            names.append(f"{dt} {name}")
    times = b.times(calls)
    b.rows.append(("dtype", f"fwd per path, T=S={L}, H=64",
                   ", ".join(f"{n} {t * 1e3:.1f} ms" for n, t in zip(names, times))))


def accuracy_rows(b: Bench, L: int):
    """16-bit forward accuracy against a float64 reference computed from the
    same (rounded) inputs: jax_mfa's and torch's outputs, max and RMS error."""
    import numpy as np
    for dt in ("float16", "bfloat16"):
        q, k, v, do = bm.make_inputs(1, L, L, 8, 8, 64, dtype=getattr(jnp, dt))
        q64, k64, v64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (q, k, v))
        s = np.einsum("bqnh,bknh->bnqk", q64, k64) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v64)
        fn, args = call("cpu", (q, k, v, do))
        errs = {"jax_mfa": np.asarray(fn(*args).astype(jnp.float32), np.float64) - ref}
        if torch is not None:
            tq, tk, tv = (torch.from_numpy(np.array(a.astype(jnp.float32))).to(TORCH_DTYPES[dt])
                          .transpose(1, 2) for a in (q, k, v))
            with torch.no_grad():
                out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            errs["torch"] = out.transpose(1, 2).float().numpy().astype(np.float64) - ref
        text = {name: (np.abs(e).max(), np.sqrt(np.mean(e * e))) for name, e in errs.items()}
        b.rows.append(("accuracy", f"{dt} fwd, T=S={L}, H=64, error vs float64",
                       "; ".join(f"{name} max {mx:.2e}, RMS {rms:.2e}"
                                 for name, (mx, rms) in text.items())))
        if "torch" in text:
            b.check(f"{dt} fwd RMS error no worse than torch's",
                    f"{text['jax_mfa'][1]:.2e} vs {text['torch'][1]:.2e}",
                    text["jax_mfa"][1] <= text["torch"][1] * 1.05)


def decode_rows(b: Bench):
    for T in (1, 8):
        for S in (4096, 32768):
            x = bm.make_inputs(1, T, S, 8, 1, 64)
            tc, tx = b.times([call("cpu", x), call(REF, x)])
            b.rows.append(("decode", f"T={T}, S={S}, N=8, K=1, H=64",
                           f"cpu {tc * 1e3:.3f} ms, {REF} {tx * 1e3:.3f} ms: **{tx / tc:.2f}x**"))
            b.check(f"decode T={T} S={S} at least as fast as XLA", f"{tx / tc:.2f}x",
                    tx / tc >= 1.0)


def torch_call(q, k, v, do, *, backward=False, is_causal=False):
    """(function, ()) running torch.nn.functional.scaled_dot_product_attention
    on copies of the same inputs in torch's (B, heads, L, H) layout; GQA
    through enable_gqa. Returns None (torch's CPU ops are synchronous)."""
    import numpy as np

    def to_torch(a, grad=False):
        t = torch.from_numpy(np.array(a.astype(jnp.float32))).to(TORCH_DTYPES[a.dtype.name])
        return t.transpose(1, 2).contiguous().requires_grad_(grad)

    gqa = q.shape[2] != k.shape[2]
    tq, tk, tv = (to_torch(a, backward) for a in (q, k, v))
    tdo = to_torch(do)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fwd():
        with torch.no_grad():
            sdpa(tq, tk, tv, is_causal=is_causal, enable_gqa=gqa)

    def fwd_bwd():
        out = sdpa(tq, tk, tv, is_causal=is_causal, enable_gqa=gqa)
        torch.autograd.grad(out, (tq, tk, tv), tdo)

    return (fwd_bwd if backward else fwd), ()


TORCH_DTYPES = {}
if torch is not None:
    TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}


# Filters of the torch comparison (--dtypes, --passes): all by default.
TORCH_FILTER = {"dtypes": ("float32", "float16", "bfloat16"), "passes": ("fwd", "fwd+bwd")}


def log(message: str):
    """A line on stderr that the progress bars (if any) do not overwrite."""
    if hasattr(tqdm, "write"):
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


def torch_rows(b: Bench, lengths, head_dims, decode_len):
    """jax_mfa, XLA and torch side by side on the same inputs (interleaved):
    every dtype, head dim, length, causal or not, forward and forward+backward;
    decoding (T=1, GQA 8:1). XLA's column is empty for float16 (jax.nn rejects
    it on the CPU)."""
    if torch is None:
        b.notes.append("torch rows skipped: PyTorch is not installed (`pip install .[bench]`).")
        return
    torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count())
    b.notes.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU "
                   f"capability {torch.backends.cpu.get_cpu_capability()}.")
    dtypes = TORCH_FILTER["dtypes"]
    configs = [(dt, H, L, L, 8, 8, causal) for dt in dtypes
               for H in head_dims for L in lengths for causal in (False, True)]
    configs += [(dt, 64, 1, decode_len, 8, 1, False) for dt in dtypes]
    passes = [backward for backward in (False, True)
              if ("fwd+bwd" if backward else "fwd") in TORCH_FILTER["passes"]]
    for dt, H, T, S, N, K, causal in tqdm(configs, desc="torch rows", unit="case", leave=False):
        x = bm.make_inputs(1, T, S, N, K, H, dtype=getattr(jnp, dt))
        for backward in passes:
            calls = [call("cpu", x, backward=backward, is_causal=causal),
                     torch_call(*x, backward=backward, is_causal=causal)]
            if dt != "float16":
                calls.append(call(REF, x, backward=backward, is_causal=causal))
            t = b.times(calls) + [float("nan")]
            tc, tt, tx = t[0], t[1], t[2]
            name = ("decode T=1 S=%d N=8 K=1" % S if T == 1 else
                    f"T=S={T}{' causal' if causal else ''}")
            b.torch_table.append((dt, H, name, "fwd+bwd" if backward else "fwd", tc, tx, tt))
            # Each row as it is measured: a run cut short by a time limit keeps them.
            log(f"torch row: {dt} H={H} {name} {'fwd+bwd' if backward else 'fwd'}: jax_mfa "
                f"{tc * 1e3:.1f} ms, torch {tt * 1e3:.1f} ms ({tt / tc:.2f}x)")
            b.check(f"{dt} H={H} {name} {'fwd+bwd' if backward else 'fwd'} >= 1.1x torch",
                    f"{tt / tc:.2f}x", tt / tc >= 1.1)


def scaling_rows(b: Bench, L: int):
    """One thread (JAX_MFA_NUM_THREADS=1: the kernels then run on the calling
    thread only) against all usable cores, interleaved in the same process."""
    x = bm.make_inputs(1, L, L, 8, 8, 64)
    fn, args = call("cpu", x)

    def one_thread(*a):
        os.environ["JAX_MFA_NUM_THREADS"] = "1"
        try:
            return jax.block_until_ready(fn(*a))
        finally:
            del os.environ["JAX_MFA_NUM_THREADS"]

    one, both = b.times([(one_thread, args), (fn, args)])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    b.rows.append(("scaling", f"fwd T=S={L}",
                   f"1 thread {one * 1e3:.1f} ms, {cores} threads {both * 1e3:.1f} ms: "
                   f"**{one / both:.2f}x**"))
    b.check(f"{cores} threads >= 1.8x one thread (fwd T=S={L})", f"{one / both:.2f}x",
            one / both >= 1.8)


MEMORY_PROBE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    import jax, jax.numpy as jnp
    from jax_mfa import _benchmark as bm
    L = {L}
    q, k, v, do = bm.make_inputs(1, L, L, 8, 8, 64)
    f = bm.forward_and_backward(bm.attention_fn("cpu")).lower(q, k, v, do).compile()
    grads, growth, before = bm.peak_rss_during(f, q, k, v, do)
    grad_bytes = sum(g.size * g.dtype.itemsize for g in grads)
    print(growth - grad_bytes, before)
""")


def memory_rows(b: Bench, L: int):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(root=ROOT, L=L)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        b.rows.append(("memory", f"fwd+bwd T=S={L}", "probe failed: " + out.stderr[-300:]))
        return
    extra, before = (int(x) for x in out.stdout.split())
    b.rows.append(("memory", f"fwd+bwd T=S={L}, B=1, N=8, H=64, float32",
                   f"peak RSS beyond inputs and gradients: **{extra / 2**20:.0f} MiB** "
                   f"(process RSS before the call {before / 2**20:.0f} MiB)"))
    b.check(f"fwd+bwd T=S={L} peak < 1 GiB beyond inputs/grads", f"{extra / 2**20:.0f} MiB",
            extra < 2**30)


def plot(b: Bench, path: str):
    try:
        import matplotlib
    except ImportError:
        b.notes.append("plot skipped: matplotlib is not installed.")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, backward in zip(axes, (False, True)):
        for impl, style in (("cpu", "o-"), (REF, "s--")):
            pts = sorted(dict(b.curve.get((impl, backward), [])).items())
            if pts:
                ax.loglog([p[0] for p in pts], [p[1] * 1e3 for p in pts], style,
                          label="jax_mfa cpu" if impl == "cpu" else f"{REF} (XLA)", base=2)
        ax.set_title(("forward+backward" if backward else "forward") +
                     ", float32, B=1, N=8, H=64")
        ax.set_xlabel("T = S")
        ax.set_ylabel("time (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep (about a minute)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"),
                    help="directory for the plot and table")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--settle", type=float, default=0.02,
                    help="seconds of pause before each interleaved sample, at least (default "
                         "0.02; a quarter of the previous sample's time if longer; 0 with "
                         "--settle-ratio 0: none, to see what other libraries' threads cost)")
    ap.add_argument("--settle-ratio", type=float, default=0.25,
                    help="pause before a sample as a fraction of the previous one's time")
    ap.add_argument("--no-torch", action="store_true", help="skip the torch comparison")
    ap.add_argument("--torch-lengths", default=None,
                    help="T=S values of the torch comparison, comma-separated "
                         "(default 2048,4096; --quick: 1024)")
    ap.add_argument("--torch-head-dims", default=None,
                    help="head dims of the torch comparison (default 64,128; --quick: 64)")
    ap.add_argument("--only", default=None,
                    help="run only these steps, comma-separated: main, curve, masks, window, "
                         "head_dim, dtype, decode, scaling, memory, packed, accuracy, torch")
    ap.add_argument("--dtypes", default=None,
                    help="dtypes of the torch comparison, comma-separated (default "
                         "float32,float16,bfloat16)")
    ap.add_argument("--passes", default=None,
                    help="passes of the torch comparison: fwd, fwd+bwd or both (default)")
    args = ap.parse_args()
    for name in ("dtypes", "passes"):
        if getattr(args, name):
            chosen = tuple(getattr(args, name).split(","))
            unknown = set(chosen) - set(TORCH_FILTER[name])
            if unknown:
                ap.error(f"--{name}: unknown {sorted(unknown)}; expected some of "
                         f"{','.join(TORCH_FILTER[name])}")
            TORCH_FILTER[name] = chosen
    global torch
    if args.no_torch:
        torch = None
    os.makedirs(args.out, exist_ok=True)
    b = Bench(args.quick, 3 if args.quick else args.repeats, args.settle, args.settle_ratio)

    if args.quick:
        steps = [(main_rows, 1024), (curve_rows, 512), (mask_rows, 1024),
                 (window_scaling_rows, (1024, 2048)), (head_dim_rows, 512), (dtype_rows, 512),
                 (decode_rows,), (scaling_rows, 1024), (memory_rows, 4096), (packed_rows, 2048),
                 (accuracy_rows, 512), (torch_rows, (1024,), (64,), 8192)]
    else:
        steps = [(main_rows, 2048), (main_rows, 4096), (curve_rows, 512), (curve_rows, 1024),
                 (mask_rows, 4096), (window_scaling_rows, (2048, 4096, 8192)),
                 (head_dim_rows, 2048), (dtype_rows, 2048), (decode_rows,),
                 (scaling_rows, 4096), (memory_rows, 16384), (packed_rows, 8192),
                 (accuracy_rows, 1024), (torch_rows, (2048, 4096), (64, 128), 32768)]
    ints = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    steps = [(fn, *a) if fn is not torch_rows else
             (fn, ints(args.torch_lengths) if args.torch_lengths else a[0],
              ints(args.torch_head_dims) if args.torch_head_dims else a[1], a[2])
             for fn, *a in steps]
    if args.only:
        wanted = set(args.only.split(","))
        steps = [st for st in steps if st[0].__name__.removesuffix("_rows")
                 .replace("_scaling", "").replace("mask", "masks") in wanted]
    started = time.time()
    for fn, *a in tqdm(steps, desc="bench", unit="step"):
        fn(b, *a)

    lines = [f"Machine: {machine()}", "",
             f"Command: `python benchmarks/bench_cpu.py{''.join(' ' + a for a in sys.argv[1:])}` "
             f"({time.time() - started:.0f} s); medians of {b.repeats} after warm-up; "
             f"reference `{REF}` = jax.nn.dot_product_attention (XLA), float32 unless noted.",
             "", "| section | configuration | result |", "|---|---|---|"]
    lines += [f"| {s} | {c} | {r} |" for s, c, r in b.rows]
    if b.torch_table:
        lines += ["", "jax_mfa, XLA (jax.nn) and torch's fused CPU SDPA, same inputs, "
                  "interleaved (B=1, N=8; speed = other's time / jax_mfa's):", "",
                  "| dtype | H | case | pass | jax_mfa (ms) | XLA (ms) | torch (ms) "
                  "| vs XLA | vs torch |", "|---|---|---|---|---|---|---|---|---|"]
        for dt, H, name, pas, tc, tx, tt in b.torch_table:
            xla = "—" if tx != tx else f"{tx * 1e3:.1f}"
            vx = "—" if tx != tx else f"{tx / tc:.2f}x"
            lines.append(f"| {dt} | {H} | {name} | {pas} | {tc * 1e3:.1f} | {xla} | "
                         f"{tt * 1e3:.1f} | {vx} | **{tt / tc:.2f}x** |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {n} | {f} | {'yes' if ok else '**no**'} |" for n, f, ok in b.verdicts]
    png = os.path.join(args.out, "bench_cpu_quick.png" if args.quick else "bench_cpu.png")
    plotted = plot(b, png)
    lines += [""] + b.notes if b.notes else []
    table = "\n".join(lines)
    if plotted:
        table += f"\n\nPlot: `{os.path.relpath(png, ROOT)}`\n"
    with open(os.path.join(args.out, "bench_cpu.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
