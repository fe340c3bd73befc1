"""Type check of the Objective-C++ Metal host code on any machine.

Every .mm file under cpp/ is compiled (-fsyntax-only, -Werror) by clang for
arm64 macOS at the declared deployment target (tests/objc/darwin.py) against
the stub framework headers (tests/objc/stubs): selectors, argument types, ARC
ownership, availability against the deployment target, and the C++ all get
checked, though nothing is linked or run. Controls that must fail: misspelled
selectors, and API newer than the deployment target used without @available.
"""

from __future__ import annotations

import subprocess

import pytest

from darwin import DEPLOYMENT_TARGET, ROOT, objcxx_command, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

MM_FILES = sorted((ROOT / "cpp").rglob("*.mm"))
BACKEND = ROOT / "cpp" / "metal_host" / "metal_backend.mm"


def clang_check(path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run(objcxx_command(path, f"-I{BACKEND.parent}", *extra),
                          capture_output=True, text=True, timeout=300)


def planted(tmp_path, good: str, bad: str):
    src = BACKEND.read_text()
    assert good in src, good
    path = tmp_path / "metal_backend_planted.mm"
    path.write_text(src.replace(good, bad, 1))
    return path


def test_there_is_objective_cpp():
    assert BACKEND in MM_FILES


@pytest.mark.parametrize("path", MM_FILES, ids=[p.name for p in MM_FILES])
def test_mm_compiles_against_stubs(path):
    r = clang_check(path)
    assert r.returncode == 0, r.stderr


def test_stubs_follow_the_arm64_sdk(tmp_path):
    # BOOL is bool on arm64 macOS, nil is nullptr in C++11, OR-ed options are
    # plain integers (NS_OPTIONS: integer typedef plus anonymous enum).
    probe = tmp_path / "probe.mm"
    probe.write_text(
        "#import <Metal/Metal.h>\n#include <type_traits>\n"
        "static_assert(std::is_same<BOOL, bool>::value, \"BOOL\");\n"
        "static_assert(std::is_same<decltype(nil), std::nullptr_t>::value, \"nil\");\n"
        "static_assert(std::is_same<MTLResourceOptions, NSUInteger>::value, \"options\");\n"
        "MTLResourceOptions both = MTLResourceStorageModeShared | MTLResourceStorageModeShared;\n")
    r = clang_check(probe)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("good,bad", [
    ("[cb waitUntilCompleted]", "[cb waitUntilComplete]"),
    ("newBufferWithBytesNoCopy:reinterpret_cast", "newBufferWithBytesNoCopi:reinterpret_cast"),
    ("[encoder endEncoding]", "[encoder endEncodng]"),
])
def test_planted_misspelled_selector_fails(tmp_path, good, bad):
    r = clang_check(planted(tmp_path, good, bad))
    assert r.returncode != 0, "a misspelled selector was accepted"
    assert bad.split()[-1].split(":")[0].rstrip("]") in r.stderr


@pytest.mark.parametrize("good,bad,api", [
    # The macOS 15 math-mode API without its @available check.
    ("if (@available(macOS 15.0, *)) {", "if (true) {", "mathMode"),
    # The macOS 14 GPU family without its @available check.
    ("if (@available(macOS 14.0, *)) d.apple9", "if (true) d.apple9", "MTLGPUFamilyApple9"),
])
def test_api_newer_than_the_deployment_target_fails(tmp_path, good, bad, api):
    r = clang_check(planted(tmp_path, good, bad))
    assert r.returncode != 0, f"{api} accepted at macOS {DEPLOYMENT_TARGET} without @available"
    assert "only available on macOS" in r.stderr and api in r.stderr
    # ... and is accepted once the deployment target is new enough.
    newer = planted(tmp_path, good, bad)
    r = subprocess.run(objcxx_command(newer, f"-I{BACKEND.parent}", "-mmacos-version-min=15.0"),
                       capture_output=True, text=True, timeout=300)
    assert "only available on macOS" not in r.stderr, r.stderr
