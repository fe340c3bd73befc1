"""Metal benchmark: jax_mfa on the Apple GPU against MLX and jax.nn on the CPU.

On a Mac (Apple-silicon GPU, jax_mfa built with its Metal backend):

    python benchmarks/bench_metal.py                 # the full sweep (tens of minutes)
    python benchmarks/bench_metal.py --quick         # a few minutes

compares jax_mfa's ``metal`` implementation with MLX's fused
``mx.fast.scaled_dot_product_attention`` (when MLX is installed; its backward is
MLX's unfused autodiff) and with ``jax.nn.dot_product_attention`` on JAX's CPU
backend: forward and forward+backward, float16 / bfloat16 / float32, head dims
64 and 128, T = S from 1024 to 16384, causal or not, and decode (T = 1, S up
to 65536). It reports times, TFLOP/s (dense-equivalent flops, causal counted
as the unmasked half) and the fraction of the chip's peak FP32 rate, from the
published GPU core count and clock of the chip (PEAKS below; override with
--peak-tflops), and writes a Markdown table and a PNG plot to --out.

Anywhere, ``--implementation metal-emulated --tiny`` runs the same script on
tiny shapes through the Metal emulator (tests/test_bench_metal.py does, in CI),
so the script itself stays tested. Figures from the emulator are not
performance figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_mfa  # noqa: E402
from jax_mfa import _benchmark as bm  # noqa: E402

REF = bm.REFERENCE  # jax.nn.dot_product_attention on JAX's CPU backend
MLX = "mlx"

# Apple-silicon GPUs: (GPU cores of the usual configuration, GPU clock in GHz)
# as published in Apple's specifications and public measurements (clocks of
# M3/M4 are reported figures, not Apple's). Peak FP32 = cores x 128 lanes x
# 2 flops (FMA) x clock; Apple GPUs run FP16 arithmetic at the same rate.
# The core count is read from the machine when possible (binned variants).
PEAKS = {
    "M1": (8, 1.278), "M1 Pro": (16, 1.296), "M1 Max": (32, 1.296), "M1 Ultra": (64, 1.296),
    "M2": (10, 1.398), "M2 Pro": (19, 1.398), "M2 Max": (38, 1.398), "M2 Ultra": (76, 1.398),
    "M3": (10, 1.38), "M3 Pro": (18, 1.38), "M3 Max": (40, 1.38), "M3 Ultra": (80, 1.38),
    "M4": (10, 1.47), "M4 Pro": (20, 1.47), "M4 Max": (40, 1.47),
}


def peak_tflops(chip: str, cores: int | None) -> float | None:
    """Peak FP32 TFLOP/s of `chip` ("Apple M2 Pro", ...) with `cores` GPU cores."""
    name = chip.replace("Apple", "").strip()
    if name not in PEAKS:
        return None
    default_cores, ghz = PEAKS[name]
    return (cores or default_cores) * 128 * 2 * ghz / 1e3


def gpu_description() -> tuple[str, int | None]:
    """(GPU name, GPU core count) on a Mac; the CPU machine elsewhere."""
    from jax_mfa import _native

    ok, _, device = _native.metal_diagnostics()
    cores = None
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["system_profiler", "SPDisplaysDataType"], capture_output=True,
                                 text=True, timeout=60).stdout
            for line in out.splitlines():
                if "Total Number of Cores" in line:
                    cores = int(line.split(":")[1])
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return (device if ok else platform.machine()), cores


@dataclasses.dataclass
class Case:
    backward: bool
    dtype: str
    H: int
    T: int
    S: int
    causal: bool
    B: int = 1
    N: int = 8

    def flops(self) -> float:
        dense = bm.attention_flops(self.B, self.T, self.S, self.N, self.H, backward=self.backward)
        if self.causal:  # pairs (i, j) with j <= i, top-left aligned
            kept = sum(min(i + 1, self.S) for i in range(self.T))
            dense *= kept / (self.T * self.S)
        return dense

    def label(self) -> str:
        return (f"{'fwd+bwd' if self.backward else 'fwd'} {self.dtype} H={self.H} "
                f"T={self.T} S={self.S}{' causal' if self.causal else ''}")


def sweep(args) -> list[Case]:
    if args.tiny:
        dtypes, heads, lengths, decode = ("float32", "float16"), (16,), (16, 40), (64,)
        n = 2
    elif args.quick:
        dtypes, heads, lengths, decode = ("float16", "float32"), (64,), (1024, 4096), (4096, 65536)
        n = 8
    else:
        dtypes = ("float16", "bfloat16", "float32")
        heads, lengths, decode = (64, 128), (1024, 2048, 4096, 8192, 16384), (4096, 16384, 65536)
        n = 8
    cases = []
    for backward in (False, True):
        for dtype in dtypes:
            for H in heads:
                for L in lengths:
                    for causal in (False, True):
                        cases.append(Case(backward, dtype, H, L, L, causal, N=n))
                for S in decode:
                    cases.append(Case(backward, dtype, H, 1, S, False, N=n))
    return cases


def mlx_call(case: Case, inputs):
    """(fn, ()) timing MLX's fused attention on the same inputs, or None."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    q, k, v, do = (mx.array(np.asarray(x.astype(jnp.float32)).transpose(0, 2, 1, 3)).astype(
        getattr(mx, case.dtype)) for x in inputs)
    scale = 1.0 / math.sqrt(case.H)
    mask = "causal" if case.causal else None  # same as top-left when T == S

    def attend(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)

    if case.backward:
        grad = mx.grad(lambda q, k, v: (attend(q, k, v) * do).sum(), argnums=(0, 1, 2))

        def run():
            out = grad(q, k, v)
            mx.eval(out)
            return out
    else:
        def run():
            out = attend(q, k, v)
            mx.eval(out)
            return out
    return run, ()


