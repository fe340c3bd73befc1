"""The CPU kernels' instruction-set paths (cpp/cpu), each against the float64
reference: the bfloat16 tile products on AMX-BF16 and on AVX512-BF16 (where
the CPU has them) and the portable float path that every x86-64 / arm64 CPU
takes, chosen with JAX_MFA_BF16_DOT ("0": portable, "avx512": AVX512-BF16 even
with AMX, unset: the best) so that CI runs every path its CPU has. float16's
forward takes the same instructions through exact bfloat16 hi/lo splits
(opt-in: JAX_MFA_F16_SPLIT=1, on AMX or AVX512-BF16).

The sizes are chosen to hit the dot-product path's edges: odd head dims (rows
of Q padded to a whole pair), odd key counts (P and V padded), key spans that
start at odd keys (windows, causal sub-tiles), tile shapes that are not
multiples of anything (JAX_MFA_TILES) run in row strips that are not either
(JAX_MFA_DOT_STRIP; AMX's default strips are 16 rows, whole plain tiles run them as a
pipeline), and short query blocks with the key
range split over threads (decoding itself, with fewer than 64 stacked query
rows per head, keeps the float path). The environment variables are read by the kernels on every
call, so both paths run in one process.
"""

from __future__ import annotations

import platform

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa

import test_attention  # its test function is called, not imported (pytest would collect it)
from support import IMPLEMENTATIONS
from test_attention import Case, build

pytestmark = pytest.mark.skipif("cpu" not in IMPLEMENTATIONS, reason="no cpu implementation")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


# Read independently of the kernels' own dispatch (which uses cpuid).
HAS_BF16_DOT = platform.machine() in ("x86_64", "AMD64") and {
    "avx512f", "avx512bw", "avx512_bf16"} <= _cpu_flags()
HAS_AMX = HAS_BF16_DOT and platform.system() == "Linux" and {
    "amx_tile", "amx_bf16"} <= _cpu_flags()

# Path name -> (JAX_MFA_BF16_DOT value, whether this CPU has it).
BF16_DOT = {"amx": ("amx", HAS_AMX), "avx512-bf16": ("avx512", HAS_BF16_DOT),
            "portable": ("0", True)}


def use_path(path, monkeypatch):
    """Selects the path for bfloat16 and (split into bfloat16 parts) float16."""
    flag, present = BF16_DOT[path]
    if not present:
        pytest.skip(f"this CPU has no {path}")
    monkeypatch.setenv("JAX_MFA_BF16_DOT", flag)
    monkeypatch.setenv("JAX_MFA_F16_SPLIT", "0" if path == "portable" else "1")

CASES = [
    Case("odd_sizes", T=77, S=301, N=6, K=2, H=17, batch=1),
    Case("window_odd_edges", T=300, S=283, N=2, K=1, H=33, window=(37, 5), batch=1),
    Case("causal_sub_tiles", T=300, S=290, N=2, K=1, H=64, causal=True, batch=1),
    Case("decode_split_keys", T=1, S=1301, N=8, K=1, H=64, batch=1),
    # One query block: the float path converts each key block in its task
    # (kv heads interleaved in memory with K > 1, causal sub-tiles).
    Case("decode_kv_heads_interleaved", T=3, S=777, N=6, K=3, H=19, batch=2),
    Case("one_query_block_causal", T=40, S=333, N=2, K=1, H=24, causal=True, batch=1),
    # 8 positions x 8 heads: enough stacked rows for the dot-product path.
    Case("short_prefill_split_keys", T=8, S=1301, N=8, K=1, H=64, batch=1),
    Case("transforms", T=70, S=129, N=2, K=2, H=40, bias="BNTS", softcap=3.0, mask="B11S",
         mask_empty_rows=True, q_lens=("T", 33), kv_lens=(5, "S")),
    Case("head_dim_128_gqa", T=65, S=200, N=4, K=1, H=128, batch=1, causal=True),
    # Whole 256-row tiles with whole 256-key blocks: AMX's strip pipeline
    # (bfloat16), with a short last key block and, causal, the diagonal's
    # sub-tiles beside it.
    Case("strip_pipeline", T=512, S=700, N=4, K=2, H=64, batch=1),
    # Windows whose key spans start off a tile at a head dim of whole AMX tiles.
    Case("window_h64", T=300, S=283, N=2, K=1, H=64, window=(37, 5), batch=1),
    Case("strip_pipeline_causal", T=600, S=600, N=2, K=2, H=128, causal=True, batch=1),
]


# (dtype, path, tiles): float16's backward always takes the portable path;
# float16's split shares its tiling with bfloat16's, so odd tiles run for
# bfloat16 and the portable float16 path only.
PATHS = [(dt, path, tiles) for dt in (jnp.bfloat16, jnp.float16) for path in BF16_DOT
         for tiles in (None, "37,61,40,40")
         if not (dt == jnp.float16 and path != "portable" and tiles)]


