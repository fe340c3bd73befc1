"""Every Apple API the Objective-C++ launcher uses, checked against Apple's data.

The stubs in tests/objc/stubs are hand-written; this test makes them answer to
Apple-authored data, downloaded from PyPI at test time and cached outside the
repository (never committed):

* Apple's metal-cpp headers, shipped in the `mlx-metal` macOS wheel
  (mlx/include/metal_cpp/): the selector strings (`_MTL_PRIVATE_DEF_SEL`,
  `_NS_PRIVATE_DEF_SEL`), the C++ signature each selector is sent with
  (`Object::sendMessage<R>(..., selector, args...)`), the enums with their
  underlying types, and the C functions;
* PyObjC's Metal metadata (`pyobjc-framework-Metal`, Metal/_metadata.py): the
  Objective-C type encodings of Metal's selectors and functions, and the
  values of Metal's enum constants.

What the launcher uses comes from clang itself: the AST of metal_backend.mm
(compiled for arm64 macOS against the stubs) lists every message send
(property accesses included), enum constant and C function it references. For
each, the declaration the stubs give it must exist in Apple's data with the
same spelling, the same return and argument types (compared as Objective-C
type encodings) and, for enum constants, the same value. Controls: a selector
misspelled consistently in the stubs and the .mm (so it compiles), a wrong
enum value and a wrong argument type must each be reported.

Skipped, with the reason, only when the wheels can be neither found in the
cache nor downloaded (offline).
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest

from darwin import ROOT, STUBS, objcxx_command, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))

BACKEND = ROOT / "cpp" / "metal_host" / "metal_backend.mm"
CACHE = pathlib.Path(os.environ.get("JAX_MFA_APPLE_DATA",
                                    pathlib.Path.home() / ".cache" / "jax_mfa" / "apple-data"))
WHEELS = {"mlx-metal": "mlx_metal-*.whl", "pyobjc-framework-Metal": "pyobjc_framework_metal-*.whl"}

# Selectors inherited from NSObject that metal-cpp sends from templates (no
# per-class signature to read); checked for spelling only. Kept explicit so
# that the set cannot grow unnoticed.
SPELLING_ONLY = {"alloc", "init"}


# ---------------------------------------------------------------------------
# Apple's data

def _wheel(project: str) -> pathlib.Path | None:
    found = sorted(CACHE.glob(WHEELS[project]))
    return found[-1] if found else None


@pytest.fixture(scope="module")
def apple():
    missing = [p for p in WHEELS if _wheel(p) is None]
    if missing:
        CACHE.mkdir(parents=True, exist_ok=True)
        # Into a private folder, then renamed into the cache: test workers may
        # download at once, and a reader must never see a half-written wheel.
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                                "--only-binary=:all:", "--platform", "macosx_14_0_arm64",
                                "-d", tmp, *missing],
                               capture_output=True, text=True, timeout=600)
            for wheel in pathlib.Path(tmp).glob("*.whl"):
                os.replace(wheel, CACHE / wheel.name)
        if r.returncode != 0 or any(_wheel(p) is None for p in missing):
            pytest.skip("cannot download Apple's API data (mlx-metal, pyobjc-framework-Metal) "
                        f"from PyPI, offline? {r.stderr.strip()[-300:]}")
    return AppleData(_wheel("mlx-metal"), _wheel("pyobjc-framework-Metal"))


class AppleData:
    """Selectors, signatures, enums and functions from metal-cpp and PyObjC."""

    def __init__(self, mlx_wheel: pathlib.Path, pyobjc_wheel: pathlib.Path):
        with zipfile.ZipFile(mlx_wheel) as z:
            prefix = "mlx/include/metal_cpp/"
            headers = {n[len(prefix):]: z.read(n).decode()
                       for n in z.namelist()
                       if n.startswith((prefix + "Metal/", prefix + "Foundation/")) and n.endswith(".hpp")}
        assert headers, f"no metal-cpp headers in {mlx_wheel.name}"
        text = "\n".join(headers.values())
        # Selector identifiers -> spellings.
        self.selector_names = dict(re.findall(
            r'_(?:MTL|NS)_PRIVATE_DEF_SEL\(\s*(\w+)\s*,\s*"([^"]+)"\s*\)', text))
        self.selectors = set(self.selector_names.values())
        # Enums: C++ name (GPUFamily) -> (underlying type, {constant: expression}).
        self.cpp_enums = {}
        for kind, _, name, body in re.findall(
                r"_(?:MTL|NS)_(ENUM|OPTIONS)\(\s*([\w:]+)\s*,\s*(\w+)\s*\)\s*\{([^}]*)\}", text):
            consts = {}
            for entry in body.split(","):
                if "=" in entry:
                    k, v = entry.split("=", 1)
                    consts[k.strip()] = v.strip()
                elif entry.strip():
                    consts[entry.strip()] = None
            self.cpp_enums[name.split("::")[-1]] = (kind, consts)
        self.cpp_enum_types = {}
        for underlying, name in re.findall(r"_(?:MTL|NS)_(?:ENUM|OPTIONS)\(\s*([\w:]+)\s*,\s*(\w+)\s*\)",
                                           text):
            self.cpp_enum_types[name] = underlying
        # Selector spelling -> list of (return encoding, [argument encodings]).
        self.signatures: dict[str, list[tuple[str, list[str]]]] = {}
        method = re.compile(
            r"_(?:MTL|NS)_INLINE\s+(?P<ret>[^(){};]+?)\s*(?:MTL|NS)::[\w:<>]+::\w+"
            r"\((?P<params>(?:[^()]|\([^()]*\))*)\)\s*(?:const\s*)?\{\s*(?:return\s+)?"
            r"Object::sendMessage(?:Safe)?<(?P<rt>[^>]+(?:<[^>]*>)?[^>]*)>\(\s*[^,]+,\s*"
            r"_(?:MTL|NS)_PRIVATE_SEL\((?P<sel>\w+)\)(?P<args>[^;]*)\)\s*;")
        for m in method.finditer(text):
            spelling = self.selector_names.get(m.group("sel"))
            if spelling is None:
                continue
            params = _split_params(m.group("params"))
            by_name = {_param_name(p): _param_type(p) for p in params}
            args = _split_params(m.group("args").strip().lstrip(","))
            try:
                encodings = [self.cpp_encoding(by_name[a]) for a in args]
                ret = self.cpp_encoding(m.group("rt"))
            except KeyError:
                continue  # an argument expression, not a parameter: not a plain wrapper
            self.signatures.setdefault(spelling, []).append((ret, encodings))
        self.cpp_functions = dict(
            (name, ret.strip()) for ret, name in
            re.findall(r'extern\s+"C"\s+([\w:\*\s]+?)\s*(\w+)\s*\([^)]*\)\s*;', text))

        with zipfile.ZipFile(pyobjc_wheel) as z:
            meta = z.read("Metal/_metadata.py").decode()
        tree = ast.parse(meta)
        self.pyobjc_selectors: dict[str, list[dict]] = {}
        self.pyobjc_functions: dict[str, bytes] = {}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "r"
                    and len(node.args) == 3):
                try:
                    sel = ast.literal_eval(node.args[1]).decode()
                    info = ast.literal_eval(node.args[2])
                except ValueError:
                    continue
                self.pyobjc_selectors.setdefault(sel, []).append(info)
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "functions"
                    and isinstance(node.value, ast.Dict)):
                for k, v in zip(node.value.keys, node.value.values):
                    try:
                        self.pyobjc_functions[ast.literal_eval(k)] = ast.literal_eval(v)[0]
                    except ValueError:
                        continue
        enums = re.search(r'enums = """(.*?)"""', meta, re.S).group(1)
        self.pyobjc_enums = {k: int(v) for k, v in re.findall(r"\$(\w+)@(-?\d+)(?=\$)", enums)}
        assert self.selectors and self.signatures and self.pyobjc_selectors and self.pyobjc_enums

    def cpp_encoding(self, t: str) -> str:
        t = re.sub(r"\b(const|class|struct|volatile)\b", "", t)
        t = re.sub(r"\s+", "", t)
        if re.fullmatch(r"_?[A-Z]\w*\**", t):  # inside namespace NS: UInteger, String*, _Object*
            t = "NS::" + t.lstrip("_")
        if "(^" in t or t.endswith(("Block", "Handler")):
            return "@?"
        simple = {"void": "v", "bool": "Z", "NS::UInteger": "Q", "NS::Integer": "q", "int": "i",
                  "uint32_t": "I", "float": "f", "double": "d", "char*": "*", "void*": "^v",
                  "MTL::Size": "{MTLSize=QQQ}", "MTL::Origin": "{MTLOrigin=QQQ}"}
        if t in simple:
            return simple[t]
        if t.endswith("**") and t.startswith(("NS::", "MTL::")):
            return "^@"
        if t.endswith("*") and t.startswith(("NS::", "MTL::")):
            return "@"
        name = t.split("::")[-1]
        if name in self.cpp_enum_types:
            return self.cpp_encoding(self.cpp_enum_types[name])
        raise KeyError(t)


def _split_params(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        depth += ch in "(<"
        depth -= ch in ")>"
        cur += ch
    if cur.strip():
        out.append(cur)
    return [p.strip() for p in out]


def _param_name(p: str) -> str:
    block = re.search(r"\(\^\s*(\w+)\)", p)
    return block.group(1) if block else re.findall(r"\w+", p)[-1]


def _param_type(p: str) -> str:
    block = re.search(r"\(\^\s*(\w+)\)", p)
    if block:
        return p.replace(block.group(1), "")
    return p[: p.rfind(_param_name(p))]


def pyobjc_encoding(t: bytes) -> str:
    return t.decode().lstrip("rnNoORV")


def split_encodings(s: str) -> list[str]:
    """'{MTLSize=QQQ}QQQ' -> ['{MTLSize=QQQ}', 'Q', 'Q', 'Q']."""
    out, i = [], 0
    while i < len(s):
        j = i
        while s[j] in "rnNoORV^":
            j += 1
        if s[j] == "{":
            depth = 0
            while True:
                depth += {"{": 1, "}": -1}.get(s[j], 0)
                j += 1
                if depth == 0:
                    break
        else:
            j += 2 if s[j:j + 2] == "@?" else 1
        out.append(s[i:j].lstrip("rnNoORV"))
        i = j
    return out


# ---------------------------------------------------------------------------
# What the launcher uses, and what the stubs declare for it (from clang)

TYPE = r"'([^']*)'(?::'([^']*)')?"


def _clang_ast(path: pathlib.Path, stubs: pathlib.Path, *extra: str) -> str:
    cmd = objcxx_command(path, f"-I{BACKEND.parent}", *extra, "-Xclang", "-ast-dump",
                         "-fno-color-diagnostics")
    cmd = [c.replace(str(STUBS), str(stubs)) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def used_api(mm: pathlib.Path, stubs: pathlib.Path) -> dict[str, set[str]]:
    """Selectors, enum constants and functions of the stubs the .mm references."""
    dump = _clang_ast(mm, stubs, "-Xclang", "-ast-dump-filter=jax_mfa")
    declared = stub_declarations(stubs)
    return {
        "selectors": set(re.findall(r"ObjCMessageExpr .*? selector=(\S+)", dump)),
        "enums": {n for n in re.findall(r"DeclRefExpr .* EnumConstant 0x\w+ '(\w+)'", dump)
                  if n in declared["enums"]},
        "functions": {n for n in re.findall(r"DeclRefExpr .* Function 0x\w+ '(\w+)'", dump)
                      if n in declared["functions"]},
    }


@functools.cache
def _stub_dump(stubs: pathlib.Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        probe = pathlib.Path(tmp) / "probe.mm"
        probe.write_text("#import <Foundation/Foundation.h>\n#import <Metal/Metal.h>\n")
        return _clang_ast(probe, stubs)


def stub_declarations(stubs: pathlib.Path) -> dict:
    """Methods (selector -> [(return, [args])] as encodings), enum constants
    (name -> (enum type, value)) and functions (name -> return encoding)."""
    lines = _stub_dump(stubs).splitlines()
    underlying = {}
    for line in lines:
        m = re.search(r"EnumDecl .* (\w+) " + TYPE + "$", line)
        if m:
            underlying[m.group(1)] = m.group(3) or m.group(2)
    methods, enums, functions = {}, {}, {}
    for i, line in enumerate(lines):
        m = re.search(r"ObjCMethodDecl .* [-+] (\S+) " + TYPE, line)
        if m:
            depth = line.index("ObjCMethodDecl")
            args = []
            for nxt in lines[i + 1:]:
                if nxt.index(nxt.lstrip("| `-")[0]) <= depth:
                    break
                p = re.search(r"ParmVarDecl .* \w+ " + TYPE, nxt)
                if p and nxt.index("ParmVarDecl") == depth + 2:
                    args.append(stub_encoding(p.group(1), p.group(2), underlying))
            methods.setdefault(m.group(1), []).append(
                (stub_encoding(m.group(2), m.group(3), underlying), args))
        m = re.search(r"EnumConstantDecl .* (\w+) '([^']*)'", line)
        if m:
            value = next(re.search(r"value: Int (-?\d+)", x).group(1) for x in lines[i + 1:]
                         if "value: Int" in x)
            enums[m.group(1)] = (m.group(2), int(value))
        m = re.search(r"FunctionDecl .* (\w+) " + TYPE, line)
        if m:
            t = re.sub(r"__attribute__\(\(.*\)\)", "", m.group(3) or m.group(2)).strip()
            ret, args = re.fullmatch(r"(.*?)\s*\((.*)\)", t).groups()
            functions[m.group(1)] = (stub_encoding(ret, None, underlying),
                                     [stub_encoding(a, None, underlying)
                                      for a in _split_params(args) if a not in ("", "void")])
    return {"methods": methods, "enums": enums, "functions": functions}


def stub_encoding(sugared: str, desugared: str | None, underlying: dict[str, str]) -> str:
    """Objective-C type encoding of a type as clang prints it."""
    t = re.sub(r"\b(_Nonnull|_Nullable|__strong|__autoreleasing|__unsafe_unretained|const)\b",
               "", sugared)
    t = re.sub(r"API_AVAILABLE\([^)]*\)\)", "", t)
    t = re.sub(r"\s+", " ", t).strip()
    t = re.sub(r"\*\s+\*", "**", t)
    if "(^" in t:
        return "@?"
    simple = {"void": "v", "BOOL": "Z", "bool": "Z", "NSUInteger": "Q", "NSInteger": "q",
              "unsigned long": "Q", "long": "q", "int": "i", "char *": "*", "void *": "^v",
              "MTLSize": "{MTLSize=QQQ}", "instancetype": "@", "id": "@"}
    if t in simple:
        return simple[t]
    if re.fullmatch(r"(id|instancetype)<[^>]*>", t):
        return "@"
    if re.fullmatch(r"(NS|MTL)\w+(<.*>)? \*", t) or re.fullmatch(r"(ObjectType|KeyType)(<.*>)? \*", t):
        # A class object; an array parameter of objects (ObjectType *) is ^@.
        return "^@" if t.startswith(("ObjectType", "KeyType")) else "@"
    if re.fullmatch(r"(NS|MTL)\w+(<.*>)? \*\*", t):
        return "^@"
    if t in underlying:
        return simple[underlying[t]]
    if desugared is not None and desugared != sugared:
        return stub_encoding(desugared, None, underlying)
    raise AssertionError(f"no type encoding for {sugared!r}: extend stub_encoding()")


# ---------------------------------------------------------------------------
# The check

def problems(apple: AppleData, mm: pathlib.Path, stubs: pathlib.Path) -> list[str]:
    used = used_api(mm, stubs)
    declared = stub_declarations(stubs)
    found = []
    assert used["selectors"] and used["enums"] and used["functions"]
    for sel in sorted(used["selectors"]):
        if sel not in apple.selectors and sel not in apple.pyobjc_selectors:
            found.append(f"selector {sel!r}: not in Apple's metal-cpp or PyObjC data")
            continue
        if sel in SPELLING_ONLY:
            continue
        stub = declared["methods"].get(sel)
        if not stub:
            found.append(f"selector {sel!r}: not declared by the stubs")
            continue
        cpp = apple.signatures.get(sel, [])
        objc = []
        # PyObjC keys selectors by name alone (the last protocol declaring one
        # wins): use it only where metal-cpp's signatures agree.
        pyobjc = apple.pyobjc_selectors.get(sel, []) if len(set(map(str, cpp))) <= 1 else []
        for info in pyobjc:
            ret = pyobjc_encoding(info["retval"]["type"]) if "type" in info.get("retval", {}) else None
            args = {i - 2: pyobjc_encoding(a["type"]) for i, a in info.get("arguments", {}).items()
                    if "type" in a}
            objc.append((ret, args))
        if not cpp and not objc:
            found.append(f"selector {sel!r}: Apple's data has no signature for it")
        for ret, args in stub:
            if cpp and (ret, args) not in cpp:
                found.append(f"selector {sel!r}: stubs say {ret} {args}, metal-cpp says {cpp}")
            if objc and not any((r is None or r == ret) and len(args) >= len(a) and
                                all(args[i] == e for i, e in a.items()) for r, a in objc):
                found.append(f"selector {sel!r}: stubs say {ret} {args}, PyObjC says {objc}")
    for name in sorted(used["enums"]):
        _, value = declared["enums"][name]
        # metal-cpp drops the MTL / NS prefix inside its namespaces.
        short = name[3 if name.startswith("MTL") else 2:]
        expressions = [consts[short] for _, consts in apple.cpp_enums.values() if short in consts]
        if not expressions:
            found.append(f"enum {name}: not a constant of any metal-cpp enum")
        for e in expressions:
            if e is not None and re.fullmatch(r"-?(0x)?[0-9a-fA-F]+", e) and int(e, 0) != value:
                found.append(f"enum {name} = {value}: metal-cpp says {e}")
        if name.startswith("MTL") and apple.pyobjc_enums.get(name) != value:
            found.append(f"enum {name} = {value}: PyObjC says {apple.pyobjc_enums.get(name)}")
    for name in sorted(used["functions"]):
        ret, args = declared["functions"][name]
        cpp = apple.cpp_functions.get(name)
        objc = apple.pyobjc_functions.get(name)
        if cpp is None and objc is None:
            found.append(f"function {name}: not in Apple's metal-cpp or PyObjC data")
        if cpp is not None and apple.cpp_encoding(cpp) != ret:
            found.append(f"function {name}: stubs return {ret}, metal-cpp {cpp}")
        if objc is not None and split_encodings(objc.decode()) != [ret, *args]:
            found.append(f"function {name}: stubs say {ret} {args}, PyObjC {objc.decode()}")
    return found


def test_every_api_the_launcher_uses_matches_apples_data(apple):
    used = used_api(BACKEND, STUBS)
    # The extraction sees the launcher's real API surface.
    assert {"newBufferWithBytesNoCopy:length:options:deallocator:", "setBuffer:offset:atIndex:",
            "setMathMode:", "supportsFamily:"} <= used["selectors"]
    assert {"MTLGPUFamilyApple7", "MTLCommandBufferStatusCompleted", "MTLLanguageVersion3_1"} <= used["enums"]
    assert {"MTLCopyAllDevices", "MTLCreateSystemDefaultDevice"} <= used["functions"]
    assert problems(apple, BACKEND, STUBS) == []


def _planted_copy(tmp_path, stub_old, stub_new, mm_old=None, mm_new=None):
    stubs = tmp_path / "stubs"
    shutil.copytree(STUBS, stubs)
    metal = stubs / "Metal" / "Metal.h"
    text = metal.read_text()
    assert stub_old in text
    metal.write_text(text.replace(stub_old, stub_new, 1))
    mm = BACKEND
    if mm_old is not None:
        src = BACKEND.read_text()
        assert mm_old in src
        mm = tmp_path / BACKEND.name
        mm.write_text(src.replace(mm_old, mm_new, 1))
    return mm, stubs


@pytest.mark.parametrize("case", ["selector", "enum-value", "argument-type"])
def test_planted_mistakes_are_reported(apple, tmp_path, case):
    if case == "selector":  # misspelled in both, so it still compiles
        mm, stubs = _planted_copy(tmp_path, "- (void)waitUntilCompleted;",
                                  "- (void)waitUntilComplete;",
                                  "[cb waitUntilCompleted]", "[cb waitUntilComplete]")
        needle = "waitUntilComplete'"
    elif case == "enum-value":
        mm, stubs = _planted_copy(tmp_path, "= 1009,", "= 1008,")
        needle = "MTLGPUFamilyApple9 = 1008"
    else:  # an NSInteger offset where Apple has NSUInteger
        mm, stubs = _planted_copy(tmp_path, "offset:(NSUInteger)offset", "offset:(NSInteger)offset")
        needle = "setBuffer:offset:atIndex:"
    found = problems(apple, mm, stubs)
    assert any(needle in p for p in found), found
