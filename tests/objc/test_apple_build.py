"""The CMake Apple branch configures, generates and compiles on Linux.

Configures the real tree with JAX_MFA_APPLE_STUBS (the Apple branch forced,
framework headers from tests/objc/stubs) and clang targeting arm64 macOS at
the declared deployment target, then compiles every Apple-only source to an
object file: the Objective-C++ launcher (with -fobjc-arc), the generated
embedded-MSL source and the Accelerate branch of the CPU BLAS. Linking needs
Apple's SDK and is skipped. A broken Apple branch (CMake or source) fails here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from darwin import ROOT, STUBS, darwin_flags, skip_reason

pytestmark = [
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
    pytest.mark.skipif(shutil.which("ninja") is None or shutil.which("cmake") is None,
                       reason="cmake and ninja are needed"),
]

MACHO_ARM64 = bytes.fromhex("cffaedfe0c000001")  # MH_MAGIC_64, CPU_TYPE_ARM64 (little endian)


CPU_SOURCES = ["cpu_blas.cc", "cpu_simd.cc", "cpu_bf16.cc", "cpu_f32_tiles.cc"]


@pytest.fixture(scope="module")
def apple_build(tmp_path_factory):
    build = tmp_path_factory.mktemp("apple-branch")
    clang = shutil.which("clang++")
    flags = " ".join(darwin_flags())
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
        f"-DJAX_MFA_APPLE_STUBS={STUBS}", f"-DPython_EXECUTABLE={sys.executable}",
        f"-DCMAKE_CXX_COMPILER={clang}", f"-DCMAKE_OBJCXX_COMPILER={clang}",
        f"-DCMAKE_CXX_FLAGS={flags}", f"-DCMAKE_OBJCXX_FLAGS={flags}",
        # No Darwin linker here: compiler checks build static libraries, and
        # the (never linked) module needs no install-time RPATH rewrite.
        "-DCMAKE_TRY_COMPILE_TARGET_TYPE=STATIC_LIBRARY", "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
        "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON",
    ]
    r = subprocess.run(configure, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Generate step failed" not in r.stdout + r.stderr
    # The CPU kernels' files with x86-only branches too: their portable
    # branches must compile for arm64 macOS.
    targets = ["jax_mfa_metal_objc"] + [f"cpp/cpu/CMakeFiles/jax_mfa_cpu.dir/{name}.o"
                                        for name in CPU_SOURCES]
    r = subprocess.run(["cmake", "--build", str(build), "--target", *targets],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    return build


def _object(build, name):
    found = list(build.rglob(name))
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


@pytest.mark.parametrize("name", ["metal_backend.mm.o", "metal_source.cc.o"]
                         + [f"{name}.o" for name in CPU_SOURCES])
def test_apple_only_sources_compile_to_arm64_macos_objects(apple_build, name):
    assert _object(apple_build, name).read_bytes()[:8] == MACHO_ARM64


def test_accelerate_branch_was_compiled(apple_build):
    # The Accelerate branch calls cblas_sgemm directly (the Linux branch loads
    # OpenBLAS by name at run time and has no such reference).
    assert b"_cblas_sgemm" in _object(apple_build, "cpu_blas.cc.o").read_bytes()


def test_objective_cpp_compiled_with_arc_and_apple_runtime(apple_build):
    commands = json.loads((apple_build / "compile_commands.json").read_text())
    mm = [c["command"] for c in commands if c["file"].endswith("metal_backend.mm")]
    assert len(mm) == 1
    assert "-fobjc-arc" in mm[0] and "apple-macos" in mm[0]
    # The embedded MSL carries every kernel source file.
    source = _object(apple_build, "metal_source.cc").read_text()
    for f in ("attention_params.h", "attention_kernels.h", "attention.metal"):
        assert (ROOT / "metal" / f).read_text().splitlines()[0] in source
