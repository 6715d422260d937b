import dataclasses

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from step3_jax import KVCache, Step3ForCausalLM, create_model, get_preset
from step3_jax import model as model_lib
from step3_jax.init_rng import init_key
from step3_jax.kv_cache import PagedKVCache
from step3_jax.model import MoE, RMSNorm, ShardCtx, grouped_experts, grouped_matmul, rope, row_buckets


@pytest.fixture(scope="module")
def model(test_config):
    return create_model(test_config, seed=0)


@pytest.fixture(scope="module")
def forward(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, positions=None):
        return nnx.merge(graphdef, state)(ids, positions)

    return lambda ids, positions=None: f(state, ids, positions)


@pytest.fixture(scope="module")
def step(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, ids, cache):
        return nnx.merge(graphdef, state)(ids, cache=cache)

    return lambda ids, cache: f(state, ids, cache)


def normal(seed, shape):
    """Standard normal float32 test inputs drawn with numpy (no per-shape compilation of jax.random on the CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


def random_ids(seed, shape, vocab):
    return jnp.asarray(np.random.default_rng(seed).integers(3, vocab, shape), jnp.int32)


def test_public_api_shapes_and_dtypes(test_config):
    m = Step3ForCausalLM(get_preset("test"), rngs=nnx.Rngs(init_key(0)))  # the notebook way, eager
    assert m.layers[1].moe.gate_proj.get_value().dtype == jnp.bfloat16
    logits = m(jnp.zeros((2, 5), jnp.int32))
    assert logits.shape == (2, 5, test_config.vocab_size) and logits.dtype == jnp.float32
    f32 = create_model(test_config, seed=0)
    assert f32.layers[1].moe.gate_proj.get_value().dtype == jnp.float32
    # create_model is the same initialisation as the constructor with the init generator's key, compiled
    np.testing.assert_array_equal(create_model(get_preset("test"), seed=0).lm_head.get_value(), m.lm_head.get_value())


@pytest.mark.parametrize("prompt_len", [1, 4, 11])
def test_incremental_decode_equals_full_forward(test_config, forward, step, prompt_len):
    total = 16
    ids = random_ids(prompt_len, (2, total), test_config.vocab_size)
    full = forward(ids)
    cache = KVCache.create(test_config, 2, 32)
    logits, cache = step(ids[:, :prompt_len], cache)
    pieces = [logits]
    for t in range(prompt_len, total):
        logits, cache = step(ids[:, t : t + 1], cache)
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [total, total]


def test_ragged_batch_through_cache_matches_each_sequence(test_config, forward, step):
    """Right-padded prompts of different lengths: padding written past a sequence's length is never read."""
    lens = [3, 7]
    ids = random_ids(5, (2, 9), test_config.vocab_size)
    cache = KVCache.create(test_config, 2, 16)
    _, cache = step(ids[:, :7], cache)  # row 0 also writes 4 padding tokens after its 3 real ones
    cache = cache.replace(lengths=jnp.asarray(lens, jnp.int32))
    nxt = random_ids(6, (2, 1), test_config.vocab_size)
    logits, _ = step(nxt, cache)
    for row, n in enumerate(lens):
        seq = jnp.concatenate([ids[row : row + 1, :n], nxt[row : row + 1]], axis=1)
        np.testing.assert_allclose(logits[row, 0], forward(seq)[0, -1], rtol=1e-5, atol=1e-5)


def test_causality(test_config, forward):
    ids = random_ids(1, (1, 12), test_config.vocab_size)
    changed = ids.at[0, 8].set((ids[0, 8] + 17) % test_config.vocab_size)
    a, b = forward(ids), forward(changed)
    np.testing.assert_array_equal(a[:, :8], b[:, :8])
    assert not np.allclose(a[:, 8:], b[:, 8:])


def test_positions_enter_only_relatively(test_config, forward):
    ids = random_ids(2, (1, 6), test_config.vocab_size)
    pos = jnp.arange(6, dtype=jnp.int32)[None]
    default = forward(ids)
    np.testing.assert_allclose(default, forward(ids, pos), rtol=1e-6, atol=1e-6)
    # rope: a common shift of every position changes nothing, a change of spacing does
    np.testing.assert_allclose(default, forward(ids, pos + 100), rtol=1e-4, atol=1e-4)
    assert not np.allclose(default[:, 1:], forward(ids, pos * 3)[:, 1:], atol=1e-3)


