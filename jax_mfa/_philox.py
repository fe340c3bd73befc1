"""The attention-dropout generator in JAX: the same function as
metal/dropout_philox.h (C++/MSL), used by the "xla" paths and the tests.

Philox4x32-10 keyed by two 32-bit words of the PRNG key, counter
``(key // 4, query, head, batch)``, output word ``key % 4``; entry dropped iff
that word < ``threshold(rate)``. Works in uint32 only (no uint64), so it runs
without ``jax_enable_x64``.

The kernels' seed operand is (B, SEED_WORDS) uint32; per batch row: the two
key words and the counter origin, the global index of the row's batch and of
the call's first head, query and key (a kernel call on a part of the problem,
e.g. one device's heads or one ring block, adds it to its local indices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85

# Columns of the seed operand (MfaDropoutSeed in metal/dropout_philox.h).
KEY0, KEY1, BATCH, HEAD, QUERY, KEY = range(6)
SEED_WORDS = 6


def _mulhilo(a: int, b):
    """(high, low) 32-bit halves of the 64-bit product of constant a and uint32 b."""
    b = jnp.asarray(b, jnp.uint32)
    lo = jnp.uint32(a) * b
    a_lo, a_hi = jnp.uint32(a & 0xFFFF), jnp.uint32(a >> 16)
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll, lh, hl = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    hi = a_hi * b_hi + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi, lo


def philox4x32_10(counter, key):
    """Philox4x32-10 of a counter (4 uint32 arrays, broadcast together) under a
    key (2 uint32 scalars or arrays); returns the 4 output words."""
    x, y, z, w = (jnp.asarray(c, jnp.uint32) for c in counter)
    k0, k1 = (jnp.asarray(k, jnp.uint32) for k in key)
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, x)
        hi1, lo1 = _mulhilo(_M1, z)
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0 = k0 + jnp.uint32(_W0)
        k1 = k1 + jnp.uint32(_W1)
    return x, y, z, w


def threshold(rate: float) -> int:
    """Words below this are dropped: round(rate * 2^32), at most 2^32 - 1."""
    return min(int(round(rate * 2.0**32)), 2**32 - 1)


def key_words(rng) -> jax.Array:
    """The two uint32 words a PRNG key (typed or raw uint32) keys Philox with:
    its data words, XOR-folded into two when the key has more (e.g. "rbg")."""
    if jnp.issubdtype(jnp.result_type(rng), jax.dtypes.prng_key):
        data = jax.random.key_data(rng)
    else:
        data = jnp.asarray(rng)
    data = jnp.asarray(data, jnp.uint32).reshape(-1)
    if data.shape[0] % 2:
        data = jnp.concatenate([data, jnp.zeros((1,), jnp.uint32)])
    pairs = data.reshape(-1, 2)
    folded = pairs[0]
    for row in range(1, pairs.shape[0]):
        folded = folded ^ pairs[row]
    return folded


def dropout_words(k0, k1, batch, head, query, key):
    """The random word of each (batch, head, query, key) entry (arrays that
    broadcast together)."""
    key = jnp.asarray(key, jnp.uint32)
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (batch, head, query, key)))
    words = philox4x32_10((key >> 2, query, head, batch), (k0, k1))
    sel = jnp.broadcast_to(key & 3, shape)
    words = [jnp.broadcast_to(wd, shape) for wd in words]
    return jnp.where(sel == 0, words[0], jnp.where(sel == 1, words[1],
                                                   jnp.where(sel == 2, words[2], words[3])))


def make_seed(words, batch_rows) -> jax.Array:
    """The seed operand: key words (2,) and the counter's batch index of each
    row (B,), with head, query and key origins 0 (the whole problem)."""
    B = batch_rows.shape[0]
    return jnp.concatenate([jnp.broadcast_to(jnp.asarray(words, jnp.uint32), (B, 2)),
                            jnp.asarray(batch_rows, jnp.uint32)[:, None],
                            jnp.zeros((B, SEED_WORDS - 3), jnp.uint32)], axis=1)


def shift_origin(seed, *, head=0, query=0, key=0) -> jax.Array:
    """The seed of a part of the problem whose first head, query and key are
    (traced or static) `head`, `query`, `key` in the current part's indices."""
    offsets = [jnp.asarray(x).astype(jnp.uint32) for x in (head, query, key)]
    return seed.at[:, HEAD:KEY + 1].add(jnp.stack(offsets)[None, :])


def keep_mask(seed, rate: float, shape, *, broadcast: bool = False, q_start=0,
              k_start=0) -> jax.Array:
    """Boolean (B, N, T, S) keep mask. `seed` is the kernels' (B, SEED_WORDS)
    uint32 operand (see the module doc). With `broadcast`, the head index is 0
    (one mask for all heads). Queries and keys are at positions q_start + i and
    k_start + j from the seed's origin (a block of the call)."""
    B, N, T, S = shape
    seed = jnp.asarray(seed, jnp.uint32)
    column = lambda c: seed[:, c].reshape(B, 1, 1, 1)  # noqa: E731
    n = jnp.arange(N, dtype=jnp.uint32).reshape(1, N, 1, 1)
    n = jnp.zeros_like(n) if broadcast else column(HEAD) + n
    i = column(QUERY) + (jnp.asarray(q_start, jnp.uint32)
                         + jnp.arange(T, dtype=jnp.uint32)).reshape(1, 1, T, 1)
    j = column(KEY) + (jnp.asarray(k_start, jnp.uint32)
                       + jnp.arange(S, dtype=jnp.uint32)).reshape(1, 1, 1, S)
    words = dropout_words(column(KEY0), column(KEY1), column(BATCH), n, i, j)
    return words >= np.uint32(threshold(rate))
