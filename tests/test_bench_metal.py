"""benchmarks/bench_metal.py runs (tiny shapes, the emulated Metal path) and
writes its Markdown table and PNG plot; its peak table gives known figures."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import jax_mfa

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_metal.py"


@pytest.mark.skipif("metal-emulated" not in jax_mfa.available_implementations(),
                    reason="the metal-emulated backend is not built")
def test_bench_metal_runs_on_tiny_shapes(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, str(SCRIPT), "--implementation", "metal-emulated",
                        "--tiny", "--out", str(tmp_path)], capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = (tmp_path / "bench_metal_tiny.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| fwd")]
    # 2 dtypes x (2 lengths x causal or not + 1 decode) x 2 passes.
    assert len(rows) == 20, table
    assert any("fwd+bwd float16" in r and "T=1 S=64" in r for r in rows)
    for row in rows:
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert float(cells[1]) > 0 and float(cells[3]) > 0  # metal-emulated and jax.nn times
    assert (tmp_path / "bench_metal_tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_published_peaks():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_metal
    finally:
        sys.path.remove(str(SCRIPT.parent))
    # M1: 8 cores x 128 lanes x 2 flops x 1.278 GHz.
    assert bench_metal.peak_tflops("Apple M1", None) == pytest.approx(2.617, abs=1e-3)
    assert bench_metal.peak_tflops("Apple M2 Max", 30) == pytest.approx(30 * 256 * 1.398 / 1e3)
    assert bench_metal.peak_tflops("Some GPU", 8) is None
