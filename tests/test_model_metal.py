"""benchmarks/model_metal.py: the cost model on hand-made profiles, and the script on a tiny configuration."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import model_metal as mm  # noqa: E402


def test_params_layout_matches_the_host():
    # attention_plan.cc static_asserts sizeof(AttentionParams); the parsed layout must agree.
    plan = (ROOT / "cpp" / "metal_host" / "attention_plan.cc").read_text()
    import re

    expr = re.search(r"sizeof\(AttentionParams\) == ([0-9 *+]+),", plan).group(1)
    assert mm.params_dtype().itemsize == eval(expr)  # noqa: S307 (digits, * and + only)


def test_pipes_from_published_throughputs():
    counts = {"simdgroup_matrix_multiply_accumulate": 1017, "exp2": 128 * 10, "simd_shuffles": 4,
              "threadgroup_bytes_read": 640, "device_bytes_read": 320}
    p = mm.pipe_cycles(counts, "apple7")
    assert p["matrix"] == pytest.approx(1017 * 512 / 101.7)
    assert p["complex"] == pytest.approx(10 * 4.00)  # one 32-lane EXP2 per cycle per core
    assert p["simd"] == pytest.approx(4 * 2.04 / 4)
    assert p["threadgroup"] == pytest.approx(10)
    assert p["device"] == pytest.approx(10)
    assert p["memory issue"] == 0
    # Multiply-accumulates with both factors 16-bit at the FFMA16 rate; loads and stores one issue
    # cycle per simdgroup instruction (32 lane accesses) on one of 4 schedulers.
    p = mm.pipe_cycles({"simdgroup_matrix_multiply_accumulate": 300,
                        "simdgroup_matrix_multiply_accumulate_16bit": 100,
                        "device_accesses": 32 * 6, "threadgroup_accesses": 32 * 2}, "apple9")
    assert p["matrix"] == pytest.approx(200 * 512 / 101.7 + 100 * 512 / 102.5)
    assert p["memory issue"] == pytest.approx(8 / 4)


def test_dispatch_cycles_rules():
    k = mm.KernelCost("k", {"simdgroup_matrix_multiply_accumulate": 0}, {"device_bytes_read": 32 * 100}, 4)
    cores = mm.rate("cores", "apple9")
    # Many equal threadgroups: spread over the cores.
    c, _ = mm.dispatch_cycles([mm.Dispatch(k, np.full(int(cores) * 10, 1.0))], "apple9", 0)
    assert c == pytest.approx(100 * 10)
    # One threadgroup of 2 simdgroups alone: twice its own cost (2 of 4 schedulers).
    k2 = mm.KernelCost("k", {}, {"device_bytes_read": 32 * 100}, 2)
    c, _ = mm.dispatch_cycles([mm.Dispatch(k2, np.array([1.0]))], "apple9", 0)
    assert c == pytest.approx(200)
    # The DRAM floor.
    c, _ = mm.dispatch_cycles([mm.Dispatch(k2, np.array([0.0]))], "apple9", 7.7 * cores * 50)
    assert c == pytest.approx(50)


def test_instruction_model():
    assert mm.mfa_instructions("fwd", 64, 10, 10, False, 2, 3) == 133 * 100 * 6
    assert mm.mfa_instructions("dkdv", 64, 10, 10, True, 1, 1) == 261 * 55


def test_script_on_a_tiny_configuration():
    """Our forward at D = 64, T = S = 256 on apple9, without MLX (its compile is the slow part):
    the table is printed, and the exit status says whether a target was missed."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "model_metal.py"), "--family", "apple9",
                           "--heads", "64", "--lengths", "256", "--passes", "fwd", "--no-mlx"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout
    assert "MODELLED" in out and "not measurements" in out, out + proc.stderr
    rows = [line for line in out.splitlines() if line.startswith("| apple9 | fwd | 64 | 256 |")]
    assert len(rows) == 2, out
    assert proc.returncode == (1 if "TARGETS MISSED" in out else 0), out + proc.stderr
