"""Memory: the forward at long sequence lengths never materialises the T x S
scores. Runs in a subprocess and measures the growth of the peak resident set
(VmHWM) across the call, with the inputs already allocated; also checks a few
output rows against the reference computed for those rows only."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from support import IMPLEMENTATIONS, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numpy as np
    import jax
    import jax.numpy as jnp
    import jax_mfa
    import reference
    from jax_mfa._benchmark import peak_rss_during

    L, H, IMPL = {length}, 16, {impl!r}
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, L, 1, H)), jnp.float32) for _ in range(3))
    f = jax.jit(lambda q, k, v: jax_mfa.attention(q, k, v, is_causal=True,
                                                  return_residual=True, implementation=IMPL))
    compiled = f.lower(q, k, v).compile()  # compile before measuring
    jax.block_until_ready((q, k, v))
    (out, lse), growth, _ = peak_rss_during(compiled, q, k, v)  # resets the peak first
    growth /= 2**20
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and np.isfinite(lse).all()

    # Reference for a few rows only: row i of a causal problem sees keys 0..i,
    # so query rows [i] against keys [0, i] is exactly that row's problem.
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k, v))
    worst = 0.0
    for i in (0, 1, 63, 64, L // 2 + 3, L - 1):
        ro, rl = reference.attention(np, q64[:, i:i + 1], k64[:, :i + 1], v64[:, :i + 1])
        err = np.max(np.abs(out[:, i:i + 1] - ro)) / max(np.max(np.abs(ro)), 1e-30)
        worst = max(worst, err, abs(lse[0, i, 0] - rl[0, 0, 0]) / max(abs(rl[0, 0, 0]), 1.0))
    print(f"RESULT growth_mib={{growth:.1f}} worst_rel_err={{worst:.3g}}")
""")

SCORES_MIB = lambda length: length * length * 4 / 2**20  # noqa: E731  the T x S float32 scores


def _run(impl: str, length: int, timeout: float):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    code = SCRIPT.format(tests=os.path.join(REPO, "tests"), length=length, impl=impl)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("RESULT")][-1]
    fields = dict(kv.split("=") for kv in line.split()[1:])
    return float(fields["growth_mib"]), float(fields["worst_rel_err"])


# The emulator itself allocates per-dispatch state (fiber stacks, checker
# shadow memory), so RSS there says nothing about the kernels' working memory;
# the emulated kernels are checked for correctness elsewhere.
@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "metal-emulated"])
def test_memory_fast(impl):
    """T = S = 8192 (cpu preset): the scores would need 256 MiB."""
    length = preset(impl)["memory_len"]
    growth, err = _run(impl, length, timeout=600)
    bound = min(64.0, SCORES_MIB(length) / 4)
    assert growth < bound, f"peak RSS grew by {growth:.1f} MiB (bound {bound:.1f} MiB)"
    assert err < 1e-5, err


@pytest.mark.parametrize("impl", [i for i in IMPLEMENTATIONS if i != "metal-emulated"])
def test_memory_32k(impl):
    """T = S = 32768: the scores would need 4 GiB. (About 11 s on 2 cores for
    "cpu", so it runs by default.)"""
    growth, err = _run(impl, 32768, timeout=1800)
    assert growth < 512, f"peak RSS grew by {growth:.1f} MiB (bound 512 MiB)"
    assert err < 1e-5, err
