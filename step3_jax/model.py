"""Step-3 text model in Flax NNX: MFA attention + MoE FFN.

Einsum letters:
  B batch, T time (queries), S key/value length, D model width, Q low-rank query width (share_q_dim),
  G KV heads (num_attention_groups; 1 in Step-3), R query heads per KV head, H query heads (G * R),
  K head_dim, F FFN width, E experts, C top-k slots, V vocab, N tokens (B * T), A token-expert pairs (N * C).

Parameters are stored in JAX layout (``[in, out]``; experts ``[E, in, out]``); ``step3_jax.checkpoint``
maps them to and from the Hugging Face ``[out, in]`` layout. Every parameter carries its logical axis
names (``logical_axes`` metadata) that ``step3_jax.sharding.ShardingRules`` turns into mesh shardings.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from step3_jax import kv_cache as kvc
from step3_jax.config import Step3Config
from step3_jax.sharding import DEFAULT_RULES, ShardingRules, check_divisible, constrain

log = logging.getLogger(__name__)
f32 = jnp.float32
MOE_IMPLS = ("grouped", "loop")


@dataclasses.dataclass(frozen=True)
class ShardCtx:
    """Where the model runs: a mesh (or None for one device) and the logical-axis rules."""

    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    def constrain(self, x, axes: Sequence[str | None]):
        return constrain(x, self.mesh, self.rules, axes)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, stddev: float | None) -> nnx.Param:
    """A parameter declared once: shape, logical axes and initialiser (normal(stddev), or ones if None)."""
    if stddev is None:
        value = jnp.ones(shape, dtype)
    else:
        value = (stddev * jax.random.normal(rngs.params(), shape, f32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = _param(None, (dim,), ("norm",), dtype, None)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(f32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(f32)).astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """NeoX-style rotary embedding over the whole last axis. x [B, T, ..., K], positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, half, dtype=f32) * 2.0 / x.shape[-1]))
    angles = positions.astype(f32)[..., None] * inv_freq  # [B, T, K/2]
    angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + (half,))
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = x[..., :half].astype(f32), x[..., half:].astype(f32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_core(q, k, v, q_pos, k_pos, scale: float) -> jax.Array:
    """Causal multi-query attention. q [B, T, H, K]; k, v [B, S, G, K]; key s is visible to query t iff
    ``k_pos[b, s] <= q_pos[b, t]``. Scores and softmax in float32; output [B, T, H, K] in q's dtype."""
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=f32) * scale
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(b, t, h, kd).astype(q.dtype)


class MFAAttention(nnx.Module):
    """Multi-Matrix Factorization Attention: low-rank normalised query, one shared K/V head per group."""

    def __init__(self, config: Step3Config, *, rngs: nnx.Rngs, ctx: ShardCtx):
        d, q, h, g, k = (
            config.hidden_size,
            config.share_q_dim,
            config.num_attention_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        dt = config.dtype
        self.q_proj = _param(rngs, (d, q), ("embed", "q_rank"), dt, d**-0.5)
        self.inter_norm = RMSNorm(q, config.rms_norm_eps, dt)
        self.wq = _param(rngs, (q, h, k), ("q_rank", "heads", "head_dim"), dt, q**-0.5)
        self.k_proj = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dt, d**-0.5)
        self.v_proj = _param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dt, d**-0.5)
        self.o_proj = _param(rngs, (h, k, d), ("heads", "head_dim", "embed"), dt, (h * k) ** -0.5)
        self.scale = k**-0.5
        self.rope_theta = config.rope_theta
        self.ctx = ctx

    def qkv(self, x: jax.Array, positions: jax.Array):
        """Projections + rope. x [B, T, D] -> q [B, T, H, K], k, v [B, T, G, K]."""
        q_lr = jnp.einsum("btd,dq->btq", x, self.q_proj[...])
        q_lr = self.inter_norm(q_lr)
        q = jnp.einsum("btq,qhk->bthk", q_lr, self.wq[...])
        q = self.ctx.constrain(q, ("act_batch", "act_seq", "act_heads", None))
        k = jnp.einsum("btd,dgk->btgk", x, self.k_proj[...])
        v = jnp.einsum("btd,dgk->btgk", x, self.v_proj[...])
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def __call__(self, x, positions, kv=None, start=None):
        """Without ``kv``: causal self-attention over x. With ``kv = (cache_k, cache_v)`` and ``start [B]``:
        write this step's K/V at slots ``start + t`` and attend to all slots up to each query's own."""
        q, k, v = self.qkv(x, positions)
        if kv is None:
            out = attention_core(q, k, v, positions, positions, self.scale)
        else:
            cache_k, cache_v = kvc.write(*kv, k, v, start)
            kv = (cache_k, cache_v)
            slots = jnp.arange(cache_k.shape[1], dtype=jnp.int32)[None, :]
            q_slots = start[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
            out = attention_core(q, cache_k, cache_v, q_slots, slots, self.scale)
        out = self.ctx.constrain(out, ("act_batch", "act_seq", "act_heads", None))
        return jnp.einsum("bthk,hkd->btd", out, self.o_proj[...]), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, dtype, *, rngs: nnx.Rngs):
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), dtype, f**-0.5)

    def __call__(self, x: jax.Array) -> jax.Array:
        g = jnp.einsum("...d,df->...f", x, self.gate_proj[...], preferred_element_type=f32)
        u = jnp.einsum("...d,df->...f", x, self.up_proj[...], preferred_element_type=f32)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        return jnp.einsum("...f,fd->...d", h, self.down_proj[...])


