"""The weight-initialisation generator: normal statistics, independent streams, reproducible on any sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from step3_jax import make_mesh
from step3_jax.init_rng import init_key

N = 1 << 20


def test_normal_draws_have_normal_statistics():
    x = np.asarray(jax.random.normal(init_key(0), (N,)), np.float64)
    se = 1 / np.sqrt(N)
    assert abs(x.mean()) < 5 * se and abs(x.std() - 1) < 5 * se
    # tail masses of N(0, 1): P(|x| > 2) = 0.0455, P(|x| > 3) = 0.0027 (binomial standard errors, 5 sigma)
    for t, p in ((2.0, 0.04550), (3.0, 0.00270)):
        assert abs(np.mean(np.abs(x) > t) - p) < 5 * np.sqrt(p * (1 - p) / N), t
    # neighbouring elements (consecutive counters) are uncorrelated, and so are rows of a matrix
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 5 * se
    m = x.reshape(1024, 1024)
    assert abs(np.corrcoef(m[:-1].ravel(), m[1:].ravel())[0, 1]) < 5 * se
    u = np.asarray(jax.random.uniform(init_key(1), (N,)), np.float64)
    assert np.histogram(u, bins=16, range=(0, 1))[0].min() > N / 16 * 0.98


def test_folded_and_split_keys_give_independent_streams():
    key = init_key(7)
    keys = [jax.random.fold_in(key, i) for i in range(16)] + list(jax.random.split(key, 16))
    draws = np.stack([np.asarray(jax.random.normal(k, (1 << 14,)), np.float64) for k in keys])
    corr = np.corrcoef(draws) - np.eye(len(keys))
    assert np.abs(corr).max() < 5 / np.sqrt(draws.shape[1])
    assert len({tuple(np.asarray(jax.random.key_data(k))) for k in keys}) == len(keys)
    np.testing.assert_array_equal(jax.random.normal(init_key(7), (8,)), jax.random.normal(key, (8,)))  # reproducible
    assert not np.array_equal(jax.random.normal(init_key(8), (8,)), jax.random.normal(key, (8,)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_same_values_on_one_device_and_sharded(dtype):
    mesh = make_mesh(data=2, tensor=4)
    draw = lambda seed: jax.random.normal(init_key(seed), (8, 12, 20), dtype)  # noqa: E731
    want = np.asarray(jax.jit(draw)(3).astype(jnp.float32))
    sharding = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
    got = jax.jit(draw, out_shardings=sharding)(3)
    assert got.sharding.is_equivalent_to(sharding, 3)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
