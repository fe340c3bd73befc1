"""Source pass of the jax_mfa Metal emulator (stdlib only; also a CLI for CMake).

Turns one MSL translation unit into C++ for the host compiler:

* quoted ``#include "..."`` files found next to the source (or in the given
  include directories) are inlined, with ``#line`` markers, so the same pass
  applies to shared MSL headers;
* address-space-qualified pointers become checked pointer types:
  ``device T*`` -> ``::metal::device_ptr<T>``, ``threadgroup T*`` ->
  ``::metal::threadgroup_ptr<T>``, ``constant T*`` -> ``::metal::constant_ptr<const T>``;
  ``constant T&`` -> ``const T&``; ``device``/``threadgroup``/``thread T&`` -> ``T&``;
  ``thread T*`` -> ``T*``; other ``constant`` declarations -> ``const``;
* kernel-scope ``threadgroup T name[N];`` becomes one allocation per
  threadgroup (``::metal::detail::tg_array``);
* the ``kernel`` keyword is dropped and, for every kernel, the parameter
  bindings read from its signature (``[[buffer(n)]]``, ``[[threadgroup(n)]]``,
  built-ins) are emitted after its body, with a registration under the
  function's name for non-template kernels (templates are registered by
  ``JAX_MFA_INSTANTIATE_KERNEL``).

This module is the single implementation of the signature parser, used both at
run time (``compile_source``) and at build time (CMake:
``python _generator.py in.metal -o out.cc``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field

__all__ = ["GeneratorError", "KernelSignature", "Param", "generate", "parse_kernels"]


class GeneratorError(Exception):
    pass


BUILTINS = {
    "thread_position_in_grid": "kThreadPositionInGrid",
    "threadgroup_position_in_grid": "kThreadgroupPositionInGrid",
    "thread_position_in_threadgroup": "kThreadPositionInThreadgroup",
    "thread_index_in_threadgroup": "kThreadIndexInThreadgroup",
    "threads_per_threadgroup": "kThreadsPerThreadgroup",
    "threadgroups_per_grid": "kThreadgroupsPerGrid",
    "threads_per_grid": "kThreadsPerGrid",
    "simdgroup_index_in_threadgroup": "kSimdgroupIndexInThreadgroup",
    "thread_index_in_simdgroup": "kThreadIndexInSimdgroup",
    "simdgroups_per_threadgroup": "kSimdgroupsPerThreadgroup",
    "threads_per_simdgroup": "kThreadsPerSimdgroup",
    # Metal spells the SIMD-group built-ins both ways.
    "simd_group_index_in_threadgroup": "kSimdgroupIndexInThreadgroup",
    "thread_index_in_simd_group": "kThreadIndexInSimdgroup",
    "simd_groups_per_threadgroup": "kSimdgroupsPerThreadgroup",
}

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<str>"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')
  | (?P<id>[A-Za-z_]\w*)
  | (?P<num>\.?\d(?:[eEpP][+-]|[\w.])*)
  | (?P<punct>\[\[|\]\]|::|->|<<=|>>=|[-+*/%&|^!=<>]=|&&|\|\||\+\+|--|<<|>>|.)
    """,
    re.S | re.X,
)

_ADDRESS_SPACES = ("device", "constant", "threadgroup", "thread")


@dataclass
class Tok:
    kind: str
    text: str
    start: int
    end: int


@dataclass
class Param:
    text: str  # declaration without the attribute
    attribute: str  # e.g. "buffer", "threadgroup", "thread_position_in_grid"
    index: str | None  # argument of buffer(n) / threadgroup(n) (C++ expression)


@dataclass
class KernelSignature:
    name: str
    is_template: bool
    params: list[Param] = field(default_factory=list)


def _tokenize(src: str) -> list[Tok]:
    toks = []
    for m in _TOKEN.finditer(src):
        kind = m.lastgroup
        if kind in ("ws", "comment"):
            continue
        toks.append(Tok(kind, m.group(), m.start(), m.end()))
    return toks


# ---------------------------------------------------------------------------
# Include inlining.
_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]+)"[^\n]*$', re.M)
_PRAGMA_ONCE = re.compile(r"^[ \t]*#[ \t]*pragma[ \t]+once[^\n]*$", re.M)


