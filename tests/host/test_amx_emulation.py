"""AMX-BF16 tile products (cpp/cpu/cpu_bf16.cc) tested on CPUs without AMX.

amx_emulation_test.cc includes cpu_bf16.cc with the tile instructions
replaced by a scalar emulation and checks the products (operands copied into
tiles per product, and B operands copied into tile layout once) against a
double reference. The operand copies are AVX-512 code, so the CPU needs
AVX-512 (F and BW); the AMX path itself runs in tests/test_cpu_kernels.py on
CPUs that have it.
"""

from __future__ import annotations

import pathlib
import platform
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("clang++")


def _avx512bw() -> bool:
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " avx512bw" in flags


pytestmark = [
    pytest.mark.skipif(CXX is None, reason="no C++ compiler"),
    pytest.mark.skipif(platform.machine() != "x86_64" or platform.system() != "Linux",
                       reason="AMX code is built for x86-64 Linux only"),
    pytest.mark.skipif(not _avx512bw(), reason="the tile copies need AVX-512 F and BW"),
]


def test_amx_products_on_the_emulated_tiles(tmp_path):
    out = tmp_path / "amx_emulation_test"
    cmd = [CXX, "-std=c++17", "-O1", f"-I{ROOT / 'cpp'}",
           str(ROOT / "tests" / "host" / "amx_emulation_test.cc"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all AMX emulation tests passed" in r.stdout