def grouped_experts(x, weights, ids, gate, up, down, *, first_expert=0):
    """Token-sorting MoE: sort token-expert pairs by expert, ``ragged_dot`` per group, weighted scatter-add.

    x [N, D]; weights, ids [N, C]; gate, up [E_l, D, F]; down [E_l, F, D] hold experts
    ``first_expert .. first_expert + E_l - 1`` (pairs routed elsewhere contribute nothing).
    Returns float32 [N, D].
    """
    n, c = ids.shape
    num_local = gate.shape[0]
    local_ids = ids.reshape(-1) - first_expert  # [A]
    is_local = (local_ids >= 0) & (local_ids < num_local)
    sort_key = jnp.where(is_local, local_ids, num_local)  # non-local pairs sort last, in no group
    order = jnp.argsort(sort_key, stable=True)
    token = order // c
    group_sizes = jnp.bincount(sort_key, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = x[token]  # [A, D]
    g = jax.lax.ragged_dot(xs, gate, group_sizes, preferred_element_type=f32)
    u = jax.lax.ragged_dot(xs, up, group_sizes, preferred_element_type=f32)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = jax.lax.ragged_dot(h, down, group_sizes, preferred_element_type=f32)  # [A, D]
    w = jnp.where(is_local, weights.reshape(-1), 0.0)[order]
    y = jnp.where(is_local[order][:, None], y * w[:, None], 0.0)
    return jnp.zeros((n, x.shape[-1]), f32).at[token].add(y)


def loop_experts(x, weights, ids, gate, up, down):
    """Reference MoE: every expert on every token, weighted by its (possibly zero) routing weight."""
    out = jnp.zeros(x.shape, f32)
    for e in range(gate.shape[0]):
        w_e = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1)  # [N]
        g = jnp.einsum("nd,df->nf", x, gate[e], preferred_element_type=f32)
        u = jnp.einsum("nd,df->nf", x, up[e], preferred_element_type=f32)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        out = out + w_e[:, None] * jnp.einsum("nf,fd->nd", h, down[e], preferred_element_type=f32)
    return out


class MoE(nnx.Module):
    """Routed experts: float32 softmax router, top-k without renormalisation (unless the config says so)."""

    def __init__(self, config: Step3Config, *, rngs: nnx.Rngs, ctx: ShardCtx):
        d, e, f = config.hidden_size, config.moe_num_experts, config.moe_intermediate_size
        dt = config.dtype
        self.gate = _param(rngs, (d, e), ("embed", "router"), dt, d**-0.5)  # the router ("moe.gate" in HF)
        self.gate_proj = _param(rngs, (e, d, f), ("experts", "expert_embed", "expert_mlp"), dt, d**-0.5)
        self.up_proj = _param(rngs, (e, d, f), ("experts", "expert_embed", "expert_mlp"), dt, d**-0.5)
        self.down_proj = _param(rngs, (e, f, d), ("experts", "expert_mlp", "expert_embed"), dt, f**-0.5)
        self.top_k = config.moe_top_k
        self.renormalize = config.norm_expert_weight
        self.impl = "grouped"
        self.ctx = ctx

    def route(self, x: jax.Array):
        """x [..., D] -> (weights [..., C] float32, expert ids [..., C] int32)."""
        logits = jnp.einsum("...d,de->...e", x.astype(f32), self.gate[...].astype(f32))
        probs = jax.nn.softmax(logits, axis=-1)
        weights, ids = jax.lax.top_k(probs, self.top_k)
        if self.renormalize:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        return weights, ids.astype(jnp.int32)

    def experts(self, x: jax.Array, weights: jax.Array, ids: jax.Array, impl: str | None = None) -> jax.Array:
        """Weighted sum of the routed experts. x [B, T, D]; weights, ids [B, T, C] -> [B, T, D]."""
        impl = impl or self.impl
        if impl not in MOE_IMPLS:
            raise ValueError(f"MoE impl must be one of {MOE_IMPLS}, got {impl!r}")
        gate, up, down = self.gate_proj[...], self.up_proj[...], self.down_proj[...]
        if impl == "grouped" and self.ctx.mesh is not None:
            return _sharded_grouped_experts(self.ctx, x, weights, ids, gate, up, down)
        b, t, d = x.shape
        fn = loop_experts if impl == "loop" else grouped_experts
        out = fn(x.reshape(b * t, d), weights.reshape(b * t, -1), ids.reshape(b * t, -1), gate, up, down)
        return out.reshape(b, t, d).astype(x.dtype)

    def __call__(self, x: jax.Array, impl: str | None = None) -> jax.Array:
        weights, ids = self.route(x)
        return self.experts(x, weights, ids, impl)