def _inline_includes(src: str, filename: str, include_dirs: list[str], seen: set[str]) -> str:
    base = os.path.dirname(os.path.abspath(filename)) if filename and not filename.startswith("<") else os.getcwd()
    out = []
    pos = 0
    for m in _INCLUDE.finditer(src):
        name = m.group(1)
        path = None
        for d in [base, *include_dirs]:
            cand = os.path.join(d, name)
            if os.path.isfile(cand):
                path = os.path.abspath(cand)
                break
        if path is None:
            continue  # left to the compiler (e.g. jax_mfa_instantiate.h)
        line_after = src.count("\n", 0, m.end()) + 2
        out.append(src[pos : m.start()])
        if path not in seen:
            seen.add(path)
            with open(path, encoding="utf-8") as f:
                inner = _PRAGMA_ONCE.sub("", f.read())
            inner = _inline_includes(inner, path, include_dirs, seen)
            out.append(f'#line 1 "{path}"\n{inner}\n#line {line_after} "{filename}"')
        pos = m.end()
    out.append(src[pos:])
    return "".join(out)


# ---------------------------------------------------------------------------
# Helpers over the token list.
def _match(toks: list[Tok], i: int, open_: str, close: str) -> int:
    """Index of the token closing the group opened at toks[i]."""
    depth = 0
    for j in range(i, len(toks)):
        t = toks[j].text
        if t == open_:
            depth += 1
        elif t == close:
            depth -= 1
            if depth == 0:
                return j
        elif open_ == "<" and t == ">>":
            depth -= 2
            if depth <= 0:
                return j
    raise GeneratorError(f"unbalanced {open_!r} at offset {toks[i].start}")


def _parse_type(toks: list[Tok], j: int):
    """Parse `cv type-name cv` from toks[j]; returns (type tokens, is_const, next index)."""
    words: list[str] = []
    is_const = False
    while j < len(toks):
        t = toks[j]
        if t.text in ("const", "volatile"):
            is_const |= t.text == "const"
            j += 1
        elif t.kind == "id" or t.text == "::":
            words.append(t.text)
            j += 1
            if j < len(toks) and toks[j].text == "<" and t.kind == "id":
                k = _match(toks, j, "<", ">")
                words.append(" ".join(x.text for x in toks[j : k + 1]).replace(">>", "> >"))
                j = k + 1
        else:
            break
    return words, is_const, j


def _type_text(words: list[str]) -> str:
    out = ""
    for w in words:
        if out and not out.endswith("::") and w != "::" and not w.startswith("<"):
            out += " "
        out += w
    return out