def measure(case: Case, implementation: str, args) -> dict[str, float | None]:
    """Median seconds per implementation (None: skipped) on one case."""
    inputs = bm.make_inputs(case.B, case.T, case.S, case.N, case.N, case.H,
                            getattr(jnp, case.dtype))
    calls, names = [], []
    names.append(implementation)
    calls.append(bm.attention_call(implementation, *inputs, backward=case.backward,
                                   is_causal=case.causal))
    # jax.nn materialises (B, N, T, S) scores on the CPU: only up to a size.
    # XLA's CPU dot rejects 16-bit operands: jax.nn gets float32 copies.
    if case.T * case.S <= args.max_reference_elements:
        names.append(REF)
        calls.append(bm.attention_call(REF, *(x.astype(jnp.float32) for x in inputs),
                                       backward=case.backward, is_causal=case.causal))
    if implementation == "metal":
        mlx = mlx_call(case, inputs)
        if mlx is not None:
            names.append(MLX)
            calls.append(mlx)
    times = dict(zip(names, bm.median_times(calls, repeats=args.repeats,
                                            min_time=0 if args.tiny else 0.05)))
    return {n: times.get(n) for n in (implementation, MLX, REF)}


def table(rows, implementation: str, peak: float | None) -> str:
    names = [implementation, MLX, REF]
    head = ("| case | " + " | ".join(f"{n} ms" for n in names) + " | " +
            " | ".join(f"{n} TFLOP/s" for n in names) +
            f" | {implementation} % of peak | speed-up vs {REF} | vs {MLX} |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ms(t):
        return "—" if t is None else f"{t * 1e3:.3f}"

    def rate(case, t):
        return "—" if t is None else f"{case.flops() / t / 1e12:.3g}"

    for case, times in rows:
        mine = times[implementation]
        frac = "—" if peak is None else f"{100 * case.flops() / mine / 1e12 / peak:.1f}"
        ratio = [("—" if times[o] is None else f"{times[o] / mine:.2f}x") for o in (REF, MLX)]
        lines.append(f"| {case.label()} | " + " | ".join(ms(times[n]) for n in names) + " | " +
                     " | ".join(rate(case, times[n]) for n in names) +
                     f" | {frac} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def plot(rows, implementation: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, backward in zip(axes, (False, True)):
        series: dict[str, list[tuple[int, float]]] = {}
        for case, times in rows:
            if case.backward != backward or case.causal or case.T == 1:
                continue
            for name, t in times.items():
                if t is not None:
                    key = f"{name} {case.dtype} H={case.H}"
                    series.setdefault(key, []).append((case.T, case.flops() / t / 1e12))
        for key, pts in sorted(series.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if implementation in key
                    else "s--", label=key)
        ax.set_xscale("log", base=2)
        ax.set_title("forward+backward" if backward else "forward")
        ax.set_xlabel("T = S")
        ax.set_ylabel("TFLOP/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--implementation", default="metal", choices=["metal", "metal-emulated"])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few shapes (minutes)")
    size.add_argument("--tiny", action="store_true", help="tiny shapes (CI, with metal-emulated)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the GPU's peak FP32 TFLOP/s (default: from PEAKS and the chip)")
    ap.add_argument("--max-reference-elements", type=int, default=4096 * 4096,
                    help="largest T*S timed with jax.nn on the CPU (it materialises the scores)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.repeats = 1
    if args.implementation not in jax_mfa.available_implementations():
        print(f"implementation {args.implementation!r} is not available here: "
              f"{jax_mfa.implementation_diagnostics().get(args.implementation)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)

    gpu, cores = gpu_description()
    peak = args.peak_tflops
    if peak is None and args.implementation == "metal":
        peak = peak_tflops(gpu, cores)
    started = time.time()
    rows = []
    for case in sweep(args):
        rows.append((case, measure(case, args.implementation, args)))
        print(f"{case.label()}: " + ", ".join(f"{n} {t * 1e3:.3f} ms" for n, t in
                                              rows[-1][1].items() if t is not None), flush=True)
    tag = "_tiny" if args.tiny else "_quick" if args.quick else ""
    png = os.path.join(args.out, f"bench_metal{tag}.png")
    plot(rows, args.implementation, png)
    header = [
        f"GPU: {gpu}" + (f", {cores} cores" if cores else "") +
        (f", peak {peak:.2f} TFLOP/s FP32" if peak else ", peak unknown") +
        f"; JAX {jax.__version__} ({jax.default_backend()}); {platform.platform()}",
        "",
        f"Command: `python benchmarks/bench_metal.py --implementation {args.implementation}"
        f"{' --tiny' if args.tiny else ' --quick' if args.quick else ''}` "
        f"({time.time() - started:.0f} s); medians of {args.repeats}; B=1; "
        f"{REF} = jax.nn.dot_product_attention on the CPU (in float32 for 16-bit cases: "
        f"XLA's CPU dot rejects them); {MLX} = "
        "mx.fast.scaled_dot_product_attention (backward: MLX autodiff); — = not run.",
        "",
        table(rows, args.implementation, peak),
        "",
        f"Plot: `{os.path.relpath(png, ROOT) if png.startswith(ROOT) else png}`",
    ]
    text = "\n".join(header) + "\n"
    with open(os.path.join(args.out, f"bench_metal{tag}.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
