"""Sharded initialisation and forward on 8 fake CPU devices equal the single-device model."""

import collections
import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from step3_jax import KVCache, create_model, make_mesh
from step3_jax.kv_cache import PagedKVCache
from step3_jax.model import MoE, ShardCtx, abstract_model, param_shardings, use_fp8_gemm
from step3_jax.sharding import DEFAULT_RULES

# (mesh axes, number of experts): expert-parallel meshes need experts divisible by the expert axis
# (pure data parallelism is covered by the engine's data-parallel test; data x tensor x expert by
# test_sharded_decode_through_cache and the sharded training test; tensor x expert by the AFD FFN splits)
MESHES = [
    (dict(fsdp=4, tensor=2), 5),
    (dict(data=2, fsdp=2, tensor=2), 5),
    (dict(data=2, expert=4), 8),
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
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (8, 12)), jnp.int32)
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
    ids = jnp.asarray(np.random.default_rng(1).integers(3, config.vocab_size, (4, 9)), jnp.int32)
    cache = KVCache.create(config, 4, 16, mesh=mesh)
    assert cache.k[0].sharding.spec[0] == "data"
    logits, cache = step(state, ids[:, :6], cache)
    outs = [logits]
    for t in range(6, 9):
        logits, cache = step(state, ids[:, t : t + 1], cache)
        outs.append(logits)
    want = jit_forward(create_model(config, seed=3))(ids)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=2e-5, atol=2e-5)
    # a paged cache on this mesh: the pool is split between the 2 data groups and a block table's page ids are
    # local to its row's group; global ids (a whole-pool allocator's) are refused, not dropped or misread
    paged = PagedKVCache.create(config, [[0, 1], [2, 3], [0, 1], [2, 3]], num_pages=4, page_size=8)
    with pytest.raises(ValueError, match=r"each of the mesh's 2 data-parallel groups holds 2 of the 4 pages"):
        model(ids, cache=paged)


def test_impossible_splits_raise_clear_errors(test_config):
    with pytest.raises(ValueError, match="needs 12 devices, but 8"):
        make_mesh(data=3, tensor=4)
    with pytest.raises(ValueError, match="'tensor' must be a positive int"):
        make_mesh(tensor=0)
    mesh = make_mesh(data=2, expert=4)
    with pytest.raises(ValueError, match="moe_num_experts = 5 cannot be split over mesh axes \\(expert\\)"):
        create_model(test_config, mesh=mesh)  # 5 experts cannot be split 4 ways: refused before any work
    with pytest.raises(ValueError, match="moe_intermediate_size = 36 cannot be split over mesh axes"):
        create_model(test_config, mesh=make_mesh(tensor=8))


def _primitive_counts(jaxpr) -> collections.Counter:
    """How often each primitive occurs in ``jaxpr``, its sub-jaxprs included."""
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            counts += _primitive_counts(sub)
    return counts


def _distinct_ids(rng, rows: int, k: int, choices) -> np.ndarray:
    return np.stack([rng.choice(choices, k, replace=False) for _ in range(rows)]).astype(np.int32)


