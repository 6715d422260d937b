"""Sharded initialisation and forward on 8 fake CPU devices equal the single-device model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from step3_jax import KVCache, create_model, make_mesh
from step3_jax.sharding import DEFAULT_RULES

# (mesh axes, number of experts): expert-parallel meshes need experts divisible by the expert axis
MESHES = [
    (dict(data=8), 5),
    (dict(fsdp=4, tensor=2), 5),
    (dict(data=2, fsdp=2, tensor=2), 5),
    (dict(data=2, expert=4), 8),
    (dict(tensor=2, expert=4), 8),
    (dict(expert=8), 8),
]


def jit_forward(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    return lambda ids: f(state, ids)


@pytest.mark.parametrize("axes, experts", MESHES, ids=lambda v: str(v))
def test_sharded_forward_equals_single_device(test_config, axes, experts):
    config = dataclasses.replace(test_config, moe_num_experts=experts)
    mesh = make_mesh(**axes)
    ids = jax.random.randint(jax.random.key(0), (8, 12), 3, config.vocab_size, dtype=jnp.int32)
    want = jit_forward(create_model(config, seed=7))(ids)
    sharded = create_model(config, seed=7, mesh=mesh)
    got = jit_forward(sharded)(jax.device_put(ids, DEFAULT_RULES.sharding(mesh, ("act_batch", None), ids.shape)))
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # parameters really live in shards, as the rules say
    for path, var in nnx.to_flat_state(nnx.state(sharded, nnx.Param)):
        value = var.get_value()
        expect = DEFAULT_RULES.sharding(mesh, var.get_metadata()["logical_axes"], value.shape)
        assert value.sharding.is_equivalent_to(expect, value.ndim), path
    experts_w = sharded.layers[1].moe.gate_proj.get_value()
    shard_shape = experts_w.addressable_shards[0].data.shape
    assert shard_shape[0] == experts // mesh.shape["expert"]
    assert shard_shape[2] == config.moe_intermediate_size // mesh.shape["tensor"]


def test_sharded_decode_through_cache(test_config):
    config = dataclasses.replace(test_config, moe_num_experts=8)
    mesh = make_mesh(data=2, tensor=2, expert=2)
    model = create_model(config, seed=3, mesh=mesh)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    ids = jax.random.randint(jax.random.key(1), (4, 9), 3, config.vocab_size, dtype=jnp.int32)
    cache = KVCache.create(config, 4, 16, mesh=mesh)
    assert cache.k[0].sharding.spec[0] == "data"
    logits, cache = step(state, ids[:, :6], cache)
    outs = [logits]
    for t in range(6, 9):
        logits, cache = step(state, ids[:, t : t + 1], cache)
        outs.append(logits)
    want = jit_forward(create_model(config, seed=3))(ids)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=2e-5, atol=2e-5)


def test_impossible_splits_raise_clear_errors(test_config):
    with pytest.raises(ValueError, match="needs 12 devices, but 8"):
        make_mesh(data=3, tensor=4)
    with pytest.raises(ValueError, match="'tensor' must be a positive int"):
        make_mesh(tensor=0)
    mesh = make_mesh(data=2, expert=4)
    model = create_model(test_config, mesh=mesh)  # 5 experts cannot be split 4 ways
    with pytest.raises(ValueError, match="moe_num_experts = 5 cannot be split over mesh axes \\(expert\\)"):
        model(jnp.zeros((2, 3), jnp.int32))