@pytest.mark.parametrize("dtype, path, tiles", PATHS,
                         ids=[f"{jnp.dtype(d).name}-{p}-{'odd' if t else 'default'}-tiles"
                              for d, p, t in PATHS])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_16_bit_paths(case, dtype, path, tiles, rng, monkeypatch):
    use_path(path, monkeypatch)
    monkeypatch.setenv("JAX_MFA_AMX_PIPELINE", "1")  # AMX's strip pipeline at every H it can take
    if tiles:  # and row strips that divide neither the tiles nor the heads' groups
        monkeypatch.setenv("JAX_MFA_TILES", tiles)
        monkeypatch.setenv("JAX_MFA_DOT_STRIP", "13")
    test_attention.test_against_reference(case, dtype, "cpu", rng)  # the main matrix's checks


@pytest.mark.parametrize("products", ["own", "blas"])
@pytest.mark.parametrize("tiles", [None, "37,61,40,40"], ids=["default-tiles", "odd-tiles"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_tile_products(case, products, tiles, rng, monkeypatch):
    """float32 on both tile products: AVX-512 register blocks (K^T in panels,
    tiles and sub-tiles starting on panels) where the CPU has AVX-512, and
    OpenBLAS (JAX_MFA_F32_TILES=blas), which the CPUs without it use."""
    monkeypatch.setenv("JAX_MFA_F32_TILES", products)
    if tiles:
        monkeypatch.setenv("JAX_MFA_TILES", tiles)
    test_attention.test_against_reference(case, jnp.float32, "cpu", rng)


@pytest.mark.skipif(not HAS_BF16_DOT, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_bf16_dot_path_is_taken(dtype, rng, monkeypatch):
    """The switch really changes the arithmetic (P is rounded to bfloat16 on
    the dot-product paths only; AMX sums the products in another order than
    AVX512-BF16), so the tests above cover distinct paths."""
    args, kwargs = build(Case("switch", T=65, S=130, H=32), dtype, "cpu", rng)
    q, k, v = args[:3]
    lse = {}
    for path in [p for p, (_, present) in BF16_DOT.items() if present]:
        use_path(path, monkeypatch)
        _, lse[path] = jax_mfa.attention(q, k, v, implementation="cpu", return_residual=True,
                                         **kwargs)
    paths = list(lse)
    for i, a in enumerate(paths):
        for b in paths[i + 1:]:
            assert not np.array_equal(np.asarray(lse[a]), np.asarray(lse[b])), (a, b)


@pytest.mark.parametrize("H", [33, 64])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("path", list(BF16_DOT))
def test_bf16_nan_propagates(path, dtype, H, rng, monkeypatch):
    """As in jax.nn (tests/test_nan.py, float32): an allowed NaN logit makes its
    row NaN; a NaN key that the causal mask hides is invisible. (H=64: whole
    AMX tiles, Q and P read in place; H=33: the copies into tiles.)"""
    use_path(path, monkeypatch)
    T, N = 300, 2
    q = np.asarray(rng.standard_normal((1, T, N, H)), np.float32)
    k = np.asarray(rng.standard_normal((1, T, N, H)), np.float32)
    v = np.asarray(rng.standard_normal((1, T, N, H)), np.float32)
    q[0, 5, 1, 3] = np.nan    # query row 5 of head 1
    k[0, 260, 0, 7] = np.nan  # key 260 of head 0: seen by rows >= 260 only
    out, lse = jax_mfa.attention(*(jnp.asarray(a, dtype) for a in (q, k, v)),
                                 is_causal=True, return_residual=True, implementation="cpu")
    out = np.asarray(out.astype(jnp.float32))[0]
    expected = np.zeros((T, N), bool)
    expected[5, 1] = True
    expected[260:, 0] = True
    np.testing.assert_array_equal(np.isnan(out).all(-1), expected)
    np.testing.assert_array_equal(np.isnan(out).any(-1), expected)
    np.testing.assert_array_equal(np.isnan(np.asarray(lse)[0]), expected)


@pytest.mark.skipif(not HAS_BF16_DOT, reason="this CPU has no AVX512-BF16")
def test_f16_split_lse_as_accurate_as_float_path(rng, monkeypatch):
    """The float16 split sums all four hi/lo products in Q K^T, so its lse is
    as accurate as the float path's (float32 accumulation of exact float16
    products); with lo*lo' dropped it was 17 times worse here (5e-5 against
    3e-6 on AVX512-BF16)."""
    T, S, N, H = 130, 301, 2, 64
    q = jnp.asarray(4 * rng.standard_normal((1, T, N, H)), jnp.float16)  # logits ~ N(0, 16)
    k, v = (jnp.asarray(rng.standard_normal((1, S, N, H)), jnp.float16) for _ in range(2))
    q64, k64 = (np.asarray(a, np.float64) for a in (q, k))
    logits = np.einsum("bqnh,bknh->bnqk", q64, k64) / np.sqrt(H)
    top = logits.max(-1, keepdims=True)
    ref = (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[..., 0]  # (1, N, T)
    errors = {}
    for path in [p for p, (_, present) in BF16_DOT.items() if present]:
        use_path(path, monkeypatch)
        _, lse = jax_mfa.attention(q, k, v, implementation="cpu", return_residual=True)
        errors[path] = np.abs(np.asarray(lse, np.float64).transpose(0, 2, 1) - ref).max()
    for path, err in errors.items():
        assert err <= 3 * errors["portable"] + 1e-7, errors
