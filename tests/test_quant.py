import jax
import jax.numpy as jnp
import numpy as np
import pytest

from step3_jax.quant import (
    FP8_DTYPE,
    dequantize_activations,
    dequantize_blockwise,
    quantize_activations,
    quantize_blockwise,
)


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 130, 257), (5, 17)])
def test_block_quantisation_round_trip(shape):
    w = jax.random.normal(jax.random.key(0), shape) * jnp.linspace(0.01, 3.0, shape[-1])
    q, s = quantize_blockwise(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert s.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128)) and s.dtype == jnp.float32
    back = dequantize_blockwise(q, s)
    # e4m3 has 3 mantissa bits: relative error per element <= 2^-4 of its block's scale range
    err = np.abs(np.asarray(back) - np.asarray(w))
    assert err.max() <= 0.0625 * np.abs(np.asarray(w)).max()
    assert np.linalg.norm(err) / np.linalg.norm(np.asarray(w)) < 0.04


def test_block_scales_are_per_block():
    w = jnp.ones((256, 256)).at[:128, :128].multiply(100.0)
    _, s = quantize_blockwise(w)
    np.testing.assert_allclose(s, np.array([[100.0, 1.0], [1.0, 1.0]]) / 448.0, rtol=1e-6)


def test_zero_blocks_and_bad_scales():
    q, s = quantize_blockwise(jnp.zeros((130, 140)))
    assert np.all(np.asarray(dequantize_blockwise(q, s)) == 0) and np.all(np.asarray(s) == 1)
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_blockwise(q, s[:, :1])


def test_activation_quantisation_per_token_group():
    x = jax.random.normal(jax.random.key(1), (4, 300)) * jnp.arange(1, 5)[:, None]
    q, s = quantize_activations(x)
    assert q.shape == x.shape and s.shape == (4, 3)
    back = dequantize_activations(q, s)
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < 0.04
    np.testing.assert_allclose(s[:, 0], np.abs(np.asarray(x[:, :128])).max(-1) / 448.0, rtol=1e-6)
