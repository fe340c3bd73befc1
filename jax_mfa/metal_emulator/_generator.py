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
* an address space qualifying a member function or constructor is dropped,
  and overloads that then coincide (they differed only in address space) are
  reduced to one, the ``thread`` one where there is one;
* ``#define`` bodies get the same rewriting (a body that is just an address
  space word becomes ``const`` or nothing);
* ``constant T name [[function_constant(i)]];`` becomes a per-dispatch
  ``::metal::detail::function_constant<T, i>``;
* ``template [[host_name(N)]] [[kernel]] decltype(F<A>) F<A>;`` (also in a
  ``#define``, as in MLX's ``instantiate_kernel``) becomes a registration;
* ``1.5h`` / ``2.0bf`` literals become constexpr half/bfloat conversions;
* kernel-scope ``threadgroup T name[N];`` becomes one allocation per
  threadgroup (``::metal::detail::tg_array``);
* the ``kernel`` keyword is dropped and, for every kernel (``kernel``,
  ``[[kernel]]`` or an attribute list with ``kernel``), the parameter bindings
  read from its signature (``[[buffer(n)]]`` with an optional
  ``function_constant(c)``, ``[[threadgroup(n)]]``, built-ins, and whether the
  body names each parameter) are emitted after its body, with a registration
  under the function's name for non-template kernels (templates are
  registered by ``JAX_MFA_INSTANTIATE_KERNEL`` or a host_name instantiation).

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
    (?P<pp>(?m:^)[ \t]*\#(?:\\\r?\n|[^\n])*)
  | (?P<ws>[^\S\n]+|\n)
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
    function_constant: str | None = None  # [[buffer(n), function_constant(c)]]: absent when c is false
    used: bool = True  # the name occurs in the kernel's body (else it may stay unbound)


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


_CONTROL = {"if", "for", "while", "switch", "catch", "return", "sizeof", "decltype", "alignof", "alignas",
            "static_assert", "noexcept", "defined", "__attribute__", "_Pragma"}
_QUALIFIERS = {"const", "volatile", "noexcept", "override", "final", "&", "&&", *_ADDRESS_SPACES}

# `template [[host_name(N)]] [[kernel]] decltype(F<A>) F<A>;` (also inside a
# #define, as in MLX's instantiate_kernel): Metal's explicit instantiation of a
# kernel under a host name, registered in the emulator instead.
_WS = r"(?:\s|\\\r?\n)*"
_HOST_NAME_INSTANTIATION = re.compile(
    r"template" + _WS + r"\[\[" + _WS + r"host_name" + _WS + r"\((?P<name>(?:[^()]|\([^()]*\))*)\)" + _WS
    + r"\]\]" + _WS + r"\[\[" + _WS + r"kernel" + _WS + r"\]\]" + _WS + r"decltype" + _WS + r"\(" + _WS
    + r"(?P<fn>[A-Za-z_]\w*)" + _WS + r"<(?P<args>[^;]*?)>" + _WS + r"\)" + _WS + r"(?P=fn)" + _WS
    + r"<[^;]*?>" + _WS + r";")


def _register_host_name_instantiations(src: str) -> str:
    def repl(m):
        breaks = re.findall(r"\\?\r?\n", m.group())  # keep the line structure (and macro continuations)
        name, args = (re.sub(r"\\\r?\n", " ", m.group(g)).strip() for g in ("name", "args"))
        return (f"JAX_MFA_EMU_REGISTER_KERNEL({name}, {m.group('fn')}, {args})"
                + "".join(" " + b for b in breaks))
    return _HOST_NAME_INSTANTIATION.sub(repl, src)


_DEFINE = re.compile(r"(?P<head>[ \t]*#[ \t]*define[ \t]+[A-Za-z_]\w*(?:\([^)]*\))?)(?P<body>.*)", re.S)


def _rewrite_directive(text: str, filename: str) -> str:
    """A #define body gets the same address-space rewriting as code (other directives are left alone)."""
    m = _DEFINE.match(text)
    if not m or not any(re.search(rf"\b{w}\b", m.group("body")) for w in _ADDRESS_SPACES):
        return text
    body = m.group("body")
    word = body.strip()
    if word in _ADDRESS_SPACES:  # e.g. MLX's `#define MTL_CONST constant`
        return m.group("head") + (" const" if word == "constant" else " ")
    out, _, _ = _rewrite(body, filename, in_directive=True)
    return m.group("head") + out


def _half_literal(text: str) -> str | None:
    """MSL's half (`1.0h`) and bfloat (`1.0bf`) literals as constexpr conversions."""
    if text.lower().startswith("0x"):
        return None
    for suffix, ty in (("bf", "bfloat"), ("h", "half")):
        num = text[: -len(suffix)]
        if text.lower().endswith(suffix) and num and (num[-1].isdigit() or num[-1] == "."):
            return f"::metal::{ty}({num}{'f' if ('.' in num or 'e' in num.lower()) else ''})"
    return None


def _scopes(toks: list[Tok]) -> list[int]:
    """For each token, the index of the `{` of the innermost enclosing brace (-1: namespace scope of the file)."""
    out, stack = [], [-1]
    for i, t in enumerate(toks):
        if t.text == "}" and len(stack) > 1:
            stack.pop()
        out.append(stack[-1])
        if t.text == "{":
            stack.append(i)
    return out


def _function_definitions(toks: list[Tok]):
    """(declaration start, `(`, `)`, body `{`, body `}`) of function definitions, constructors included."""
    n = len(toks)
    i = 0
    while i < n:
        if toks[i].text != "(" or i == 0:
            i += 1
            continue
        before = toks[i - 1]
        if before.kind == "id" and before.text in _CONTROL or before.kind == "pp":
            i += 1
            continue
        close = _match(toks, i, "(", ")")
        j = close + 1
        while j < n and toks[j].text in _QUALIFIERS:
            j += 1
        if j < n and toks[j].text == ":" and (j + 1 < n and toks[j + 1].text != ":"):
            # constructor initializer list: name(...) / name{...}, separated by commas
            j += 1
            while j < n and toks[j].text != "{":
                if toks[j].text == "(":
                    j = _match(toks, j, "(", ")")
                elif toks[j].text == "{" :
                    break
                j += 1
                if j < n and toks[j].text == "{" and toks[j - 1].kind == "id":
                    j = _match(toks, j, "{", "}") + 1  # member{init}
            if j >= n:
                break
        if j < n and toks[j].text == "{":
            end = _match(toks, j, "{", "}")
            start = i - 1
            depth = 0
            while start > 0:
                x = toks[start - 1]
                if x.text in (")", "]", ">", ">>"):
                    depth += 2 if x.text == ">>" else 1
                elif x.text in ("(", "[", "<"):
                    depth -= 1
                if depth <= 0 and (x.text in (";", "{", "}") or x.kind == "pp"
                                   or (x.text == ":" and start >= 2 and toks[start - 2].text in (
                                       "public", "private", "protected"))):
                    break
                start -= 1
            yield start, i, close, j, end
            i = j + 1
            continue
        i = close + 1 if close > i else i + 1


def _rewrite(src: str, filename: str, in_directive: bool = False):
    toks = _tokenize(src)
    reps: list[tuple[int, int, str]] = []
    kernels: list[tuple[KernelSignature, int]] = []  # signature, insertion offset
    function_constants: list[str] = []
    trailing_space: dict[int, str] = {}  # `)` index -> address space qualifying a member function
    uid = 0
    i = 0
    n = len(toks)
    while i < n:
        t = toks[i]
        prev = toks[i - 1].text if i > 0 else ""
        nxt = toks[i + 1].text if i + 1 < n else ""
        if t.kind == "pp":
            new = _rewrite_directive(t.text, filename)
            if new != t.text:
                reps.append((t.start, t.end, new))
            i += 1
            continue
        if t.kind == "num":
            lit = _half_literal(t.text)
            if lit:
                reps.append((t.start, t.end, lit))
            i += 1
            continue
        # `kernel void f(...)`, `[[kernel]] void f(...)`, `[[kernel, max_total_threads_per_threadgroup(n)]] void f(...)`
        if t.text == "kernel" and prev not in ("::", ".", "->") and not in_directive:
            attr_open = attr_close = None
            if prev in ("[[", ","):
                q = i - 1
                while q >= 0 and toks[q].text != "[[" and toks[q].text not in (";", "{", "}"):
                    q -= 1
                if q >= 0 and toks[q].text == "[[":
                    attr_open = q
                    q = i + 1
                    while q < n and toks[q].text not in ("]]", ";", "{"):
                        q = _match(toks, q, "(", ")") + 1 if toks[q].text == "(" else q + 1
                    attr_close = q if q < n and toks[q].text == "]]" else None
            is_attr = attr_open is not None and attr_close is not None
            k = attr_close + 1 if is_attr else i + 1
            if k + 2 < n and toks[k].text == "void" and toks[k + 1].kind == "id" and toks[k + 2].text == "(":
                if not is_attr:
                    reps.append((t.start, t.end, ""))
                # Template? Walk back over an optional `template <...>` (and attributes).
                b = attr_open - 1 if is_attr else i - 1
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
                body = close + 1
                while body < n and toks[body].text != "{":
                    if toks[body].text == ";":
                        break
                    body += 1
                if body < n and toks[body].text == "{":
                    end = _match(toks, body, "{", "}")
                    used = {x.text for x in toks[body:end] if x.kind == "id"}
                    sig = KernelSignature(name, is_template, _parse_params(toks, k + 2, close, src, name, used))
                    kernels.append((sig, toks[end].end))
                i += 1
                continue
        if t.text in _ADDRESS_SPACES and t.kind == "id" and prev not in ("::", ".", "->") and nxt != "(":
            # `) const thread {`, `) thread : x(...)`: an address space qualifying a member function.
            q = i - 1
            while q >= 0 and toks[q].text in ("const", "volatile"):
                q -= 1
            if q >= 0 and toks[q].text == ")" and nxt in ("{", ":", ";", "noexcept", "=", "->", "override",
                                                           "final", "const", "volatile"):
                reps.append((t.start, t.end, ""))
                trailing_space[q] = t.text
                i += 1
                continue
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
                if words == ["auto"]:  # `const constant auto* p = ...`: deduce the checked pointer type
                    new = "auto" if after == "*" else f"{cty}&"
                elif after == "*":
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
                if space == "constant" and after == "[[" and j + 1 < n and toks[j + 1].text == "function_constant":
                    # `constant T name [[function_constant(i)]];`: a value supplied per dispatch.
                    close = _match(toks, j + 2, "(", ")")
                    index = src[toks[j + 2].end : toks[close].start].strip()
                    semi = close
                    while semi < n and toks[semi].text != ";":
                        semi += 1
                    new = (f"static const ::metal::detail::function_constant<{ty}, ({index})> {name}"
                           f"{{\"{name}\"}};")
                    reps.append((start, toks[semi].end, new))
                    function_constants.append(name)
                    i = semi + 1
                    continue
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
    reps = _drop_address_space_overloads(src, toks, reps, trailing_space)
    out = []
    last = 0
    for s, e, text in sorted(reps, key=lambda r: (r[0], r[1])):
        out.append(src[last:s])
        out.append(text)
        last = e
    out.append(src[last:])
    return "".join(out), [k for k, _ in kernels], function_constants


def _apply(src: str, lo: int, hi: int, reps) -> str:
    out, last = [], lo
    for s, e, text in sorted((r for r in reps if lo <= r[0] and r[1] <= hi), key=lambda r: (r[0], r[1])):
        out.append(src[last:s])
        out.append(text)
        last = e
    out.append(src[last:hi])
    return "".join(out)


def _drop_address_space_overloads(src, toks, reps, trailing_space):
    """Overloads that differ only in address space (`f() thread` / `f() device`, `g(thread T&)` / `g(device T&)`)
    become identical C++ declarations: keep one of each (the `thread` one where there is one)."""
    scopes = _scopes(toks)
    groups: dict[tuple, list[tuple[int, int, int, int]]] = {}
    for start, open_, close, body, end in _function_definitions(toks):
        if not any(toks[q].text in _ADDRESS_SPACES for q in range(start, body)):
            continue
        sig = re.sub(r"\s+", " ", _apply(src, toks[start].start, toks[body].start, reps)).strip()
        # the initializer list is not part of the signature
        rank = {None: 0, "thread": 0}.get(trailing_space.get(close), 1)
        groups.setdefault((scopes[start], sig.split(" : ")[0] if ") :" in sig else sig), []).append(
            (rank, toks[start].start, toks[end].end, start))
    drop = []
    for defs in groups.values():
        if len(defs) > 1:
            keep = min(defs, key=lambda d: (d[0], d[1]))
            drop += [(s, e) for _, s, e, _ in defs if (s, e) != (keep[1], keep[2])]
    if not drop:
        return reps
    kept = [r for r in reps if not any(s <= r[0] and r[1] <= e for s, e in drop)]
    for s, e in drop:
        kept.append((s, e, "\n" * src.count("\n", s, e)))
    return kept


def _parse_params(toks: list[Tok], open_i: int, close_i: int, src: str, kname: str,
                  used: set[str] | None = None) -> list[Param]:
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
        # Attribute list at the end: [[ name ( args ) , function_constant ( c ) ]]
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
        items: list[list[Tok]] = [[]]
        d = 0
        for x in at[:-1]:
            d += x.text == "("
            d -= x.text == ")"
            if x.text == "," and d == 0:
                items.append([])
            else:
                items[-1].append(x)
        name = index = fc = None
        for item in items:
            if not item:
                continue
            arg = src[item[1].end : item[-1].start].strip() if len(item) > 2 and item[1].text == "(" else None
            if item[0].text == "function_constant":
                fc = arg
            elif name is None:
                name, index = item[0].text, arg
            else:
                raise GeneratorError(f"kernel '{kname}': unsupported attribute [[{item[0].text}]] on '{decl}'")
        if name in ("buffer", "threadgroup"):
            if index is None:
                raise GeneratorError(f"kernel '{kname}': [[{name}]] needs an index")
        elif name not in BUILTINS:
            raise GeneratorError(f"kernel '{kname}': unsupported parameter attribute [[{name}]] on '{decl}'")
        pname = next((toks[j].text for j in reversed(g[:attr_open]) if toks[j].kind == "id"), "")
        params.append(Param(decl, name, index, fc, used is None or pname in used))
    return params


def _glue(sig: KernelSignature) -> str:
    items = []
    for p in sig.params:
        fc = f"::metal::detail::function_constant_index({p.function_constant})" if p.function_constant else "-1"
        if p.attribute == "buffer":
            items.append(f"{{::metal::detail::kBuffer, int({p.index}), {fc}, {int(p.used)}}}")
        elif p.attribute == "threadgroup":
            items.append(f"{{::metal::detail::kThreadgroupArg, int({p.index}), {fc}, {int(p.used)}}}")
        else:
            items.append(f"{{::metal::detail::{BUILTINS[p.attribute]}, 0, -1, 1}}")
    arr = ", ".join(items) if items else "{0, 0, -1, 1}"
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
    body, kernels, _ = _rewrite(_register_host_name_instantiations(text), filename)
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