# float rows (ids as one more column) on a multi-axis mesh; FP8 bytes on 8-way expert parallelism
@pytest.mark.parametrize(
    "axes, quantization",
    [(dict(data=2, tensor=2, expert=2), None), (dict(expert=8), "fp8")],
    ids=["data2-tensor2-expert2", "expert8-fp8"],
)
def test_all_to_all_dispatch_equals_one_device(test_config, axes, quantization):
    """Expert parallelism by all_to_all (tokens stay on their device; each token-expert pair travels to its
    expert's owner and back; with FP8 experts as FP8 bytes) gives the single-device MoE's outputs and gradients, for
    even routing, a hot expert shard, and every pair on one shard (the largest send capacity); a batch that does not
    split over the batch x expert devices takes the all-gather path and is equally right."""
    config = dataclasses.replace(test_config, moe_num_experts=8, quantization=quantization)
    mesh = make_mesh(**axes)
    single, sharded = MoE(config, rngs=nnx.Rngs(3), ctx=ShardCtx()), MoE(config, rngs=nnx.Rngs(3), ctx=ShardCtx(mesh))
    e, k, d = config.moe_num_experts, config.moe_top_k, config.hidden_size
    local = e // mesh.shape["expert"]

    def grad_fn(moe):
        graphdef, state = nnx.split(moe)

        def loss(state, x, w, ids):
            out = nnx.merge(graphdef, state).experts(x, w, ids)
            return jnp.sum(out.astype(jnp.float32) ** 2), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), state

    (want_fn, want_state), (got_fn, got_state) = grad_fn(single), grad_fn(sharded)
    rng = np.random.default_rng(4)
    # 256: 64 or 128 tokens per device, enough for the larger send capacities to be needed; 6: the fallback
    for batch in (256, 6) if mesh.shape["data"] > 1 else (256,):
        x = jnp.asarray(rng.standard_normal((batch, 2, d)), jnp.float32)
        w = jnp.asarray(rng.random((batch, 2, k)), jnp.float32)
        routings = {
            "even": _distinct_ids(rng, batch * 2, k, np.arange(e)),
            "hot shard": np.where(rng.random((batch * 2, 1)) < 0.7, 0, _distinct_ids(rng, batch * 2, k, np.arange(e))),
        }
        if local >= k:
            routings["one shard"] = _distinct_ids(rng, batch * 2, k, np.arange(local))
        for name, ids in routings.items():
            ids = np.asarray(ids, np.int32)
            ids[:, 1:] = np.where(ids[:, 1:] == ids[:, :1], (ids[:, :1] + 1) % e, ids[:, 1:])  # distinct per token
            ids = jnp.asarray(ids.reshape(batch, 2, k))
            (_, want), (want_gs, want_gx) = want_fn(want_state, x, w, ids)
            (_, got), (got_gs, got_gx) = got_fn(got_state, x, w, ids)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{batch} {name}")
            np.testing.assert_allclose(got_gx, want_gx, rtol=1e-4, atol=1e-4, err_msg=f"{batch} {name}")
            want_by_path = dict(nnx.to_flat_state(want_gs))
            for path, g in nnx.to_flat_state(got_gs):
                np.testing.assert_allclose(
                    g.get_value(), want_by_path[path].get_value(), rtol=1e-4, atol=1e-4, err_msg=str(path)
                )
        counts = _primitive_counts(jax.make_jaxpr(sharded.experts)(x, w, ids).jaxpr)
        # per capacity branch: rows out and back; one pmax to agree on the capacity
        assert (counts["all_to_all"] > 2, counts["pmax"]) == ((True, 1) if batch == 256 else (False, 0)), counts
    # decoding 8 sequences (one or two tokens per device): one send capacity, so no pmax to agree on it
    x, w, ids = jnp.zeros((8, 1, d)), jnp.zeros((8, 1, k)), jnp.zeros((8, 1, k), jnp.int32)
    counts = _primitive_counts(jax.make_jaxpr(sharded.experts)(x, w, ids).jaxpr)
    assert counts["all_to_all"] == 2 and counts["pmax"] == 0, counts
    sharded.dispatch = "ring"
    with pytest.raises(ValueError, match="MoE dispatch must be one of \\('all_to_all', 'all_gather'\\), got 'ring'"):
        sharded.experts(x, w, ids)


