"""benchmarks/bench_gpu.py runs (with --smoke: tiny shapes, on the CPU here;
the real figures come from a GPU machine)."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_smoke():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_gpu.py"),
                             "--smoke"], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "feature grid: OK" in result.stdout, result.stdout[-3000:]
    assert "| 64 | fwd+bwd |" in result.stdout


def test_median_times_settles_between_interleaved_calls():
    """Interleaved samples start `settle` seconds after the previous call
    ended (other libraries' spinning threads go idle), and the pause is not
    part of the timed samples."""
    import time

    from jax_mfa._benchmark import median_times

    starts, ends = [], []

    def fn():
        starts.append(time.perf_counter())
        ends.append(time.perf_counter())
        return 0

    settle = 0.03
    times = median_times([(fn, ()), (fn, ())], repeats=3, warmup=0, min_time=0, settle=settle)
    assert max(times) < settle
    timed_starts, timed_ends = starts[2:], ends[2:]  # after the calibration calls
    gaps = [s - e for s, e in zip(timed_starts[1:], timed_ends[:-1])]
    assert len(gaps) == 5 and min(gaps) >= settle


def test_median_times_settles_longer_after_long_calls():
    """After a long sample the pause is settle_ratio times its duration (what
    a long XLA call leaves behind slows whatever runs next), and short calls
    keep the short pause."""
    import time

    from jax_mfa._benchmark import median_times

    events = []

    def slow():
        events.append(("slow", time.perf_counter()))
        time.sleep(0.2)
        events.append(("end", time.perf_counter()))

    def fast():
        events.append(("fast", time.perf_counter()))
        events.append(("end", time.perf_counter()))

    median_times([(slow, ()), (fast, ())], repeats=2, warmup=0, min_time=0, settle=0.01,
                 settle_ratio=0.5)
    timed = events[4:]  # after the calibration calls
    gaps = {(timed[i - 2][0], timed[i][0]): timed[i][1] - timed[i - 1][1]
            for i in range(2, len(timed), 2)}
    assert gaps[("slow", "fast")] >= 0.1  # half of the slow call's 0.2 s
    assert 0.01 <= gaps[("fast", "slow")] < 0.1


def test_amx_micro_builds_and_agrees():
    """benchmarks/amx_micro.cc (the AMX forward's inner loop, timed) compiles
    against the kernels' headers; on a CPU with AMX-BF16 it also runs (a small
    size) and its arrangements of the products give the same output."""
    import platform
    import shutil

    import pytest

    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None or platform.machine() != "x86_64" or platform.system() != "Linux":
        pytest.skip("needs a C++ compiler on x86-64 Linux (AMX code)")
    exe = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"amx_micro_{os.getpid()}")
    cpu = os.path.join(REPO, "cpp", "cpu")
    build = subprocess.run([cxx, "-O1", "-std=c++17", f"-I{os.path.join(REPO, 'cpp')}",
                            os.path.join(REPO, "benchmarks", "amx_micro.cc"),
                            os.path.join(cpu, "cpu_simd.cc"), os.path.join(cpu, "cpu_bf16.cc"),
                            "-o", exe], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    try:
        run = subprocess.run([exe, "64", "512"], capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(exe)
    assert run.returncode == 0, run.stdout + run.stderr
    if "needs AMX-BF16" in run.stdout:
        return  # built; nothing to run on this CPU
    assert "MISMATCH" not in run.stdout and run.stdout.count("worst relative difference") == 3, run.stdout