def _sharded_grouped_experts(ctx: ShardCtx, x, weights, ids, gate, up, down):
    """Expert / tensor parallel MoE with ``shard_map``: tokens stay sharded by batch, each device runs the
    grouped path over its own experts and FFN columns, and partial outputs are summed over those axes."""
    mesh, rules = ctx.mesh, ctx.rules
    num_experts, _, ffn = gate.shape
    check_divisible(mesh, rules, "experts", num_experts, "moe_num_experts")
    check_divisible(mesh, rules, "expert_mlp", ffn, "moe_intermediate_size")
    expert_axes = tuple(a for a in rules.mesh_axes("experts") if mesh.shape.get(a, 1) > 1)
    mlp_axes = tuple(a for a in rules.mesh_axes("expert_mlp") if mesh.shape.get(a, 1) > 1 and a not in expert_axes)
    batch_axes = tuple(
        a for a in rules.mesh_axes("act_batch") if mesh.shape.get(a, 1) > 1 and a not in expert_axes + mlp_axes
    )
    batch_shards = 1
    for a in batch_axes:
        batch_shards *= mesh.shape[a]
    if x.shape[0] % batch_shards:
        batch_axes = ()  # a batch that does not split evenly is replicated instead
    e_spec = expert_axes or None
    f_spec = mlp_axes or None
    tok_spec = PartitionSpec(batch_axes or None, None, None)
    w_spec = PartitionSpec(e_spec, None, f_spec)
    down_spec = PartitionSpec(e_spec, f_spec, None)
    reduce_axes = expert_axes + mlp_axes

    def local(x, weights, ids, gate, up, down):
        b, t, d = x.shape
        shard = 0
        for a in expert_axes:
            shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
        out = grouped_experts(
            x.reshape(b * t, d),
            weights.reshape(b * t, -1),
            ids.reshape(b * t, -1),
            gate,
            up,
            down,
            first_expert=shard * gate.shape[0],
        )
        if reduce_axes:
            out = jax.lax.psum(out, reduce_axes)
        return out.reshape(b, t, d).astype(x.dtype)

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, down_spec),
        out_specs=tok_spec,
        check_vma=False,
    )(x, weights, ids, gate, up, down)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + Attn(norm(x)); y = h + FFN(norm(h)), FFN dense SwiGLU or MoE + shared expert."""

    def __init__(self, config: Step3Config, layer_idx: int, *, rngs: nnx.Rngs, ctx: ShardCtx):
        dt, d = config.dtype, config.hidden_size
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps, dt)
        self.self_attn = MFAAttention(config, rngs=rngs, ctx=ctx)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps, dt)
        if self.is_moe:
            self.moe = MoE(config, rngs=rngs, ctx=ctx)
            self.share_expert = MLP(d, config.share_expert_dim, dt, rngs=rngs)
        else:
            self.mlp = MLP(d, config.intermediate_size, dt, rngs=rngs)

    def attention(self, x, positions, kv=None, start=None):
        """The attention half: returns (h, normed h for the FFN, new kv)."""
        with jax.named_scope("attention"):
            a, kv = self.self_attn(self.input_layernorm(x), positions, kv, start)
        h = x + a
        return h, self.post_attention_layernorm(h), kv

    def ffn(self, normed, routing=None):
        """The FFN half on the post-attention-normed hidden states; ``routing`` = (weights, ids) if precomputed."""
        if not self.is_moe:
            with jax.named_scope("mlp"):
                return self.mlp(normed)
        with jax.named_scope("moe"):
            weights, ids = routing if routing is not None else self.moe.route(normed)
            return self.moe.experts(normed, weights, ids) + self.share_expert(normed)

    def __call__(self, x, positions, kv=None, start=None):
        h, normed, kv = self.attention(x, positions, kv, start)
        return h + self.ffn(normed), kv


class Step3ForCausalLM(nnx.Module):
    """Step-3 text model. ``model(ids)`` -> float32 logits; ``model(ids, cache=c)`` -> (logits, new cache)."""

    def __init__(
        self,
        config: Step3Config,
        *,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        rules: ShardingRules = DEFAULT_RULES,
    ):
        ctx = ShardCtx(mesh, rules)
        d, v, dt = config.hidden_size, config.vocab_size, config.dtype
        self.config = config
        self.ctx = ctx
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), dt, 1.0)
        self.layers = nnx.List([DecoderLayer(config, i, rngs=rngs, ctx=ctx) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(d, config.rms_norm_eps, dt)
        self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), dt, d**-0.5)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        _check_ids(input_ids)
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        return self.ctx.constrain(x, ("act_batch", "act_seq", "act_embed"))

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.norm(x)
        out = jnp.einsum("btd,dv->btv", x, self.lm_head[...], preferred_element_type=f32)
        return self.ctx.constrain(out, ("act_batch", "act_seq", "act_vocab"))

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, cache: kvc.KVCache | None = None):
        """input_ids int [B, T]. Without a cache, positions default to 0..T-1 and logits [B, T, V] are returned.

        With a :class:`~step3_jax.kv_cache.KVCache`, the T tokens are appended after each sequence's
        ``cache.lengths`` (positions default to those slots) and ``(logits, new_cache)`` is returned, with
        ``lengths`` advanced by T.
        """
        b, t = input_ids.shape if input_ids.ndim == 2 else (None, None)
        x = self.embed(input_ids)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            for layer in self.layers:
                x, _ = layer(x, positions)
            return self.logits(x)
        start = cache.lengths
        if positions is None:
            positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, positions, (cache.k[i], cache.v[i]), start)
            ks.append(k)
            vs.append(v)
        new_cache = kvc.KVCache(k=tuple(ks), v=tuple(vs), lengths=start + t)
        return self.logits(x), new_cache


def _check_ids(input_ids) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids has no tokens (time axis of length 0)")


# ---------------------------------------------------------------------- construction on a mesh


def param_shardings(state, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """NamedSharding for every parameter of a (possibly abstract) model state, from its logical axes."""

    def one(var):
        axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        return rules.sharding(mesh, axes, var.shape)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(
    config: Step3Config,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> Step3ForCausalLM:
    """Build a randomly initialised model. The initialisers run as one compiled program (cached per config
    and mesh, so later calls with other seeds are quick); with a mesh, every parameter is created directly
    in its sharding, so no device ever holds the whole model. Same seed, same weights, on any mesh."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)))
    return nnx.merge(graphdef, _init_state(config, jnp.asarray(seed, jnp.int32), mesh, rules))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_state(config, seed, mesh, rules):
    state = nnx.state(Step3ForCausalLM(config, rngs=nnx.Rngs(jax.random.key(seed)), mesh=mesh, rules=rules))
    if mesh is None:
        return state
    return jax.lax.with_sharding_constraint(state, param_shardings(state, mesh, rules))


# ---------------------------------------------------------------------- parameter counting


def abstract_model(config: Step3Config) -> Step3ForCausalLM:
    """The model with ShapeDtypeStructs instead of weights (nothing allocated): for shapes and counts."""
    return nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0)))


def count_params(config: Step3Config) -> dict[str, int]:
    """Total and per-token activated parameter counts from ``jax.eval_shape`` of the real module.

    Routed experts (parameters with a leading ``experts`` axis) count ``top_k / num_experts`` of
    their size as activated; everything else (embedding, lm_head, router, shared expert) counts fully.
    """
    state = nnx.state(abstract_model(config), nnx.Param)
    total = routed = embed = 0
    for path, var in nnx.to_flat_state(state):
        size = 1
        for s in var.shape:
            size *= s
        total += size
        axes = var.get_metadata().get("logical_axes") or ()
        if axes[:1] == ("experts",):
            routed += size
        if path[-1] in ("embed_tokens", "lm_head"):
            embed += size
    active = total - routed + routed * config.moe_top_k // config.moe_num_experts
    return {"total": total, "active": active, "routed_experts": routed, "embeddings": embed}