def test_rope_is_neox_rotation():
    x = normal(0, (1, 3, 2, 8))
    pos = jnp.array([[0, 1, 5]])
    y = rope(x, pos, 10000.0)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    # pair (i, i + K/2) rotates by angle pos * theta^(-2i/K)
    ang = 5 * 10000.0 ** (-2 * 1 / 8)
    x1, x2 = x[0, 2, 0, 1], x[0, 2, 0, 5]
    np.testing.assert_allclose(y[0, 2, 0, 1], x1 * np.cos(ang) - x2 * np.sin(ang), rtol=1e-5)
    np.testing.assert_allclose(y[0, 2, 0, 5], x2 * np.cos(ang) + x1 * np.sin(ang), rtol=1e-5)


def test_rmsnorm_computes_in_float32():
    norm = RMSNorm(8, 1e-5, jnp.bfloat16)
    x = (jnp.arange(8, dtype=jnp.float32) * 1000 + 3).astype(jnp.bfloat16)[None]
    y = norm(x)
    x32 = x.astype(jnp.float32)
    ref = x32 / jnp.sqrt(jnp.mean(x32**2) + 1e-5)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), ref.astype(jnp.bfloat16).astype(jnp.float32), rtol=1e-2)


@pytest.fixture(scope="module")
def moe(test_config):
    return MoE(test_config, rngs=nnx.Rngs(3), ctx=ShardCtx())


def test_grouped_moe_equals_loop_reference(test_config, moe):
    x = normal(1, (3, 7, test_config.hidden_size))
    grouped = jax.jit(lambda x: moe(x, impl="grouped"))(x)
    loop = jax.jit(lambda x: moe(x, impl="loop"))(x)
    np.testing.assert_allclose(grouped, loop, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(grouped).mean()) > 1e-3  # not trivially zero