def _rewrite(src: str, filename: str):
    toks = _tokenize(src)
    reps: list[tuple[int, int, str]] = []
    kernels: list[tuple[KernelSignature, int]] = []  # signature, insertion offset
    uid = 0
    i = 0
    n = len(toks)
    while i < n:
        t = toks[i]
        prev = toks[i - 1].text if i > 0 else ""
        nxt = toks[i + 1].text if i + 1 < n else ""
        # `kernel void f(...)` / `[[kernel]] void f(...)`
        if t.text == "kernel" and prev not in ("::", ".", "->"):
            is_attr = prev == "[[" and nxt == "]]"
            k = i + 2 if is_attr else i + 1
            if k + 2 < n and toks[k].text == "void" and toks[k + 1].kind == "id" and toks[k + 2].text == "(":
                if not is_attr:
                    reps.append((t.start, t.end, ""))
                # Template? Walk back over an optional `template <...>` (and attributes).
                b = i - 2 if is_attr else i - 1
                is_template = False
                if b >= 0 and toks[b].text == ">":
                    depth = 0
                    for q in range(b, -1, -1):
                        if toks[q].text == ">":
                            depth += 1
                        elif toks[q].text == "<":
                            depth -= 1
                            if depth == 0:
                                is_template = q > 0 and toks[q - 1].text == "template"
                                break
                name = toks[k + 1].text
                close = _match(toks, k + 2, "(", ")")
                sig = KernelSignature(name, is_template, _parse_params(toks, k + 2, close, src, name))
                body = close + 1
                while body < n and toks[body].text != "{":
                    if toks[body].text == ";":
                        break
                    body += 1
                if body < n and toks[body].text == "{":
                    end = _match(toks, body, "{", "}")
                    kernels.append((sig, toks[end].end))
                i += 1
                continue
        if t.text in _ADDRESS_SPACES and t.kind == "id" and prev not in ("::", ".", "->") and nxt != "(":
            start = t.start
            lead_const = prev == "const"
            if lead_const:
                start = toks[i - 1].start
            words, inner_const, j = _parse_type(toks, i + 1)
            is_const = lead_const or inner_const
            space = t.text
            after = toks[j].text if j < n else ""
            if not words:
                raise GeneratorError(f"{filename}: cannot parse the type after '{space}' at offset {t.start}")
            if after in ("*", "&"):
                ty = _type_text(words)
                cty = ("const " if is_const else "") + ty
                if after == "*":
                    if space == "device":
                        new = f"::metal::device_ptr<{cty}>"
                    elif space == "threadgroup":
                        new = f"::metal::threadgroup_ptr<{cty}>"
                    elif space == "constant":
                        new = f"::metal::constant_ptr<const {ty}>"
                    else:
                        new = f"{cty}*"
                    if space != "thread" and i >= 2 and toks[i - 1 - lead_const].text == "<" \
                            and toks[i - 2 - lead_const].text == "reinterpret_cast":
                        rc = toks[i - 2 - lead_const]
                        reps.append((rc.start, rc.end, "static_cast"))
                else:
                    new = f"const {ty}&" if space == "constant" else f"{cty}&"
                reps.append((start, toks[j].end, new))
                i = j + 1
                continue
            # A declaration `space T name ...`.
            if len(words) >= 2 and toks[j - 1].kind == "id":
                ty = _type_text(words[:-1])
                name = words[-1]
                if space == "threadgroup":
                    cty = ("const " if is_const else "") + ty
                    tag = f"jax_mfa_emu_tg_uid_{uid}"
                    uid += 1
                    if after == "[":
                        close = _match(toks, j, "[", "]")
                        if close + 1 < n and toks[close + 1].text == "[":
                            raise GeneratorError(
                                f"{filename}: multi-dimensional threadgroup arrays are not supported by the "
                                f"emulator ('{name}'); use a one-dimensional array")
                        count = src[toks[j].end : toks[close].start]
                        new = (f"static const char {tag} = 0; ::metal::threadgroup_ptr<{cty}> {name} = "
                               f"::metal::detail::tg_array<{cty}>(size_t({count}), &{tag})")
                        reps.append((start, toks[close].end, new))
                        i = close + 1
                        continue
                    new = (f"static const char {tag} = 0; auto {name} = "
                           f"::metal::detail::tg_array<{cty}>(1, &{tag})[0]")
                    reps.append((start, toks[j - 1].end, new))
                    i = j
                    continue
            # Anything else: `constant` -> const, others dropped.
            if space == "constant":
                reps.append((t.start, t.end, "" if lead_const or inner_const else "const"))
            else:
                reps.append((t.start, t.end, ""))
            i += 1
            continue
        i += 1
    for sig, pos in kernels:
        reps.append((pos, pos, _glue(sig)))
    out = []
    last = 0
    for s, e, text in sorted(reps, key=lambda r: (r[0], r[1])):
        out.append(src[last:s])
        out.append(text)
        last = e
    out.append(src[last:])
    return "".join(out), [k for k, _ in kernels]


