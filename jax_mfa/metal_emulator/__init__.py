"""Metal emulator: run MSL compute kernels on the CPU with race and divergence checks.

    lib = jax_mfa.metal_emulator.compile_source(source, defines={"BLOCK": 32})
    lib.dispatch("kernel_name", grid=(gx, gy, gz), threads=(tx, ty, tz),
                 buffers=[a, b, np.uint32(n)], threadgroup_memory=[4096],
                 seed=None, check=True)
    prof = lib.dispatch(..., function_constants={"align_M": True}, profile=True)

The MSL source is compiled as C++ by the system compiler (env CXX, else c++,
g++ or clang++) against the emulator's Metal compatibility headers, and the
shared library is cached by content hash (env JAX_MFA_CACHE_DIR, else
~/.cache/jax_mfa). See docs/metal_emulator.md.

This package is pure Python (ctypes) and does not need jax_mfa's extension.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import _generator

__all__ = [
    "CompileError",
    "DivergenceError",
    "Library",
    "MetalEmulatorError",
    "OutOfBoundsError",
    "Profile",
    "RaceError",
    "ThreadgroupMemoryError",
    "WriteConflictError",
    "compile_source",
    "include_dirs",
    "load",
]


class MetalEmulatorError(Exception):
    """Base class of the emulator's errors (also: invalid dispatch arguments)."""


