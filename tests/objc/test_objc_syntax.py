"""Syntax and type check of the Objective-C++ Metal host code on any machine.

Every .mm file under cpp/ is checked with clang against declaration-only
stubs of Foundation and Metal (tests/objc/stubs, written from Apple's public
documentation): selectors, argument types, ARC ownership rules and the C++ all
get checked, though nothing is linked or run. A planted misspelled selector must
fail, proving the stubs are strict enough to catch one.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUBS = pathlib.Path(__file__).resolve().parent / "stubs"
CLANG = shutil.which("clang") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CLANG is None, reason="clang is not installed")

MM_FILES = sorted((ROOT / "cpp").rglob("*.mm"))


def clang_check(path: pathlib.Path) -> subprocess.CompletedProcess:
    cmd = [
        CLANG, "-fsyntax-only", "-x", "objective-c++", "-fobjc-arc", "-fblocks",
        "-fobjc-runtime=macosx-13.0", "-std=c++17", "-Werror", "-Wall",
        f"-I{STUBS}", f"-I{ROOT / 'cpp'}", "-DJAX_MFA_HAS_METAL=1", str(path),
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_there_is_objective_cpp():
    assert any(p.name == "metal_backend.mm" for p in MM_FILES)


@pytest.mark.parametrize("path", MM_FILES, ids=[p.name for p in MM_FILES])
def test_mm_compiles_against_stubs(path):
    r = clang_check(path)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("good,bad", [
    ("[last waitUntilCompleted]", "[last waitUntilComplete]"),
    ("newBufferWithBytesNoCopy:ptr", "newBufferWithBytesNoCopi:ptr"),
    ("[encoder endEncoding]", "[encoder endEncodng]"),
])
def test_planted_misspelled_selector_fails(tmp_path, good, bad):
    src = (ROOT / "cpp" / "metal_host" / "metal_backend.mm").read_text()
    assert good in src
    planted = tmp_path / "metal_backend_planted.mm"
    planted.write_text(src.replace(good, bad, 1))
    r = clang_check(planted)
    assert r.returncode != 0, "a misspelled selector was accepted"
    assert bad.split()[-1].split(":")[0].rstrip("]") in r.stderr
