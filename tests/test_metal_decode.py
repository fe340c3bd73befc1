"""The split-key decode path (metal/attention_decode.h) through the Metal emulator, every checker on.

The plan picks it for T <= 8 queries over at least JAX_MFA_METAL_DECODE_MIN_KEYS keys (1024 by
default; lowered to 1 here so that small problems take it, with several key splits each since a
split holds at least 128 keys). Forward (out, lse) and the gradients that the regular backward
kernels compute from the decode path's lse, against the CPU kernels; the plan's choice itself is
unit-tested in tests/host/host_policy_test.cc (test_decode_plan).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jax_mfa
from test_metal_emulated import compare

pytestmark = pytest.mark.skipif(
    "metal-emulated" not in jax_mfa.available_implementations(),
    reason="the metal-emulated backend is not built")


@pytest.fixture(autouse=True)
def force_decode(monkeypatch):
    monkeypatch.setenv("JAX_MFA_METAL_DECODE_MIN_KEYS", "1")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16], ids=["f32", "f16", "bf16"])
def test_gqa_single_query(rng, dtype):
    # T = 1, GQA 8:1 (one 8-row tile), 300 keys: 3 splits, the last partial.
    compare(rng, B=2, T=1, S=300, N=8, K=1, H=64, dtype=dtype)


@pytest.mark.parametrize("H", [8, 56, 80, 104, 256])
def test_head_dims(rng, H):
    compare(rng, B=1, T=2, S=261, N=4, K=2, H=H)


def test_many_rows(rng):
    # T = 8 queries x G = 8 heads: 64 rows, 8 tiles of 8 rows per kv head.
    compare(rng, B=1, T=8, S=200, N=16, K=2, H=16)


@pytest.mark.parametrize("kw", [
    dict(is_causal=True),
    dict(local_window_size=(40, 3)),
    dict(softcap=2.0, scale=0.6),
], ids=["causal", "window", "softcap"])
def test_logit_rules(rng, kw):
    compare(rng, B=1, T=5, S=290, N=4, K=2, H=16, **kw)


def test_bias_and_mask(rng):
    compare(rng, B=2, T=3, S=270, N=4, K=2, H=16, bias_shape=(2, 4, 3, 270), mask_shape=(1, 4, 3, 270))


def test_lengths_and_empty_rows(rng):
    ql = jnp.asarray([2, 0, 4], jnp.int32)
    kl = jnp.asarray([200, 150, 0], jnp.int32)
    out, lse, _ = compare(rng, B=3, T=4, S=260, N=2, K=1, H=16, query_seq_lengths=ql,
                          key_value_seq_lengths=kl)
    assert np.all(np.asarray(out)[2] == 0) and np.all(np.isneginf(np.asarray(lse)[2]))


def test_key_lengths_cut_visible_steps(rng):
    # Every query valid: steps before the key length are visible (no
    # per-element rules), the step holding it is an edge step.
    kl = jnp.asarray([200, 131], jnp.int32)
    compare(rng, B=2, T=2, S=260, N=4, K=2, H=16, key_value_seq_lengths=kl)


def test_random_schedule(rng, monkeypatch):
    monkeypatch.setenv("JAX_MFA_EMULATOR_SEED", "7")
    compare(rng, B=1, T=1, S=400, N=8, K=2, H=32, is_causal=True)


def test_segments_sinks_dropout_take_the_regular_forward(rng):
    # The decode kernels have no segment ids, sinks or dropout: the plan
    # (use_decode) sends such calls to the regular forward kernel.
    import jax
    B, T, S = 2, 3, 270
    compare(rng, B=B, T=T, S=S, N=4, K=2, H=16,
            query_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, T)), 1), jnp.int32),
            key_value_segment_ids=jnp.asarray(np.sort(rng.integers(0, 3, (B, S)), 1), jnp.int32),
            sinks=jnp.asarray(rng.standard_normal(4), jnp.float32), dropout_rate=0.2,
            dropout_rng=jax.random.key(5))