def test_grouped_moe_with_empty_and_crowded_experts(test_config, moe):
    """Every token routed to the same two experts: the other groups are empty."""
    x = normal(2, (1, 9, test_config.hidden_size))
    ids = jnp.broadcast_to(jnp.array([3, 0], jnp.int32), (1, 9, 2))
    w = jnp.full((1, 9, 2), 0.4)
    np.testing.assert_allclose(moe.experts(x, w, ids, "grouped"), moe.experts(x, w, ids, "loop"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [None, 4096], ids=["one-chunk", "chunked"])
def test_grouped_matmul_equals_ragged_dot_at_the_cost_of_its_rows(monkeypatch, chunk_bytes):
    """On the CPU the grouped GEMM is tiled per group (``tiled_ragged_dot``): the values and gradients of
    ``lax.ragged_dot`` for uneven, empty, one-row and all-in-one groups and rows past the last group, with the
    weights gathered in one chunk or several; and its compiled FLOPs stay near the useful 2 x rows x I x O,
    where XLA's ``ragged_dot`` pays that once per group."""
    if chunk_bytes:
        monkeypatch.setattr(model_lib, "TILE_CHUNK_BYTES", chunk_bytes)  # 4 tiles' weights per chunk
    rng = np.random.default_rng(5)
    i, o = 16, 16

    def loss(f):
        def fn(x, w, gs, ct):
            out = f(x, w, gs)
            return jnp.sum(out * ct), out

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))

    got_fn = loss(grouped_matmul)
    want_fn = loss(lambda x, w, gs: jax.lax.ragged_dot(x, w, gs, preferred_element_type=jnp.float32))
    for sizes in ([10, 0, 25, 1, 0, 3, 0, 0], [40, 0, 0, 0, 0, 0, 0, 0], [5, 5, 5, 5, 5, 5, 5, 3]):  # 40 rows
        x, w = jnp.asarray(rng.standard_normal((40, i)), jnp.float32), jnp.asarray(rng.standard_normal((8, i, o)))
        ct, gs = jnp.asarray(rng.standard_normal((40, o)), jnp.float32), jnp.asarray(sizes, jnp.int32)
        (_, got), got_g = got_fn(x, w, gs, ct)
        (_, want), want_g = want_fn(x, w, gs, ct)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=str(sizes))
        assert sum(sizes) == 40 or not np.asarray(got[sum(sizes) :]).any()
        for a, b in zip(got_g, want_g, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=str(sizes))
    a, g = 512, 16
    args = (jnp.zeros((a, 64)), jnp.zeros((g, 64, 32)), jnp.full((g,), a // g, jnp.int32))
    flops = jax.jit(grouped_matmul).lower(*args).compile().cost_analysis()["flops"]
    assert flops < 2 * (2 * a * 64 * 32), flops


def _shard_ids(seed, n, c, num_experts, owned, p_owned):
    """Top-k style ids (distinct per token): each slot picks an owned expert with probability ``p_owned``."""
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(np.arange(num_experts), owned)
    ids = np.empty((n, c), np.int32)
    for i in range(n):
        k = rng.binomial(c, p_owned)
        ids[i] = np.r_[rng.choice(owned, k, replace=False), rng.choice(others, c - k, replace=False)]
    return jnp.asarray(ids)


def test_expert_shard_runs_only_the_rows_it_needs():
    """One expert shard of several (experts 4..7 of 16): the bucketed path gives exactly the all-pairs result and
    gradients, for routings with no, few, typical and only owned pairs, and its grouped GEMMs run at the bucket
    sizes (a quarter of the pairs and up), not always at all N*C pairs."""
    n, c, d, f, e, first = 64, 3, 32, 48, 16, 4
    x, w = normal(10, (n, d)), jnp.asarray(np.random.default_rng(11).random((n, c)), jnp.float32)
    gate, up, down = (0.2 * normal(12 + i, s) for i, s in enumerate([(4, d, f), (4, d, f), (4, f, d)]))
    caps = row_buckets(n * c, 4, e)
    assert caps == (64, 120, 192)  # 1.25x the shard's even share (48 pairs), doubling, then all pairs

    def loss(x, gate, ids, num_experts):
        out = grouped_experts(x, w, ids, gate, up, down, first_expert=first, num_experts=num_experts)
        return jnp.sum(out**2), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=3)
    for seed, p in enumerate((0.0, 0.15, 0.5, 1.0)):
        ids = _shard_ids(seed, n, c, e, np.arange(first, first + 4), p)
        (_, want), want_g = grad(x, gate, ids, None)
        (_, got), got_g = grad(x, gate, ids, e)
        np.testing.assert_array_equal(got, want)
        for a, b in zip(got_g, want_g, strict=True):  # (weight gradients sum rows in another order per bucket)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert (p == 0.0) == (float(jnp.abs(got).max()) == 0.0)

    jaxpr = jax.make_jaxpr(lambda ids: grouped_experts(x, w, ids, gate, up, down, first_expert=first, num_experts=e))
    rows = set()

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "ragged_dot_general":
                rows.add(eqn.invars[0].aval.shape[0])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr(ids).jaxpr)
    assert rows == set(caps)


def test_router_semantics(test_config, moe):
    x = normal(4, (2, 5, test_config.hidden_size))
    weights, ids = moe.route(x)
    assert weights.dtype == jnp.float32 and ids.shape == (2, 5, test_config.moe_top_k)
    total = weights.sum(-1)
    assert bool(jnp.all(total < 1.0)) and bool(jnp.all(total > 0))  # top-k of a softmax, not renormalised
    probs = jax.nn.softmax(x @ moe.gate.get_value(), axis=-1)
    np.testing.assert_allclose(weights, jnp.sort(probs, axis=-1)[..., ::-1][..., : test_config.moe_top_k], rtol=1e-5)
    renorm = MoE(dataclasses.replace(test_config, norm_expert_weight=True), rngs=nnx.Rngs(3), ctx=ShardCtx())
    np.testing.assert_allclose(renorm.route(x)[0].sum(-1), 1.0, rtol=1e-5)


def test_shared_expert_always_added(test_config, model):
    layer = model.layers[1]
    assert layer.is_moe
    x = normal(5, (1, 4, test_config.hidden_size))
    full = layer.ffn(x)
    np.testing.assert_allclose(full, layer.moe(x) + layer.share_expert(x), rtol=1e-5, atol=1e-6)
    # with no routed weight at all, the shared expert alone remains
    ids = jnp.zeros((1, 4, test_config.moe_top_k), jnp.int32)
    only_shared = layer.ffn(x, routing=(jnp.zeros((1, 4, test_config.moe_top_k)), ids))
    np.testing.assert_allclose(only_shared, layer.share_expert(x), rtol=1e-6)
    assert float(jnp.abs(only_shared).mean()) > 1e-3


