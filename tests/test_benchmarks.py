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