@pytest.mark.parametrize("impl", [None, "reference"], ids=["xla", "kernel-path"])
def test_fp8_attention_splits_by_heads_and_sharded_forward_equals_single_device(test_config, impl):
    """FP8 projections in the HF layout split as their float counterparts do: wq's [H*K] rows and o_proj's [H*K]
    columns over ``tensor`` (4 heads x 64 = two 128-blocks: one block and its scale per shard), and the sharded
    FP8 model computes what one device computes: with the products left to XLA's partitioner (the CPU path), and
    on the path the FP8 GEMM kernel takes on a GPU (forced here with its pure-JAX reference), where every FP8
    projection runs inside ``shard_map`` on its own shard (a kernel is opaque to the partitioner)."""
    config = dataclasses.replace(test_config, head_dim=64, moe_num_experts=8, quantization="fp8")
    # Routed experts' FFN columns stay whole here: split over ``tensor``, an expert FFN narrower than one 128-block
    # quantises its down-projection input per shard (groups of 18 columns instead of 36), a different grouping.
    rules = dataclasses.replace(DEFAULT_RULES, expert_mlp=None)
    mesh = make_mesh(data=2, tensor=2, expert=2)
    sharded = create_model(config, seed=5, mesh=mesh, rules=rules)
    attn = sharded.layers[0].self_attn
    for name, dim in (("wq", 0), ("o_proj", 1)):
        for value in (getattr(attn, name).get_value(), getattr(attn, name + "_scale_inv").get_value()):
            assert value.sharding.spec[dim] == "tensor", name
            assert value.addressable_shards[0].data.shape[dim] == value.shape[dim] // 2, name
    assert attn.wq.get_value().addressable_shards[0].data.shape == (128, config.share_q_dim)
    # the same weights on one device (a model built without a mesh, no second initialisation)
    graphdef = nnx.graphdef(abstract_model(config))
    single = nnx.merge(graphdef, jax.device_put(nnx.state(sharded), jax.devices()[0]))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (8, 12)), jnp.int32)
    ids_sharded = jax.device_put(ids, rules.sharding(mesh, ("act_batch", None), ids.shape))
    with use_fp8_gemm(impl):
        want = jit_forward(single)(ids)
        got = jit_forward(sharded)(ids_sharded)
        n_maps = _primitive_counts(jax.make_jaxpr(lambda ids: sharded(ids))(ids_sharded).jaxpr)["shard_map"]
    # the routed experts of each MoE layer run in shard_map anyway; on the kernel path also 5 attention
    # projections per layer and the 3 products of each dense MLP / shared expert
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    assert n_maps == moe_layers + (0 if impl is None else 8 * config.num_hidden_layers)
    # splitting o_proj's sum over heads reorders float32 additions; a last-bit difference could flip the FP8
    # rounding of a later activation (a 2^-4 step in one channel), so most tokens agree to float32 noise and the
    # rest stay close; a layout or scale error would hit every token
    got, want = np.asarray(got), np.asarray(want)
    token_diff = np.abs(got - want).max(-1)
    assert np.mean(token_diff < 1e-4) >= 0.9, token_diff
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_fp8_mlp_whose_shards_hold_part_of_a_scale_block_keeps_its_numbers_on_the_kernel_path(test_config):
    """A dense FP8 MLP 704 wide (5.5 blocks of 128) split over tensor=2 leaves 352 rows per shard, so a shard's
    rows do not line up with its scale blocks: on the GPU's kernel path (forced here with its reference) the
    product then gathers the output rows instead of applying a shard's scales to another block's rows."""
    from step3_jax.model import fp8_linear

    config = dataclasses.replace(test_config, quantization="fp8", intermediate_size=704, num_hidden_layers=1,
                                 moe_layers_enum=())  # fmt: skip
    sharded = create_model(config, seed=1, mesh=make_mesh(data=4, tensor=2))
    single = nnx.merge(nnx.graphdef(abstract_model(config)), jax.device_put(nnx.state(sharded), jax.devices()[0]))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 5, config.hidden_size)), jnp.float32)
    mlp, ref = sharded.layers[0].mlp, single.layers[0].mlp
    assert mlp.gate_proj.get_value().addressable_shards[0].data.shape[0] == 352
    with use_fp8_gemm("reference"):
        for name in ("gate_proj", "up_proj"):
            got, want = fp8_linear(mlp, name, x, mlp.ctx), fp8_linear(ref, name, x, ref.ctx)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5, err_msg=name)


def test_fp8_attention_split_through_a_scale_block_is_refused(test_config):
    # 4 heads x 48 = 192 rows over tensor=2: 96 per shard would cut the second 128-block; said before any work
    config = dataclasses.replace(test_config, head_dim=48, quantization="fp8")
    message = (
        r"model\.layers\.0\.self_attn\.(wq|o_proj)\.weight: dimension [01] of size 192 \(logical axis 'heads'\) "
        r"split over mesh axes \(tensor\) of total size 2 leaves 96 per shard; block-FP8 weights need whole 128-wide"
    )
    with pytest.raises(ValueError, match=message):
        param_shardings(nnx.state(abstract_model(config)), make_mesh(data=4, tensor=2))
    # the float model splits those heads as usual
    param_shardings(
        nnx.state(abstract_model(dataclasses.replace(config, quantization=None))), make_mesh(tensor=2, data=4)
    )
