#!/usr/bin/env bash
# Developer build: configure and build with CMake, then install the native
# pieces into the source tree's jax_mfa/ (git-ignored), so that
# `python -m pytest` from the repository root uses them without a pip install.
# Usage: tools/dev_build.sh [build-dir]   (default: build/dev)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build/dev}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DPython_EXECUTABLE="$(command -v python3)" > /dev/null
cmake --build "$build"
cmake --install "$build" --prefix "$root" > /dev/null