def test_dense_layers_follow_moe_layers_enum(test_config, model):
    kinds = [layer.is_moe for layer in model.layers]
    assert kinds == [i in test_config.moe_layers_enum for i in range(test_config.num_hidden_layers)]
    assert not hasattr(model.layers[0], "moe") and hasattr(model.layers[0], "mlp")


def test_bad_inputs_raise_clear_errors(model):
    with pytest.raises(ValueError, match="batch, time"):
        model(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 5), jnp.float32))
    with pytest.raises(ValueError, match="impl"):
        model.layers[1].moe(jnp.zeros((1, 2, 40)), impl="dense")
    with pytest.raises(ValueError, match="max_position_embedding"):
        KVCache.create(model.config, 1, 10_000)


def test_a_cache_that_cannot_take_the_tokens_is_refused_not_corrupted(model, step):
    """Eager calls (a notebook's) check the cache first: a contiguous cache's overflow (which would overwrite its
    earlier slots), a block table too short or with page ids outside the pool (which would drop or misread
    tokens), lengths of another batch size, and cache dtypes that cannot hold KV; the cache is left as it was."""
    cfg, ids = model.config, random_ids(3, (1, 10), model.config.vocab_size)
    cache = KVCache.create(cfg, 1, 8)
    _, cache = step(ids[:, :8], cache)
    with pytest.raises(ValueError, match="KV cache overflow: 2 more tokens after 8 make 10, past its max_length 8"):
        model(ids[:, 8:], cache=cache)
    assert cache.lengths.tolist() == [8]
    with pytest.raises(ValueError, match=r"block_table page ids span 0 \.\. 5, outside the pool of 4 pages"):
        PagedKVCache.create(cfg, [[0, 5, 1]], num_pages=4, page_size=4)
    with pytest.raises(ValueError, match=r"lengths must be \[batch\] = \(1,\)"):
        PagedKVCache.create(cfg, [[0, 1, 2]], num_pages=4, page_size=4, lengths=[0, 0, 0])
    paged = PagedKVCache.create(cfg, [[0, 1]], num_pages=4, page_size=4)
    with pytest.raises(ValueError, match="paged KV cache overflow: 10 tokens need more than the block table's 2 pages"):
        model(ids, cache=paged)
    with pytest.raises(ValueError, match=r"the cache's lengths have shape \(1,\), the batch is 2"):
        model(jnp.concatenate([ids, ids]), cache=cache)
    for bad in ("int8", "float8_e4m3fn"):
        with pytest.raises(ValueError, match="KVCache dtype must be bfloat16 or float32"):
            KVCache.create(cfg, 1, 8, dtype=bad)
    with pytest.raises(ValueError, match="PagedKVCache dtype must be None"):
        PagedKVCache.create(cfg, [[0, 1]], num_pages=4, page_size=4, dtype="int8")


def test_fp8_model_paged_decode_equals_full_forward(test_config):
    """The FP8 model (attention projections, FFNs and experts block-FP8) through the engine's paged cache, one
    token at a time (the MFA decode dispatcher), computes what its full forward computes: FP8 activations are
    quantised per token, so a token's GEMMs see the same numbers whichever way the batch is cut. Pages shuffled."""
    config = dataclasses.replace(test_config, quantization="fp8")
    model = create_model(config, seed=0)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ids, cache: nnx.merge(graphdef, state)(ids, cache=cache))
    total, prompt_len, page_size = 12, 5, 4
    ids = random_ids(7, (2, total), config.vocab_size)
    table = np.random.default_rng(0).permutation(8).reshape(2, 4).astype(np.int32)
    cache = PagedKVCache.create(config, table, num_pages=8, page_size=page_size)
    logits, cache = step(state, ids[:, :prompt_len], cache)
    pieces = [logits]
    for t in range(prompt_len, total):
        logits, cache = step(state, ids[:, t : t + 1], cache)
        pieces.append(logits)
    full = nnx.merge(graphdef, state)(ids)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-4, atol=1e-4)