class CompileError(MetalEmulatorError):
    """The kernel source did not compile; `log` holds the compiler's output."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message + ("\n" + log if log else ""))
        self.log = log


class RaceError(MetalEmulatorError):
    """Threadgroup-memory race (no barrier between conflicting accesses)."""


class DivergenceError(MetalEmulatorError):
    """Barrier or SIMD-group collective not reached uniformly."""


class OutOfBoundsError(MetalEmulatorError):
    """Device or constant buffer access outside the buffer."""


class ThreadgroupMemoryError(MetalEmulatorError):
    """Threadgroup memory access beyond its length, or a request over 32 KiB."""


class WriteConflictError(MetalEmulatorError):
    """Two threadgroups wrote one device-memory element in a dispatch."""


_ERRORS = {
    1: MetalEmulatorError,
    2: RaceError,
    3: DivergenceError,
    4: OutOfBoundsError,
    5: ThreadgroupMemoryError,
    6: WriteConflictError,
}

_HERE = os.path.dirname(os.path.abspath(__file__))


def include_dirs() -> list[str]:
    """Include directories of the compatibility layer (installed or source tree)."""
    # A source checkout's headers win over a copy installed in place, so edits
    # to cpp/metal_emulator take effect without reinstalling.
    root = os.path.abspath(os.path.join(_HERE, "..", ".."))
    src = os.path.join(root, "cpp")
    if os.path.isfile(os.path.join(src, "metal_emulator", "msl", "metal_stdlib")):
        return [src, os.path.join(src, "metal_emulator", "msl")]
    inst = os.path.join(_HERE, "include")
    if os.path.isfile(os.path.join(inst, "msl", "metal_stdlib")):
        return [inst, os.path.join(inst, "msl")]
    raise MetalEmulatorError("the Metal emulator headers were not found (build/install jax_mfa with CMake)")


_lock = threading.Lock()
_compiler_info: dict[str, Any] = {}
_header_hash: list[str] = []


def _find_cxx() -> str:
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for c in ("c++", "g++", "clang++"):
        p = shutil.which(c)
        if p:
            return p
    raise CompileError("no C++ compiler found (set CXX)")


def _compiler(cxx: str) -> dict:
    info = _compiler_info.get(cxx)
    if info is None:
        try:
            out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
        except OSError as e:
            raise CompileError(f"cannot run the C++ compiler {cxx!r}: {e}") from None
        info = {"version": out, "clang": "clang" in out.lower()}
        _compiler_info[cxx] = info
    return info


def _headers_digest(dirs: list[str]) -> str:
    if not _header_hash:
        h = hashlib.sha256()
        roots = [os.path.join(dirs[0], "metal_emulator"), os.path.join(dirs[0], "common"), dirs[1]]
        for d in roots:
            for root, _, files in sorted(os.walk(d)):
                for f in sorted(files):
                    p = os.path.join(root, f)
                    if f.endswith(".h") or "." not in f:
                        h.update(p.encode())
                        with open(p, "rb") as fh:
                            h.update(fh.read())
        _header_hash.append(h.hexdigest())
    return _header_hash[0]


def cache_dir() -> str:
    d = os.environ.get("JAX_MFA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jax_mfa")
    d = os.path.join(d, "metal_emulator")
    os.makedirs(d, exist_ok=True)
    return d


def _flags(info: dict) -> list[str]:
    flags = ["-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-fno-fast-math", "-fvisibility=hidden"]
    if info["clang"]:
        flags += ["-Wno-unknown-attributes", "-Wno-ignored-attributes", "-Wno-unused-command-line-argument"]
    else:
        flags += ["-Wno-attributes"]
    return flags


def compile_source(source: str, defines: Mapping[str, Any] | None = None, *, filename: str = "<source>",
                   include_paths: Sequence[str] = (), cxx: str | None = None,
                   extra_flags: Sequence[str] = ()) -> "Library":
    """Compile MSL `source` through the emulator and load it (cached by content hash)."""
    dirs = include_dirs()
    try:
        text, kernels = _generator.generate(source, filename, list(include_paths), capi=True)
    except _generator.GeneratorError as e:
        raise CompileError(f"{filename}: {e}") from None
    cxx = cxx or _find_cxx()
    info = _compiler(cxx)
    defs = []
    for k, v in sorted((defines or {}).items()):
        defs.append(f"-D{k}" if v is None or v is True else f"-D{k}={v}")
    flags = _flags(info) + list(extra_flags)
    key = hashlib.sha256()
    for part in (text, cxx, info["version"], " ".join(defs), " ".join(flags), _headers_digest(dirs),
                 " ".join(include_paths)):
        key.update(part.encode())
        key.update(b"\0")
    digest = key.hexdigest()[:24]
    out = os.path.join(cache_dir(), f"kernels-{digest}.so")
    if not os.path.exists(out):
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            src_path = os.path.join(tmp, "kernels.cc")
            with open(src_path, "w", encoding="utf-8") as f:
                f.write(text)
            so_tmp = os.path.join(tmp, "kernels.so")
            inc = []
            for d in [*dirs, *include_paths]:
                inc += ["-I", d]
            cmd = [cxx, *flags, *defs, *inc, src_path, "-o", so_tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise CompileError(f"compiling {filename} failed ({' '.join(cmd)})", proc.stdout + proc.stderr)
            os.replace(so_tmp, out)
    return Library(out, [k.name for k in kernels])


def load(path: str, defines: Mapping[str, Any] | None = None, **kwargs) -> "Library":
    """Compile the MSL file at `path` (its directory is searched for quoted includes)."""
    with open(path, encoding="utf-8") as f:
        src = f.read()
    return compile_source(src, defines, filename=os.path.abspath(path), **kwargs)


def _as3(v) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v),)
    v = tuple(int(x) for x in v)
    if not 1 <= len(v) <= 3:
        raise ValueError("grid/threads need 1 to 3 dimensions")
    return v + (1,) * (3 - len(v))


@dataclasses.dataclass(frozen=True)
class Profile:
    """Instruction profile of one dispatch (``Library.dispatch(..., profile=True)``).

    Counter names (keys of every dict below) and what they count are listed in
    docs/metal_emulator.md ("Instruction profile"). In short: SIMD-group
    collectives (matrix multiply-accumulates, matrix loads/stores, shuffles,
    reductions, barriers) count once per simdgroup that executes them;
    ``*_bytes_*`` and special-function calls (``exp``, ``exp2``, ``log``,
    ``tanh``, ...) are summed over the simdgroup's lanes. Plain scalar
    arithmetic is not counted.

    Attributes:
      threads_per_threadgroup, simdgroups_per_threadgroup, threadgroups: the launch.
      threadgroup_memory_bytes: threadgroup memory declared per threadgroup
        (dynamic ``[[threadgroup(i)]]`` lengths plus kernel-scope arrays).
      total: counter -> count over the whole dispatch.
      per_simdgroup: one dict per simdgroup index in the threadgroup, summed
        over all threadgroups (``per_simdgroup[s][c]``).
      max_simdgroup: counter -> the largest count of any single simdgroup.
    """

    threads_per_threadgroup: int
    simdgroups_per_threadgroup: int
    threadgroups: int
    threadgroup_memory_bytes: int
    total: dict
    per_simdgroup: list
    max_simdgroup: dict

    @property
    def simdgroups(self) -> int:
        """Number of simdgroups launched."""
        return self.threadgroups * self.simdgroups_per_threadgroup

    def mean_per_simdgroup(self) -> dict:
        """counter -> total / number of simdgroups launched."""
        return {k: v / self.simdgroups for k, v in self.total.items()}


_FC_TYPES = {0: np.bool_, 1: None, 2: None, 3: None, 4: np.float16, 5: "bfloat16"}

_SCALAR_INT = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_SCALAR_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_SCALAR_FLOAT = {2: np.float16, 4: np.float32, 8: np.float64}


class Library:
    """A compiled kernel library (one MSL translation unit)."""

    def __init__(self, path: str, source_kernels: Iterable[str] = ()):
        self.path = path
        self._lib = ctypes.CDLL(path)
        L = self._lib
        L.jax_mfa_emu_kernel_name.restype = ctypes.c_char_p
        L.jax_mfa_emu_kernel_name.argtypes = [ctypes.c_int]
        L.jax_mfa_emu_kernel_params.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64), ctypes.c_int]
        if L.jax_mfa_emu_abi_version() != 2:
            raise MetalEmulatorError(f"{path}: built for another version of the emulator (delete the cache)")
        L.jax_mfa_emu_dispatch.argtypes = [
            ctypes.c_char_p, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32), ctypes.c_int,
            ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint64), ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.POINTER(ctypes.c_int64),
            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.POINTER(ctypes.c_uint64), ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        L.jax_mfa_emu_function_constant.restype = ctypes.c_char_p
        L.jax_mfa_emu_function_constant.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
        L.jax_mfa_emu_counter_name.restype = ctypes.c_char_p
        L.jax_mfa_emu_counter_name.argtypes = [ctypes.c_int]
        self._params: dict[str, list[tuple[int, ...]]] = {}
        self._counters = [L.jax_mfa_emu_counter_name(i).decode() for i in range(L.jax_mfa_emu_num_counters())]

    @property
    def kernels(self) -> list[str]:
        n = self._lib.jax_mfa_emu_num_kernels()
        return [self._lib.jax_mfa_emu_kernel_name(i).decode() for i in range(n)]

    def params(self, kernel: str) -> list[tuple[int, ...]]:
        """Per parameter: (binding, index, space, is_pointer, is_const, size, function_constant, used).

        function_constant is the index of the constant that makes the argument
        exist (-1: always present); used is 0 when the kernel never names it."""
        p = self._params.get(kernel)
        if p is None:
            buf = (ctypes.c_int64 * (8 * 256))()
            n = self._lib.jax_mfa_emu_kernel_params(kernel.encode(), buf, 256)
            if n < 0:
                raise MetalEmulatorError(f"no kernel named {kernel!r} (available: {', '.join(self.kernels)})")
            p = [tuple(buf[8 * i : 8 * i + 8]) for i in range(n)]
            self._params[kernel] = p
        return p

    @property
    def function_constants(self) -> dict[str, tuple[int, str]]:
        """name -> (index, type) of the `[[function_constant(i)]]` constants declared in the library."""
        out = {}
        its = (ctypes.c_int64 * 3)()
        for i in range(self._lib.jax_mfa_emu_num_function_constants()):
            name = self._lib.jax_mfa_emu_function_constant(i, its).decode()
            kind = {0: "bool", 1: "int", 2: "uint", 3: "float", 4: "half", 5: "bfloat"}[its[1]]
            out[name] = (int(its[0]), f"{kind}{8 * its[2] if kind in ('int', 'uint', 'float') else ''}")
        return out

    def _pack_function_constants(self, values: Mapping[Any, Any]) -> tuple[list[int], list[int]]:
        declared = {}
        its = (ctypes.c_int64 * 3)()
        for i in range(self._lib.jax_mfa_emu_num_function_constants()):
            name = self._lib.jax_mfa_emu_function_constant(i, its).decode()
            declared[name] = declared[int(its[0])] = (int(its[0]), int(its[1]), int(its[2]))
        idx, bits = [], []
        for key, value in values.items():
            if key not in declared:
                raise ValueError(f"function_constants: {key!r} is not a function constant of this library "
                                 f"(declared: {sorted(k for k in declared if isinstance(k, str))})")
            index, kind, size = declared[key]
            if kind == 0:
                arr = np.array(bool(value), np.bool_)
            elif kind in (1, 2):
                arr = np.array(int(value), (_SCALAR_INT if kind == 1 else _SCALAR_UINT)[size])
            elif kind == 3:
                arr = np.array(float(value), _SCALAR_FLOAT[size])
            elif kind == 4:
                arr = np.array(float(value), np.float16)
            else:
                u = int(np.float32(value).view(np.uint32))
                arr = np.array((u + 0x7FFF + ((u >> 16) & 1)) >> 16, np.uint16)  # round to nearest even
            idx.append(index)
            bits.append(int.from_bytes(arr.tobytes().ljust(8, b"\0"), "little"))
        return idx, bits

    def dispatch(self, kernel: str, grid=(1, 1, 1), threads=(1, 1, 1), buffers: Sequence[Any] = (),
                 threadgroup_memory: Sequence[int] = (), seed: int | None = None, check: bool = True,
                 function_constants: Mapping[Any, Any] | None = None, profile: bool = False,
                 workers: int | None = None) -> Profile | None:
        """Run `kernel` over `grid` threadgroups of `threads` threads.

        buffers[i] binds [[buffer(i)]]: a C-contiguous NumPy array (updated in
        place), or for `constant T&` parameters a NumPy scalar, bytes, or a
        Python int/float (packed to the parameter's size).
        threadgroup_memory[i] is the byte length of [[threadgroup(i)]].
        function_constants maps a `[[function_constant(i)]]` constant (its name
        or index i) to its value for this dispatch, as MTLFunctionConstantValues
        does per pipeline. An argument `[[buffer(n), function_constant(c)]]`
        whose c is false does not exist: it needs no binding.
        profile=True returns a Profile of the dispatch (else None).
        workers: size of the worker pool (None: the default pool, see
        JAX_MFA_EMU_WORKERS; 0: the calling thread alone).
        """
        if workers is not None and (not isinstance(workers, (int, np.integer)) or workers < 0):
            raise ValueError(f"workers must be None or an int >= 0, got {workers!r}")
        params = self.params(kernel)
        fc_idx, fc_bits = self._pack_function_constants(function_constants or {})
        by_index = {p[1]: p for p in params if p[0] == 0}
        keep = []
        ptrs = (ctypes.c_void_p * max(1, len(buffers)))()
        sizes = (ctypes.c_uint64 * max(1, len(buffers)))()
        for i, b in enumerate(buffers):
            info = by_index.get(i)
            if b is None:  # an unused index
                ptrs[i] = None
                sizes[i] = 0
                continue
            if isinstance(b, np.ndarray):
                if not b.flags.c_contiguous:
                    raise ValueError(f"buffer {i}: arrays must be C-contiguous")
                if info and info[3] and not info[4] and not b.flags.writeable:
                    raise ValueError(f"buffer {i}: the kernel writes this buffer but the array is read-only")
                arr = b
            else:
                if isinstance(b, (bytes, bytearray, memoryview)):
                    arr = np.frombuffer(bytes(b), dtype=np.uint8).copy()
                elif isinstance(b, np.generic):
                    arr = np.array(b)
                elif isinstance(b, (bool, int, float)):
                    size = int(info[5]) if info and not info[3] else 4
                    if isinstance(b, float):
                        dt = _SCALAR_FLOAT.get(size, np.float32)
                    elif isinstance(b, bool):
                        dt = np.bool_ if size == 1 else _SCALAR_UINT.get(size, np.uint32)
                    else:
                        dt = (_SCALAR_INT if b < 0 else _SCALAR_UINT).get(size, np.int64)
                    arr = np.array(b, dtype=dt)
                else:
                    raise TypeError(f"buffer {i}: unsupported argument type {type(b).__name__}")
            keep.append(arr)
            ptrs[i] = arr.ctypes.data if arr.nbytes else None
            sizes[i] = arr.nbytes
        tg = list(threadgroup_memory)
        tgl = (ctypes.c_uint64 * max(1, len(tg)))(*[int(x) for x in tg])
        g = (ctypes.c_uint32 * 3)(*_as3(grid))
        t = (ctypes.c_uint32 * 3)(*_as3(threads))
        err = ctypes.create_string_buffer(4096)
        nfc = len(fc_idx)
        fci = (ctypes.c_int64 * max(1, nfc))(*fc_idx)
        fcb = (ctypes.c_uint64 * max(1, nfc))(*fc_bits)
        nsg = (int(np.prod(_as3(threads))) + 31) // 32
        ncnt = len(self._counters)
        prof = (ctypes.c_uint64 * (4 + ncnt * (2 + nsg)))() if profile else None
        kind = self._lib.jax_mfa_emu_dispatch(
            kernel.encode(), g, t, len(buffers), ptrs, sizes, len(tg), tgl, nfc, fci, fcb,
            0 if seed is None else 1, 0 if seed is None else int(seed) & 0xFFFFFFFFFFFFFFFF, 1 if check else 0,
            -1 if workers is None else int(workers), 1 if profile else 0, prof, nsg, err, len(err))
        del keep
        if kind != 0:
            raise _ERRORS.get(kind, MetalEmulatorError)(err.value.decode(errors="replace"))
        if not profile:
            return None
        vals = list(prof)
        names = self._counters

        def counters(off):
            return dict(zip(names, vals[off : off + ncnt]))

        return Profile(threads_per_threadgroup=vals[0], simdgroups_per_threadgroup=vals[1], threadgroups=vals[2],
                       threadgroup_memory_bytes=vals[3], total=counters(4), max_simdgroup=counters(4 + ncnt),
                       per_simdgroup=[counters(4 + ncnt * (2 + s)) for s in range(nsg)])
