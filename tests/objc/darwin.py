"""Compiling Apple-only sources on Linux: clang with a Darwin target.

One place for the flags the Objective-C++ checks share (the direct syntax
check, the Apple-data check and the CMake build of the Apple branch).

The target is arm64 macOS at DEPLOYMENT_TARGET, so clang applies Apple's
rules: BOOL is bool, availability attributes are enforced against the
deployment target, the Objective-C runtime is Apple's. The framework headers
are stubs (tests/objc/stubs); the C and C++ standard headers are the host's
(libc++ over glibc), with the two adjustments glibc needs under a non-Linux
target: its word-size switch keys on the host architecture macro, and its
`__nonnull(params)` macro collides with clang's Darwin nullability keyword.
"""

from __future__ import annotations

import functools
import pathlib
import platform
import shutil
import subprocess

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STUBS = HERE / "stubs"

# The oldest macOS jax_mfa's Metal backend supports (README, docs/metal.md,
# CMAKE_OSX_DEPLOYMENT_TARGET in CMakeLists.txt).
DEPLOYMENT_TARGET = "13.0"

CLANG = shutil.which("clang++")


@functools.cache
def skip_reason() -> str | None:
    """Why Darwin-target compiles cannot run here (None if they can)."""
    if CLANG is None:
        return "clang++ is not installed (.ci/run installs it)"
    probe = subprocess.run([CLANG, *darwin_flags(), "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <mutex>\n#include <string>\n", text=True,
                           capture_output=True)
    if probe.returncode != 0:
        return ("clang++ cannot compile for a Darwin target here (libc++ headers missing? "
                ".ci/run installs libc++-dev): " + probe.stderr[-500:])
    return None


@functools.cache
def darwin_flags() -> tuple[str, ...]:
    """Compiler flags (C++ and Objective-C++) for arm64 macOS at DEPLOYMENT_TARGET."""
    flags = [f"--target=arm64-apple-macos{DEPLOYMENT_TARGET}", "-stdlib=libc++",
             "-Wno-stdlibcxx-not-found", "-U__nonnull", "-D_GNU_SOURCE"]
    if platform.system() == "Linux":
        multiarch = subprocess.run([CLANG or "clang++", "-print-multiarch"], capture_output=True,
                                   text=True).stdout.strip()
        if multiarch:
            flags.append(f"-isystem/usr/include/{multiarch}")
        arch_macro = {"x86_64": "__x86_64__", "aarch64": None}.get(platform.machine())
        if arch_macro:
            flags.append(f"-D{arch_macro}")
    return tuple(flags)


def objcxx_command(path: pathlib.Path | str, *extra: str) -> list[str]:
    """clang command that type-checks one Objective-C++ file against the stubs."""
    return [CLANG, *darwin_flags(), "-fsyntax-only", "-x", "objective-c++", "-fobjc-arc",
            f"-fobjc-runtime=macosx-{DEPLOYMENT_TARGET}", "-std=c++17", "-Werror", "-Wall",
            f"-I{STUBS}", f"-I{ROOT / 'cpp'}", "-DJAX_MFA_HAS_METAL=1", *extra, str(path)]
