"""The Metal launcher's decisions, tested without a Mac.

cpp/metal_host/host_policy.h and the launch plan hold every decision of the
Objective-C++ launcher that does not need Metal (device choice, zero-copy page
regions, the pool's byte budget, command buffers in flight, per-(dtype, head
bucket) libraries, the dK/dV serial-work split). host_policy_test.cc unit-tests
them; this file builds and runs it, and checks that the macros each library is
compiled with select exactly its kernels from metal/attention.metal.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CXX = shutil.which("g++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    out = tmp_path_factory.mktemp("host") / "host_policy_test"
    cmd = [CXX, "-std=c++17", "-O1", "-Wall", "-Werror", f"-I{ROOT / 'cpp'}",
           str(ROOT / "tests" / "host" / "host_policy_test.cc"),
           str(ROOT / "cpp" / "metal_host" / "host_policy.cc"),
           str(ROOT / "cpp" / "metal_host" / "attention_plan.cc"), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return out


def test_host_policy_unit_tests(binary):
    r = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "all host policy tests passed" in r.stdout


def _instantiated(macros: list[str]) -> set[str]:
    """Host names metal/attention.metal instantiates under `macros`."""
    r = subprocess.run([CXX, "-E", "-x", "c++", "-std=c++17", f"-I{ROOT / 'metal'}",
                        f"-I{ROOT / 'cpp' / 'metal_emulator' / 'msl'}", f"-I{ROOT / 'cpp'}",
                        *macros, str(ROOT / "metal" / "attention.metal")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    names = set()
    for m in re.finditer(r'KernelRegistrar\s+\w+\(((?:\s*"[^"]*")+)', r.stdout):
        names.add("".join(re.findall(r'"([^"]*)"', m.group(1))))
    return names


def test_each_library_compiles_exactly_its_kernels(binary):
    lines = subprocess.run([str(binary), "--libraries"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    assert len(lines) == 3 * 31 * 2  # dtypes x head buckets x GPU families
    every = set()
    for index, line in enumerate(lines):
        words = line.split()
        macros = [w for w in words if w.startswith("-D")]
        kernels = {w for w in words if not w.startswith("-D")}
        assert len(kernels) == 6
        every |= kernels
        # Every bucket's switch once (float16, the family alternating with the
        # bucket), and one bucket (64) of every type and family: the switches
        # are independent, and each preprocessor run costs a fraction of a second.
        bucket, family = divmod(index % (31 * 2), 2)
        if ("-DJAX_MFA_METAL_DTYPES=2" in macros and family == bucket % 2) or \
                any("_h64_" in k for k in kernels):
            assert _instantiated(macros) == kernels, line
    # Without the switches: exactly the kernels of every library (3 kernels x
    # 3 dtypes x 31 buckets x 2 families, the decode partial kernels of 3 dtypes
    # x 31 buckets, 3 merge kernels and 3 split-group dK/dV reductions).
    everything = _instantiated([])
    assert everything == every
    assert len(everything) == 558 + 93 + 3 + 3