def _parse_params(toks: list[Tok], open_i: int, close_i: int, src: str, kname: str) -> list[Param]:
    params = []
    cur: list[int] = []
    depth = 0
    groups = []
    for j in range(open_i + 1, close_i):
        t = toks[j].text
        if t in ("(", "[", "[[", "<", "{"):
            depth += 1
        elif t in (")", "]", "]]", ">", "}"):
            depth -= 1
        elif t == ">>":
            depth -= 2
        if t == "," and depth == 0:
            groups.append(cur)
            cur = []
        else:
            cur.append(j)
    if cur:
        groups.append(cur)
    for g in groups:
        if len(g) == 1 and toks[g[0]].text == "void":
            continue
        # Attribute at the end: [[ name ( args ) ]]
        attr_open = None
        for q, j in enumerate(g):
            if toks[j].text == "[[":
                attr_open = q
        decl = src[toks[g[0]].start : toks[g[attr_open - 1]].end] if attr_open else ""
        if attr_open is None:
            text = src[toks[g[0]].start : toks[g[-1]].end]
            raise GeneratorError(f"kernel '{kname}': parameter '{text}' has no Metal attribute")
        at = [toks[j] for j in g[attr_open + 1 :]]
        if not at or at[-1].text != "]]":
            raise GeneratorError(f"kernel '{kname}': cannot parse the attribute of parameter '{decl}'")
        name = at[0].text
        index = None
        if len(at) > 2 and at[1].text == "(":
            index = src[at[1].end : at[-2].start].strip()
        if name in ("buffer", "threadgroup"):
            if index is None:
                raise GeneratorError(f"kernel '{kname}': [[{name}]] needs an index")
        elif name not in BUILTINS:
            raise GeneratorError(f"kernel '{kname}': unsupported parameter attribute [[{name}]] on '{decl}'")
        params.append(Param(decl, name, index))
    return params


def _glue(sig: KernelSignature) -> str:
    items = []
    for p in sig.params:
        if p.attribute == "buffer":
            items.append(f"{{::metal::detail::kBuffer, int({p.index})}}")
        elif p.attribute == "threadgroup":
            items.append(f"{{::metal::detail::kThreadgroupArg, int({p.index})}}")
        else:
            items.append(f"{{::metal::detail::{BUILTINS[p.attribute]}, 0}}")
    arr = ", ".join(items) if items else "{0, 0}"
    n = sig.name
    text = (f" static const ::metal::detail::Binding jax_mfa_emu_bind_{n}[] = {{{arr}}};"
            f" static const int jax_mfa_emu_nbind_{n} = {len(items)};")
    if not sig.is_template:
        text += (f" static ::metal::detail::KernelRegistrar jax_mfa_emu_reg_{n}(\"{n}\", &{n},"
                 f" jax_mfa_emu_bind_{n}, jax_mfa_emu_nbind_{n});")
    return text


def parse_kernels(source: str, filename: str = "<source>", include_dirs=()) -> list[KernelSignature]:
    """Kernel signatures (name, template or not, parameters with attributes)."""
    return generate(source, filename, include_dirs)[1]


def generate(source: str, filename: str = "<source>", include_dirs=(), capi: bool = False, seen=None):
    """Returns (C++ text, kernel signatures) for one MSL translation unit.

    `seen` (a set) receives the paths of the inlined include files."""
    seen = set() if seen is None else seen
    text = _inline_includes(source, filename, list(include_dirs), seen)
    body, kernels = _rewrite(text, filename)
    fname = filename.replace("\\", "/").replace('"', "")
    head = f'#include "metal_emulator/metal_compat.h"\n#line 1 "{fname}"\n'
    tail = '\n#include "metal_emulator/capi.h"\n' if capi else "\n"
    return head + body + tail, kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="MSL -> C++ source pass of the jax_mfa Metal emulator")
    ap.add_argument("input")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("-I", dest="include_dirs", action="append", default=[])
    ap.add_argument("--capi", action="store_true", help="append the C entry points used by the Python loader")
    ap.add_argument("--depfile", help="write a Makefile-style dependency file (inlined includes)")
    args = ap.parse_args(argv)
    with open(args.input, encoding="utf-8") as f:
        src = f.read()
    try:
        seen: set[str] = set()
        text, _ = generate(src, os.path.abspath(args.input), args.include_dirs, args.capi, seen)
    except GeneratorError as e:
        print(f"{args.input}: error: {e}", file=sys.stderr)
        return 1
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, args.output)
    if args.depfile:
        deps = " ".join(p.replace(" ", "\\ ") for p in sorted(seen))
        with open(args.depfile, "w", encoding="utf-8") as f:
            f.write(f"{args.output}: {deps}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
