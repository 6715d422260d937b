"""GPU interpret mode's need for XLA:CPU pool threads (``pallas_kernels/interpret.py``): with too few the simulated
warpgroups can deadlock (seen: a benchmark hung on this 2-core machine), so the kernels refuse, naming the fix."""

import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import interpret
from pallas_kernels import mfa_decode as md
from pallas_kernels.fp8_gmm import GmmConfig, fp8_grouped_matmul_kernel
from step3_jax.quant import quantize_activations, quantize_blockwise

ROOT = Path(__file__).parents[1]


def test_this_process_pool_is_counted_and_large_enough():
    # the test session asks for 8 CPU devices, which gives XLA:CPU at least 8 pool threads (one per core if more)
    assert interpret.xla_cpu_pool_threads() >= 8


def test_kernels_refuse_to_interpret_on_a_pool_that_can_hang(monkeypatch):
    monkeypatch.setattr(interpret, "xla_cpu_pool_threads", lambda: 2)  # a 2-core machine, one CPU device
    q = jnp.ones((1, 64, 256), jnp.bfloat16)
    pages = jnp.ones((2, 64, 256), jnp.bfloat16)
    table, lengths = jnp.array([[0, 1]], jnp.int32), jnp.array([70], jnp.int32)
    with pytest.raises(RuntimeError, match=r"MFA decode kernel \(2 warpgroups\) needs at least 4 .* has 2.*NPROC=8"):
        md.mfa_decode_kernel(q, pages, pages, table, lengths, scale=1.0, interpret=True)

    xq, xs = quantize_activations(jnp.ones((16, 128), jnp.float32))
    wq, ws = quantize_blockwise(jnp.ones((2, 128, 128), jnp.float32))
    with pytest.raises(RuntimeError, match=r"FP8 grouped GEMM kernel \(3 warpgroups\) needs at least 5"):
        fp8_grouped_matmul_kernel(xq, xs.T, wq, ws, jnp.array([8, 8], jnp.int32), config=GmmConfig(num_sms=1),
                                  interpret=True)  # fmt: skip

    monkeypatch.setattr(interpret, "xla_cpu_pool_threads", lambda: 5)  # enough: the kernel runs
    out = fp8_grouped_matmul_kernel(xq, xs.T, wq, ws, jnp.array([8, 8], jnp.int32), config=GmmConfig(num_sms=1),
                                    interpret=True)  # fmt: skip
    np.testing.assert_allclose(np.asarray(out, np.float32), 128.0, rtol=1e-2)


def test_benchmarks_size_the_pool_before_the_backend_starts():
    """What the kernel benchmarks do first: a fresh 1-device process on this machine (2 cores: a 2-thread pool)
    gets 8 pool threads; an explicit NPROC is kept."""
    code = (
        "from pallas_kernels.interpret import size_pool_for_interpret, xla_cpu_pool_threads\n"
        "size_pool_for_interpret()\nimport jax\njax.devices()\nprint(xla_cpu_pool_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in interpret.POOL_SIZE_ENV}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(fresh.stdout) == max(8, os.cpu_count())
    kept = subprocess.run([sys.executable, "-c", code], env=dict(env, NPROC="5"), capture_output=True, text=True,
                          check=True)  # fmt: skip
    assert int(kept.stdout) == 5
