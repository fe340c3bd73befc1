#!/usr/bin/env python3
"""Rewrites the kernel lists of metal/attention.metal from the launch plan.

The forward, dQ and dK/dV kernels are instantiated once per configuration
the plan (block_config in cpp/metal_host/attention_plan.cc) can pick, per
GPU family and storage class (MFA_APPLE9_MIXED / MFA_APPLE7_MIXED for
float16 and bfloat16, MFA_APPLE9_f32 / MFA_APPLE7_f32 for float32). This
builds tests/host/host_policy_test, reads the kernel names of every library
from `host_policy_test --libraries` and writes those four macros. Run it
after changing a table, the register model or the cache policy;
tests/host/test_host_policy.py checks that the file matches the plan.
Usage: python3 tools/metal_instantiations.py
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
METAL = ROOT / "metal" / "attention.metal"
NAME = re.compile(r"mfa_(fwd|dq|dkdv)_(f32|f16|bf16)_h(\d+)_p(\d+)_c(\d+)_d(\d+)"
                  r"(?:_o(\d+))?_cache([01]+)")
KINDS = ("fwd", "dq", "dkdv")


def library_lines() -> list[str]:
    cxx = shutil.which("g++") or shutil.which("clang++")
    with tempfile.TemporaryDirectory() as tmp:
        binary = pathlib.Path(tmp) / "host_policy_test"
        subprocess.run([cxx, "-std=c++17", "-O1", f"-I{ROOT / 'cpp'}",
                        str(ROOT / "tests" / "host" / "host_policy_test.cc"),
                        str(ROOT / "cpp" / "metal_host" / "host_policy.cc"),
                        str(ROOT / "cpp" / "metal_host" / "attention_plan.cc"), "-o", str(binary)],
                       check=True)
        return subprocess.run([str(binary), "--libraries"], capture_output=True, text=True,
                              check=True).stdout.splitlines()


def entry(m: re.Match) -> str:
    kind, _, hp, p, c, db, ho, flags = m.groups()
    cache = ", ".join(flags)
    if kind == "fwd":
        return f"MFA_FWD(T, TAG, {hp}, {p}, {c}, {db}, {cache})"
    if kind == "dq":
        return f"MFA_DQ(T, TAG, {hp}, {p}, {c}, {db}, {cache})"
    if ho:
        return f"MFA_DKDV_SPLIT(T, TAG, {hp}, {p}, {c}, {db}, {ho}, {cache})"
    return f"MFA_DKDV(T, TAG, {hp}, {p}, {c}, {db}, {cache})"


def macro(name: str, entries: list[str]) -> str:
    lines = [f"#define {name}(T, TAG) \\"]
    pairs = [entries[i:i + 2] for i in range(0, len(entries), 2)]
    for i, pair in enumerate(pairs):
        text = "  " + " ".join(pair)
        lines.append(text if i == len(pairs) - 1 else f"{text:<92} \\")
    return "\n".join(lines) + "\n"


def main() -> None:
    # Library lines come per (dtype, bucket) with Apple7 then Apple9.
    found: dict[str, set[tuple]] = {}
    for index, line in enumerate(library_lines()):
        family = "APPLE7" if index % 2 == 0 else "APPLE9"
        for m in NAME.finditer(line):
            kind, tag, hp = m.group(1), m.group(2), int(m.group(3))
            if tag == "bf16":
                continue  # bfloat16 shares float16's configurations (MIXED)
            key = f"MFA_{family}_{'f32' if tag == 'f32' else 'MIXED'}"
            found.setdefault(key, set()).add((KINDS.index(kind), hp, entry(m)))
    text = METAL.read_text()
    for key, items in found.items():
        start = text.index(f"#define {key}(T, TAG) \\")
        end = text.index("\n\n", start) + 1
        text = text[:start] + macro(key, [e for _, _, e in sorted(items)]) + text[end:]
    METAL.write_text(text)


if __name__ == "__main__":
    main()
