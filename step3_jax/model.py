"""Step-3 text model in Flax NNX: MFA attention + MoE FFN.

Einsum letters:
  B batch, T time (queries), S key/value length, D model width, Q low-rank query width (share_q_dim),
  G KV heads (num_attention_groups; 1 in Step-3), R query heads per KV head, H query heads (G * R),
  K head_dim, F FFN width, E experts, C top-k slots, V vocab, N tokens (B * T), A token-expert pairs (N * C).

Parameters are stored in JAX layout (``[in, out]``; experts ``[E, in, out]``); ``step3_jax.checkpoint``
maps them to and from the Hugging Face ``[out, in]`` layout. In FP8 mode (``quantization="fp8"``) the attention
projections, dense MLPs, shared and routed experts are block-FP8 and kept in the HF layout with their
``_scale_inv`` beside them, as the FP8 release stores them. Every parameter carries its logical axis
names (``logical_axes`` metadata) that ``step3_jax.sharding.ShardingRules`` turns into mesh shardings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from step3_jax import kv_cache as kvc
from step3_jax.config import Step3Config
from step3_jax.init_rng import init_key
from step3_jax.quant import (
    BLOCK,
    FP8_DTYPE,
    Fp8Weight,
    dequantize_activations,
    fake_quantize_activations,
    quantize_activations,
    quantize_blockwise,
)
from step3_jax.sharding import (
    DEFAULT_RULES,
    ShardingRules,
    check_block_sharding,
    check_divisible,
    constrain,
    spec_axes,
)

log = logging.getLogger(__name__)
f32 = jnp.float32
MOE_IMPLS = ("grouped", "loop")
MOE_DISPATCH = ("all_to_all", "all_gather")


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


SCALE_SUFFIX = "_scale_inv"  # block scales of an FP8 weight ``X`` live beside it as ``X_scale_inv``


def _weight(module, name, rngs, shape, axes, dtype, stddev: float, fp8: bool, *, lead: int = 0, n_in: int = 1):
    """Declare matrix ``name``: ``shape``/``axes`` in JAX layout ``[lead..., in..., out...]`` (``lead`` leading
    axes, e.g. experts, then ``n_in`` input axes). With ``fp8`` it is stored as the checkpoint stores it: float8
    ``[lead..., out, in]`` (multi-axis sides flattened, ``wq [Q, H, K]`` -> ``[H*K, Q]``) plus float32
    ``name_scale_inv`` ``[lead..., out/128, in/128]``, the block quantisation of the same random draw as the plain
    weight (same seed, same weights up to FP8 rounding). A flattened side takes the logical axis of its leading
    dimension (``heads`` for ``H*K``), and ``axis_sizes`` metadata keeps that dimension's size, so the split
    follows whole heads exactly as it does for the plain weight (see :func:`param_shardings`)."""
    if not fp8:
        setattr(module, name, _param(rngs, shape, axes, dtype, stddev))
        return
    split = lead + n_in
    n_rows, n_cols = math.prod(shape[split:]), math.prod(shape[lead:split])
    w = stddev * jax.random.normal(rngs.params(), shape, f32)
    w = w.reshape(*shape[:lead], n_cols, n_rows).swapaxes(-1, -2)  # HF layout [lead..., out, in]
    q, scale_inv = quantize_blockwise(w)
    hf_axes = (*axes[:lead], axes[split], axes[lead])
    sizes = (*shape[:lead], shape[split], shape[lead])  # what divisibility by the mesh is judged on
    setattr(module, name, nnx.Param(q, logical_axes=hf_axes, axis_sizes=sizes))
    setattr(module, name + SCALE_SUFFIX, nnx.Param(scale_inv, logical_axes=hf_axes, axis_sizes=sizes))


def _weight_value(module, name):
    """The weight ``name`` as the matmuls take it: an array, or an :class:`Fp8Weight` when it has scales."""
    scale_inv = getattr(module, name + SCALE_SUFFIX, None)
    w = getattr(module, name)[...]
    return w if scale_inv is None else Fp8Weight(w, scale_inv[...])


# How FP8 weights are multiplied: None = automatic (the Mosaic GPU FP8 grouped GEMM of
# ``pallas_kernels.fp8_gmm`` on a Hopper GPU, the pure-JAX reference below elsewhere); "kernel", "interpret" or
# "reference" force that path of ``fp8_grouped_matmul`` (set with :func:`use_fp8_gemm`; read at trace time).
_FP8_GEMM: dict = {"impl": None, "config": None}


@contextlib.contextmanager
def use_fp8_gemm(impl: str | None, config=None):
    """Force how FP8 weights (attention projections, dense FFNs, shared and routed experts) are multiplied while
    tracing inside this block (e.g. "interpret" to run the FP8 grouped-GEMM kernel in interpret mode on the CPU)."""
    old = dict(_FP8_GEMM)
    _FP8_GEMM.update(impl=impl, config=config)
    try:
        yield
    finally:
        _FP8_GEMM.update(old)


def _fp8_kernel_wanted() -> bool:
    """Whether FP8 matmuls take the kernel path (or a forced path of it) when tracing now."""
    from pallas_kernels import fp8_gmm

    return _FP8_GEMM["impl"] is not None or fp8_gmm.on_hopper()


def _fp8_kernel_gemm(x: jax.Array, w: Fp8Weight, group_sizes: jax.Array) -> jax.Array | None:
    """The FP8 grouped GEMM (kernel or forced path) when it applies, else None (use the pure-JAX path)."""
    from pallas_kernels import fp8_gmm

    if w.q.dtype != FP8_DTYPE:
        return None  # a float weight in the FP8 layout (LoRA's base + adapter): no FP8 operand to feed the kernel
    if not _fp8_kernel_wanted():
        return None
    impl = _FP8_GEMM["impl"]
    if impl is None:
        m, k = x.shape
        if fp8_gmm.kernel_supports(m, w.shape[-2], k):
            return None  # a shape the kernel does not take: the pure-JAX path
        impl = "kernel"
    xq, xs = quantize_activations(x)
    return fp8_gmm.fp8_grouped_matmul(
        xq, xs, w.q, w.scale_inv, group_sizes, out_dtype=f32, impl=impl, config=_FP8_GEMM["config"]
    )


def dense_matmul(x: jax.Array, w) -> jax.Array:
    """``x [..., I] @ w`` -> float32 ``[..., O]``; ``w`` is ``[I, O]`` or an :class:`Fp8Weight` ``[O, I]``.

    FP8: activations rounded through per-token 128-channel FP8, the block-scaled weight, float32 accumulation
    (the FP8 GEMM kernel as a one-group grouped GEMM on Hopper; dequantise-and-matmul elsewhere). An
    :class:`Fp8Weight` whose ``q`` is a float array (LoRA's dequantised base + adapter) takes the same numerics
    with ``q * scale_inv`` as the weight."""
    if isinstance(w, Fp8Weight):
        flat = x.reshape(-1, x.shape[-1])
        out = _fp8_kernel_gemm(flat, Fp8Weight(w.q[None], w.scale_inv[None]), jnp.array([flat.shape[0]], jnp.int32))
        if out is not None:
            return out.reshape(*x.shape[:-1], w.shape[0])
        return jnp.einsum("...i,oi->...o", fake_quantize_activations(x), w.dequantize(), preferred_element_type=f32)
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=f32)


TILE_CHUNK_BYTES = 64 << 20  # tiled_ragged_dot gathers at most this many bytes of expert weights at a time


def tiled_ragged_dot(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``lax.ragged_dot(x [A, I], w [G, I, O], group_sizes)`` in float32, at the cost of the rows it has.

    XLA expands ``ragged_dot`` into a dense product masked per group (G times the FLOPs, and a ``[G, A, I]``
    masked copy of ``x``). Here each group's rows are padded to whole tiles (the largest power of two up to half the
    even share ``A / G``, at most 64 rows), so every tile belongs to one group, and each tile is multiplied by its
    group's weights: ``A + G * (tile - 1)`` rows at most. The tiles' gathered weights are not kept for the backward
    pass (``jax.checkpoint``), and are gathered at most ``TILE_CHUNK_BYTES`` at a time (``lax.map`` over chunks of
    tiles beyond that). Rows past ``sum(group_sizes)`` are zeros, as from ``ragged_dot``. The CPU path of
    :func:`grouped_matmul`."""
    a, i = x.shape
    g, _, o = w.shape
    tile = 1 << min(6, max(0, (a // (2 * g)).bit_length() - 1))
    tiles = max(1, (a + g * (tile - 1)) // tile)  # sum_g ceil(size_g / tile) is never more
    sizes = group_sizes.astype(jnp.int32)
    ends, padded = jnp.cumsum(sizes), (sizes + tile - 1) // tile * tile
    padded_ends = jnp.cumsum(padded)
    shift = padded_ends - padded - (ends - sizes)  # a group's padded start minus its start
    row = jnp.arange(a, dtype=jnp.int32)
    group = jnp.searchsorted(ends, row, side="right", method="compare_all").astype(jnp.int32)  # G: past the end
    valid = group < g
    slot = jnp.where(valid, row + shift[jnp.minimum(group, g - 1)], tiles * tile)
    tile_start = jnp.arange(tiles, dtype=jnp.int32) * tile
    tile_group = jnp.searchsorted(padded_ends, tile_start, side="right", method="compare_all")
    tile_group = jnp.minimum(tile_group, g - 1)  # tiles past the last group hold only zero rows
    xt = jnp.zeros((tiles * tile, i), x.dtype).at[slot].set(x, mode="drop").reshape(tiles, tile, i)

    @jax.checkpoint
    def some_tiles(args):
        rows, e = args
        return jnp.einsum("tri,tio->tro", rows, w[e], preferred_element_type=f32)

    chunk = max(1, TILE_CHUNK_BYTES // max(1, i * o * w.dtype.itemsize))  # tiles whose weights fit
    if chunk >= tiles:
        yt = some_tiles((xt, tile_group))
    else:
        n = -(-tiles // chunk)  # chunks of `chunk` tiles, the last one padded with zero tiles
        pad = n * chunk - tiles
        xt = jnp.concatenate([xt, jnp.zeros((pad, tile, i), xt.dtype)]).reshape(n, chunk, tile, i)
        yt = jax.lax.map(some_tiles, (xt, jnp.pad(tile_group, (0, pad)).reshape(n, chunk)))
    yt = yt.reshape(-1, o)
    return jnp.where(valid[:, None], yt.at[slot].get(mode="fill", fill_value=0), 0.0)


def _ragged_dot(x, w, group_sizes):
    """float32 ``ragged_dot``: :func:`tiled_ragged_dot` on the CPU, XLA's elsewhere (GPU choices wait for H200
    measurements)."""
    return jax.lax.platform_dependent(
        x,
        w,
        group_sizes,
        cpu=tiled_ragged_dot,
        default=functools.partial(jax.lax.ragged_dot, preferred_element_type=f32),
    )


def grouped_matmul(x: jax.Array, w, group_sizes: jax.Array) -> jax.Array:
    """Rows of ``x [A, I]`` in consecutive groups, group ``g`` times expert ``g`` -> float32 ``[A, O]``;
    ``w`` is ``[G, I, O]`` or an :class:`Fp8Weight` ``[G, O, I]`` (FP8: the grouped-GEMM kernel on Hopper)."""
    if isinstance(w, Fp8Weight):
        out = _fp8_kernel_gemm(x, w, group_sizes)
        if out is not None:
            return out
        wd = w.dequantize().swapaxes(-1, -2)
        return _ragged_dot(fake_quantize_activations(x), wd, group_sizes)
    return _ragged_dot(x, w, group_sizes)


def fp8_linear(module, name: str, x: jax.Array, ctx: ShardCtx) -> jax.Array:
    """``x [B, ..., in]`` through weight ``name`` of ``module`` (block-FP8 or plain) -> float32 ``[B, ..., out]``.

    On a mesh, when FP8 products take the GEMM kernel, the product runs inside ``shard_map`` on each device's own
    rows (split over the batch axes, or on a mesh without them over the axes the weight does not use) and weight
    shard: a Pallas kernel is an opaque custom call to XLA's partitioner, which would gather its
    operands onto every device and compute the whole product on each. The weight keeps its parameter sharding
    (:func:`param_spec`): split output columns stay split (column parallel); an input dimension split over axes
    that do not split the batch gives partial products summed over those axes (row parallel, e.g. ``o_proj``
    over heads); one split over axes that also split the batch (FSDP) is gathered first, as is any dimension
    whose scale blocks are split differently from its values. Off the kernel path XLA partitions the pure-JAX
    product itself."""
    w = _weight_value(module, name)
    if ctx.mesh is None or not isinstance(w, Fp8Weight) or w.q.dtype != FP8_DTYPE or not _fp8_kernel_wanted():
        return dense_matmul(x, w)
    mesh, rules = ctx.mesh, ctx.rules
    q_spec = param_spec(getattr(module, name), mesh, rules)
    s_spec = param_spec(getattr(module, name + SCALE_SUFFIX), mesh, rules)
    w_shape, s_shape = w.q.shape, w.scale_inv.shape
    out_axes, in_axes = spec_axes(q_spec[0]), spec_axes(q_spec[1])
    batch_axes = [a for a in rules.mesh_axes("act_batch") if mesh.shape.get(a, 1) > 1]
    if batch_axes:
        row_axes = tuple(a for a in batch_axes if a not in out_axes)
    else:  # no batch axes (the AFD runner's FFN submesh, whose rows arrive split over all its devices): split the
        # rows over every axis the weight leaves free instead of computing them all on every device
        row_axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in out_axes + in_axes)
    if x.shape[0] % math.prod(mesh.shape[a] for a in row_axes):
        row_axes = ()  # a batch that does not split evenly is replicated
    k_axes = tuple(a for a in in_axes if a not in row_axes)  # FSDP-split inputs are gathered
    s_k_axes = tuple(a for a in spec_axes(s_spec[1]) if a not in row_axes)
    if k_axes != s_k_axes or w_shape[1] % (BLOCK * math.prod(mesh.shape[a] for a in k_axes)):
        k_axes = ()  # partial sums need whole, equally split scale blocks along the reduction
    # split output rows keep their scales when every shard holds whole 128-row blocks (or one block serves all)
    n_out = math.prod(mesh.shape[a] for a in out_axes)
    out_ok = s_shape[0] == 1 or (spec_axes(s_spec[0]) == out_axes and w_shape[0] % (BLOCK * n_out) == 0)
    o_spec, s_out, k_spec = (q_spec[0] if out_ok else None), (s_spec[0] if out_ok else None), (k_axes or None)
    w_spec = Fp8Weight(PartitionSpec(o_spec, k_spec), PartitionSpec(s_out, k_spec))
    lead = (None,) * (x.ndim - 2)
    rows = row_axes or None

    def local(x, w):
        out = dense_matmul(x, w)
        return jax.lax.psum(out, k_axes) if k_axes else out

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(PartitionSpec(rows, *lead, k_spec), w_spec),
        out_specs=PartitionSpec(rows, *lead, o_spec),
        check_vma=False,
    )(x, w)


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, scaled by a learned per-channel weight."""

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


def attention_core(q, k, v, q_pos, k_pos, scale: float, q_seg=None, k_seg=None) -> jax.Array:
    """Causal multi-query attention. q [B, T, H, K]; k, v [B, S, G, K]; key s is visible to query t iff
    ``k_pos[b, s] <= q_pos[b, t]`` (and, with segment ids [B, T] / [B, S], both are in the same segment).
    Scores and softmax in float32; output [B, T, H, K] in q's dtype."""
    b, t, h, kd = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, kd)
    scores = jnp.einsum("btgrk,bsgk->bgrts", q, k, preferred_element_type=f32) * scale
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if q_seg is not None:
        visible = visible & (k_seg[:, None, :] == q_seg[:, :, None])
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs.astype(v.dtype), v, preferred_element_type=f32)
    return out.reshape(b, t, h, kd).astype(q.dtype)


def paged_attention(q, layer: kvc.PagedLayer, start, scale: float) -> jax.Array:
    """Attention of q [B, T, H, K] (at slots ``start + t``) to a paged cache that already holds them.

    Decode (T == 1, one K/V head): ``pallas_kernels.mfa_decode`` (the Mosaic GPU kernel on GPU, its pure-JAX
    reference elsewhere). Prefill (T > 1) or G > 1: gather the pages and run :func:`attention_core`."""
    t, kd = q.shape[1], q.shape[3]
    if t == 1 and layer.k.shape[2] == 1:
        from pallas_kernels.mfa_decode import mfa_decode

        num_pages, page_size = layer.k.shape[:2]
        out = mfa_decode(  # [P, ps, 1, K] -> [P, ps, K]: a reshape, no copy of the cache
            q[:, 0],
            layer.k.reshape(num_pages, page_size, kd),
            layer.v.reshape(num_pages, page_size, kd),
            layer.block_table,
            start + 1,
            scale=scale,
            k_scales=None if layer.k_scale is None else layer.k_scale.reshape(num_pages, page_size),
            v_scales=None if layer.v_scale is None else layer.v_scale.reshape(num_pages, page_size),
        )
        return out[:, None]
    keys, values = kvc.paged_gather(layer, q.dtype)
    slots = jnp.arange(keys.shape[1], dtype=jnp.int32)[None, :]
    q_slots = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return attention_core(q, keys, values, q_slots, slots, scale)


def paged_write_attend(q, k, v, layer: kvc.PagedLayer, start, scale: float, ctx: ShardCtx):
    """Append ``k, v [B, T, G, K]`` to a paged cache at slots ``start + t`` and attend with ``q [B, T, H, K]``.

    On a mesh whose batch axes (``act_batch``) split the batch, this runs once per data-parallel attention group
    (``shard_map``), as the paper's attention instances do: the page pool is sharded the same way
    (:data:`step3_jax.kv_cache.PAGE_AXES`), each group's block-table rows hold page ids local to its own shard, and
    no K/V byte crosses devices. Returns ``(out [B, T, H, K], new layer)``."""
    batch_axes = kvc.page_group_axes(ctx.mesh, ctx.rules)
    if not batch_axes:
        layer = kvc.paged_write(layer, k, v, start)
        return paged_attention(q, layer, start, scale), layer
    mesh, rules = ctx.mesh, ctx.rules
    groups = kvc.num_page_groups(mesh, rules)
    for name, n in (("batch", q.shape[0]), ("page pool", layer.k.shape[0])):
        if n % groups:
            raise ValueError(
                f"paged attention on a mesh: the {name} ({n}) must split evenly over the {groups} data-parallel "
                f"attention groups (mesh axes {','.join(batch_axes)})"
            )
    q_spec = rules.spec(("act_batch", "act_seq", "act_heads", None), mesh, q.shape)
    q_spec = PartitionSpec(batch_axes, *q_spec[1:])
    row = PartitionSpec(batch_axes)
    fp8 = layer.is_fp8

    def local(q, k, v, kp, vp, bt, start, *scales):
        ks, vs = scales if fp8 else (None, None)
        lay = kvc.PagedLayer(k=kp, v=vp, k_scale=ks, v_scale=vs, block_table=bt)
        lay = kvc.paged_write(lay, k, v, start)
        out = paged_attention(q, lay, start, scale)
        return (out, lay.k, lay.v) + ((lay.k_scale, lay.v_scale) if fp8 else ())

    args = (q, k, v, layer.k, layer.v, layer.block_table, start)
    if fp8:
        args += (layer.k_scale, layer.v_scale)
    specs = (q_spec, row, row, row, row, row, row) + ((row, row) if fp8 else ())
    out_specs = (q_spec, row, row) + ((row, row) if fp8 else ())
    res = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs, check_vma=False)(*args)
    out, kp, vp = res[:3]
    new = layer.replace(k=kp, v=vp)
    if fp8:
        new = new.replace(k_scale=res[3], v_scale=res[4])
    return out, new


class MFAAttention(nnx.Module):
    """Multi-Matrix Factorization Attention: low-rank normalised query, one shared K/V head per group.

    With ``config.quantization == "fp8"`` the five projections are block-FP8 in the checkpoint's layout
    (``[out, in]`` + ``_scale_inv``, as the FFN weights) and run through :func:`dense_matmul` (per-token FP8
    activations, float32 accumulation; the FP8 GEMM kernel on Hopper); ``inter_norm`` stays in float."""

    def __init__(self, config: Step3Config, *, rngs: nnx.Rngs, ctx: ShardCtx):
        d, q, h, g, k = (
            config.hidden_size,
            config.share_q_dim,
            config.num_attention_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        dt, fp8 = config.dtype, config.quantization == "fp8"
        _weight(self, "q_proj", rngs, (d, q), ("embed", "q_rank"), dt, d**-0.5, fp8)
        self.inter_norm = RMSNorm(q, config.rms_norm_eps, dt)
        _weight(self, "wq", rngs, (q, h, k), ("q_rank", "heads", "head_dim"), dt, q**-0.5, fp8)
        _weight(self, "k_proj", rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dt, d**-0.5, fp8)
        _weight(self, "v_proj", rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dt, d**-0.5, fp8)
        _weight(self, "o_proj", rngs, (h, k, d), ("heads", "head_dim", "embed"), dt, (h * k) ** -0.5, fp8, n_in=2)
        self.fp8 = fp8
        self.num_heads, self.num_kv_heads, self.head_dim = h, g, k
        self.scale = k**-0.5
        self.rope_theta = config.rope_theta
        self.ctx = ctx

    def _fp8_linear(self, name: str, x: jax.Array) -> jax.Array:
        """``x [..., in]`` through the FP8 projection ``name`` -> ``[..., out]`` in x's dtype."""
        return fp8_linear(self, name, x, self.ctx).astype(x.dtype)

    def qkv(self, x: jax.Array, positions: jax.Array):
        """Projections + rope. x [B, T, D] -> q [B, T, H, K], k, v [B, T, G, K]."""
        if self.fp8:
            b, t = x.shape[:2]
            h, g, kd = self.num_heads, self.num_kv_heads, self.head_dim
            q_lr = self.inter_norm(self._fp8_linear("q_proj", x))
            q = self._fp8_linear("wq", q_lr).reshape(b, t, h, kd)
            k = self._fp8_linear("k_proj", x).reshape(b, t, g, kd)
            v = self._fp8_linear("v_proj", x).reshape(b, t, g, kd)
        else:
            q_lr = jnp.einsum("btd,dq->btq", x, self.q_proj[...])
            q_lr = self.inter_norm(q_lr)
            q = jnp.einsum("btq,qhk->bthk", q_lr, self.wq[...])
            k = jnp.einsum("btd,dgk->btgk", x, self.k_proj[...])
            v = jnp.einsum("btd,dgk->btgk", x, self.v_proj[...])
        q = self.ctx.constrain(q, ("act_batch", "act_seq", "act_heads", None))
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def out_proj(self, out: jax.Array) -> jax.Array:
        """o_proj: attention output [B, T, H, K] -> [B, T, D]."""
        if self.fp8:
            return self._fp8_linear("o_proj", out.reshape(*out.shape[:2], -1))
        return jnp.einsum("bthk,hkd->btd", out, self.o_proj[...])

    def __call__(self, x, positions, kv=None, start=None, segment_ids=None):
        """Without ``kv``: causal self-attention over x (within each segment, if ``segment_ids [B, T]`` are given:
        packed documents). With ``kv = (cache_k, cache_v)`` and ``start [B]``: write this step's K/V at slots
        ``start + t`` and attend to all slots up to each query's own."""
        q, k, v = self.qkv(x, positions)
        if segment_ids is not None and kv is not None:
            raise ValueError("segment_ids (packed documents) are supported without a KV cache only")
        if kv is None:
            out = attention_core(q, k, v, positions, positions, self.scale, segment_ids, segment_ids)
        elif isinstance(kv, kvc.PagedLayer):
            out, kv = paged_write_attend(q, k, v, kv, start, self.scale, self.ctx)
        else:
            cache_k, cache_v = kvc.write(*kv, k, v, start)
            kv = (cache_k, cache_v)
            slots = jnp.arange(cache_k.shape[1], dtype=jnp.int32)[None, :]
            q_slots = start[:, None] + jnp.arange(x.shape[1], dtype=jnp.int32)[None, :]
            out = attention_core(q, cache_k, cache_v, q_slots, slots, self.scale)
        out = self.ctx.constrain(out, ("act_batch", "act_seq", "act_heads", None))
        return self.out_proj(out), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, f: int, dtype, *, rngs: nnx.Rngs, fp8: bool = False, ctx: ShardCtx = ShardCtx()):
        _weight(self, "gate_proj", rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5, fp8)
        _weight(self, "up_proj", rngs, (d, f), ("embed", "mlp"), dtype, d**-0.5, fp8)
        _weight(self, "down_proj", rngs, (f, d), ("mlp", "embed"), dtype, f**-0.5, fp8)
        self.ctx = ctx

    def __call__(self, x: jax.Array) -> jax.Array:
        g = fp8_linear(self, "gate_proj", x, self.ctx)
        u = fp8_linear(self, "up_proj", x, self.ctx)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        return fp8_linear(self, "down_proj", h, self.ctx).astype(x.dtype)


def sort_pairs(ids: jax.Array, num_local: int, first_expert: int = 0, align: int = 1):
    """Sort the token-expert pairs of ``ids [N, C]`` by local expert (experts ``first_expert ..
    first_expert + num_local - 1``); pairs routed elsewhere sort last, in no group. The sorted list is padded to a
    multiple of ``align`` rows (padding rows: pair 0, in no group, masked out). Returns ``(order, token,
    sorted_is_local, group_sizes)``: pair index, its token and whether it is local, per sorted row, and the
    number of pairs of each local expert."""
    c = ids.shape[1]
    local = ids.reshape(-1) - first_expert
    is_local = (local >= 0) & (local < num_local)
    key = jnp.where(is_local, local, num_local)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    sorted_local = is_local[order]
    pad = (-order.shape[0]) % align
    if pad:
        order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
        sorted_local = jnp.concatenate([sorted_local, jnp.zeros((pad,), bool)])
    return order, order // c, sorted_local, group_sizes


ROW_BUCKET_START = 1.25  # the smallest bucket: this multiple of an expert shard's even share of the pairs
ROW_BUCKET_ALIGN = 8  # bucket sizes are rounded up to this many rows (the FP8 kernel's row alignment)


def row_buckets(
    pairs: int, num_local: int, num_experts: int, *, align: int = ROW_BUCKET_ALIGN, start: float | None = None
) -> tuple[int, ...]:
    """Static row counts an expert shard's grouped GEMMs run at (ascending; the last is ``pairs``, so nothing is
    ever dropped). With ``num_local`` of ``num_experts`` experts a shard owns about ``pairs * num_local /
    num_experts`` of the token-expert pairs; the buckets start at 1.25x that share (or at ``start``), rounded up
    to a multiple of ``align``, and double up to all pairs. One bucket (all pairs) when the shard holds every
    expert."""
    if num_local >= num_experts:
        return (pairs,)
    caps: list[int] = []
    c = ROW_BUCKET_START * pairs * num_local / num_experts if start is None else start
    while c < pairs:
        cap = min(pairs, align * math.ceil(c / align))
        if not caps or cap > caps[-1]:
            caps.append(cap)
        c *= 2
    if not caps or caps[-1] < pairs:
        caps.append(pairs)
    return tuple(caps)


def _experts_on_rows(rows, x, weights, ids, gate, up, down, first_expert):
    """The grouped path on the first ``rows`` sorted pairs (every local pair when ``rows`` >= their number)."""
    order, token, is_local, group_sizes = sort_pairs(ids, gate.shape[0], first_expert)
    order, token, is_local = order[:rows], token[:rows], is_local[:rows]
    xs = x[token]  # [rows, D]
    g = grouped_matmul(xs, gate, group_sizes)
    u = grouped_matmul(xs, up, group_sizes)
    h = (jax.nn.silu(g) * u).astype(x.dtype)
    y = grouped_matmul(h, down, group_sizes)  # [rows, D]
    w = jnp.where(is_local, weights.reshape(-1)[order], 0.0)  # is_local is in sorted order
    y = jnp.where(is_local[:, None], y * w[:, None], 0.0)
    return jnp.zeros((x.shape[0], x.shape[-1]), f32).at[token].add(y)


def _bucketed_experts(caps, x, weights, ids, gate, up, down, first_expert):
    local = ids - first_expert
    count = jnp.sum((local >= 0) & (local < gate.shape[0]))
    bucket = jnp.sum(jnp.asarray(caps[:-1], jnp.int32) < count)  # the smallest bucket that holds every local pair
    branches = [functools.partial(_experts_on_rows, c) for c in caps]
    return jax.lax.switch(bucket, branches, x, weights, ids, gate, up, down, first_expert)


def grouped_experts(x, weights, ids, gate, up, down, *, first_expert=0, num_experts: int | None = None):
    """Token-sorting MoE: sort token-expert pairs by expert, ``ragged_dot`` per group, weighted scatter-add.

    x [N, D]; weights, ids [N, C]; gate, up [E_l, D, F]; down [E_l, F, D] (or :class:`Fp8Weight` in HF layout)
    hold experts ``first_expert .. first_expert + E_l - 1`` (pairs routed elsewhere contribute nothing).
    Returns float32 [N, D].

    ``num_experts`` (the model's total, when this is one expert shard of several): the grouped GEMMs, gather and
    scatter then run on only as many rows as the shard's pairs need, one of the static :func:`row_buckets`
    sizes picked at run time (``lax.switch``; only the taken branch runs), instead of on all ``N * C`` pairs.
    Under differentiation the bucketed block is rematerialised (``jax.checkpoint``), so the branches' joined
    residuals exist only during its own backward pass.
    """
    caps = row_buckets(ids.size, gate.shape[0], num_experts or gate.shape[0])
    if len(caps) == 1:
        return _experts_on_rows(caps[0], x, weights, ids, gate, up, down, first_expert)
    fn = jax.checkpoint(functools.partial(_bucketed_experts, caps))
    return fn(x, weights, ids, gate, up, down, first_expert)


def loop_experts(x, weights, ids, gate, up, down):
    """Reference MoE: every expert on every token, weighted by its (possibly zero) routing weight."""
    out = jnp.zeros(x.shape, f32)
    for e in range(gate.shape[0]):
        w_e = jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1)  # [N]
        gate_e, up_e, down_e = jax.tree.map(lambda a, e=e: a[e], (gate, up, down))  # arrays or Fp8Weights
        g = dense_matmul(x, gate_e)
        u = dense_matmul(x, up_e)
        h = (jax.nn.silu(g) * u).astype(x.dtype)
        out = out + w_e[:, None] * dense_matmul(h, down_e)
    return out


class MoE(nnx.Module):
    """Routed experts: float32 softmax router, top-k without renormalisation (unless the config says so).

    On a mesh with experts split over devices, ``dispatch`` says how tokens reach them: ``"all_to_all"`` (default:
    each token-expert pair travels to its expert's owner and back) or ``"all_gather"`` (every expert shard sees every
    token of its batch shard; partial outputs summed)."""

    def __init__(self, config: Step3Config, *, rngs: nnx.Rngs, ctx: ShardCtx):
        d, e, f = config.hidden_size, config.moe_num_experts, config.moe_intermediate_size
        dt, fp8 = config.dtype, config.quantization == "fp8"
        if ctx.mesh is not None:  # an impossible split fails here, before any weight is made
            check_divisible(ctx.mesh, ctx.rules, "experts", e, "moe_num_experts")
            check_divisible(ctx.mesh, ctx.rules, "expert_mlp", f, "moe_intermediate_size")
        self.gate = _param(rngs, (d, e), ("embed", "router"), dt, d**-0.5)  # the router ("moe.gate" in HF)
        w_axes, down_axes = ("experts", "expert_embed", "expert_mlp"), ("experts", "expert_mlp", "expert_embed")
        _weight(self, "gate_proj", rngs, (e, d, f), w_axes, dt, d**-0.5, fp8, lead=1)
        _weight(self, "up_proj", rngs, (e, d, f), w_axes, dt, d**-0.5, fp8, lead=1)
        _weight(self, "down_proj", rngs, (e, f, d), down_axes, dt, f**-0.5, fp8, lead=1)
        self.top_k = config.moe_top_k
        self.renormalize = config.norm_expert_weight
        self.impl = "grouped"
        self.dispatch = "all_to_all"  # how expert shards get their tokens on a mesh; see _sharded_grouped_experts
        self.ctx = ctx

    def route(self, x: jax.Array):
        """x [..., D] -> (weights [..., C] float32, expert ids [..., C] int32)."""
        return self.route_from_logits(self.router_logits(x))

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x [..., D] -> float32 router logits [..., E]."""
        return jnp.einsum("...d,de->...e", x.astype(f32), self.gate[...].astype(f32))

    def route_from_logits(self, logits: jax.Array):
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
        gate, up, down = (_weight_value(self, name) for name in ("gate_proj", "up_proj", "down_proj"))
        if impl == "grouped" and self.ctx.mesh is not None:
            if self.dispatch not in MOE_DISPATCH:
                raise ValueError(f"MoE dispatch must be one of {MOE_DISPATCH}, got {self.dispatch!r}")
            return _sharded_grouped_experts(self.ctx, x, weights, ids, gate, up, down, self.dispatch)
        b, t, d = x.shape
        fn = loop_experts if impl == "loop" else grouped_experts
        out = fn(x.reshape(b * t, d), weights.reshape(b * t, -1), ids.reshape(b * t, -1), gate, up, down)
        return out.reshape(b, t, d).astype(x.dtype)

    def __call__(self, x: jax.Array, impl: str | None = None) -> jax.Array:
        weights, ids = self.route(x)
        return self.experts(x, weights, ids, impl)


def _sharded_grouped_experts(ctx: ShardCtx, x, weights, ids, gate, up, down, dispatch: str = "all_to_all"):
    """Expert / tensor parallel MoE with ``shard_map``; partial outputs of the FFN-column (tensor) shards are
    summed over those axes.

    ``dispatch="all_to_all"`` (used whenever the batch splits evenly over the batch and expert axes): tokens stay
    split over the expert axes too; each device sends each of its token-expert pairs to the device that owns the
    expert and gets the expert's output back (two ``all_to_all`` of a static per-device capacity, see
    :func:`_dispatched_experts`), and combines its own tokens' outputs. ``"all_gather"`` (and the fallback):
    every expert shard sees all tokens of its batch shard, runs the grouped path on a row bucket that holds its own
    pairs (:func:`row_buckets`), and the outputs are summed over the expert axes. Per device and MoE layer of N
    tokens over ep expert shards, the first sends and receives about N x k / ep rows each way (somewhat more: a
    static capacity with room for uneven routing), the second gathers N rows and all-reduces N float32 rows."""
    mesh, rules = ctx.mesh, ctx.rules
    fp8 = isinstance(gate, Fp8Weight)
    num_experts, ffn = gate.shape[0], gate.shape[1] if fp8 else gate.shape[2]
    check_divisible(mesh, rules, "experts", num_experts, "moe_num_experts")
    check_divisible(mesh, rules, "expert_mlp", ffn, "moe_intermediate_size")
    expert_axes = tuple(a for a in rules.mesh_axes("experts") if mesh.shape.get(a, 1) > 1)
    mlp_axes = tuple(a for a in rules.mesh_axes("expert_mlp") if mesh.shape.get(a, 1) > 1 and a not in expert_axes)
    mlp_shards = math.prod(mesh.shape[a] for a in mlp_axes)
    if fp8 and mlp_shards > 1 and ffn > BLOCK and (ffn // mlp_shards) % BLOCK:
        raise ValueError(
            f"moe_intermediate_size = {ffn} split over mesh axes ({','.join(mlp_axes)}) of total size {mlp_shards} "
            f"leaves {ffn // mlp_shards} FFN columns per shard; FP8 experts need whole {BLOCK}-wide scale blocks "
            f"per shard, i.e. moe_intermediate_size divisible by {BLOCK} x the ({','.join(mlp_axes)}) size"
        )
    batch_axes = tuple(
        a for a in rules.mesh_axes("act_batch") if mesh.shape.get(a, 1) > 1 and a not in expert_axes + mlp_axes
    )
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    if x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()  # a batch that does not split evenly is replicated instead
    a2a = dispatch == "all_to_all" and ep > 1 and x.shape[0] % (ep * math.prod(mesh.shape[a] for a in batch_axes)) == 0
    row_axes = batch_axes + expert_axes if a2a else batch_axes
    e_spec = expert_axes or None
    f_spec = mlp_axes or None
    tok_spec = PartitionSpec(row_axes or None, None, None)
    w_spec = PartitionSpec(e_spec, None, f_spec)
    down_spec = PartitionSpec(e_spec, f_spec, None)
    if fp8:  # HF layout [E, F, D] / [E, D, F]; an FFN of one scale block shares that block on every shard
        s_spec = f_spec if ffn > BLOCK else None
        w_spec = Fp8Weight(PartitionSpec(e_spec, f_spec, None), PartitionSpec(e_spec, s_spec, None))
        down_spec = Fp8Weight(PartitionSpec(e_spec, None, f_spec), PartitionSpec(e_spec, None, s_spec))
    reduce_axes = mlp_axes if a2a else expert_axes + mlp_axes

    def local(x, weights, ids, gate, up, down):
        b, t, d = x.shape
        flat = (x.reshape(b * t, d), weights.reshape(b * t, -1), ids.reshape(b * t, -1), gate, up, down)
        if a2a:
            out = _dispatched_experts(*flat, expert_axes=expert_axes, ep=ep, agree_axes=tuple(mesh.axis_names))
        else:
            shard = 0
            for a in expert_axes:
                shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
            out = grouped_experts(*flat, first_expert=shard * gate.shape[0], num_experts=num_experts)
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


def _dispatched_experts(x, weights, ids, gate, up, down, *, expert_axes, ep: int, agree_axes):
    """One device's part of the all-to-all MoE (inside ``shard_map``): x [n, D], weights / ids [n, C] are this
    device's tokens; gate / up / down hold the experts of expert shard ``axis_index(expert_axes)``.

    Pairs are sorted by the shard owning their expert and sent with their local expert ids in an ``[ep, cap]``
    buffer (:func:`_send_pairs`; FP8 bytes for FP8 experts, :func:`_send_fp8_pairs`), ``cap`` the smallest
    of the static :func:`row_buckets` capacities that holds the most pairs any device sends any shard (agreed by a
    ``pmax`` over ``agree_axes``, so every device takes the same branch and the collectives match; no ``pmax`` when
    the pairs are so few that there is one capacity). Each shard runs
    its experts on the pairs it received (on its first :func:`row_buckets` size when they fit it, else on all
    ``ep * cap`` slots; empty slots in no group), sends the outputs back in x's dtype, and each device sums its
    tokens' weighted expert outputs. Returns float32 [n, D]."""
    n, k = ids.shape
    e_l = gate.shape[0]
    if not isinstance(gate, Fp8Weight) and e_l >= 2 ** (jnp.finfo(x.dtype).nmant + 1):
        raise ValueError(f"{e_l} experts per shard: local expert ids are not exact in {x.dtype} for the all_to_all")
    dest = (ids // e_l).reshape(-1)  # [n*C] the expert shard of each pair
    counts = jnp.bincount(dest, length=ep)
    order = jnp.argsort(dest, stable=True)
    slot = jnp.zeros_like(dest).at[order].set(jnp.arange(dest.shape[0]) - (jnp.cumsum(counts) - counts)[dest[order]])
    # a device sends a shard about share = n * k / ep pairs; the largest of the ep * ep counts under even routing
    # is about share + 3 sqrt(share), so the first capacity allows that on top of 1.25x the share
    share = n * k / ep
    start = ROW_BUCKET_START * share + 3 * math.sqrt(share)
    caps = row_buckets(n * k, e_l, e_l * ep, align=ROW_BUCKET_ALIGN // math.gcd(ROW_BUCKET_ALIGN, ep), start=start)
    if len(caps) > 1:  # (one capacity, for a handful of tokens: nothing to agree on, no collective)
        need = jax.lax.pmax(jnp.max(counts), agree_axes)
        bucket = jnp.sum(jnp.asarray(caps[:-1], jnp.int32) < need)
    else:
        bucket = jnp.zeros((), jnp.int32)

    def exchange(cap, x, weights, ids, dest, slot, gate, up, down):
        d = x.shape[-1]
        send = jnp.zeros((ep, cap, d), x.dtype).at[dest, slot].set(x[jnp.arange(n * k) // k])
        send_ids = jnp.full((ep, cap), e_l, jnp.int32).at[dest, slot].set((ids % e_l).reshape(-1))  # e_l: empty
        send_pairs = _send_fp8_pairs if isinstance(gate, Fp8Weight) else _send_pairs
        recv, recv_ids = send_pairs(send, send_ids, expert_axes)  # [i*cap:]: what device i sent here
        # the pairs received fill the ep * cap slots unevenly: when they fit the shard's first row bucket (1.25x
        # its even share of all pairs) the GEMMs run on that many rows, else on all slots
        rows = [c for c in row_buckets(ep * n * k, e_l, e_l * ep)[:1] if c < ep * cap] + [ep * cap]
        y = _bucketed_experts(rows, recv, jnp.ones((ep * cap, 1), f32), recv_ids, gate, up, down, 0)
        back = jax.lax.all_to_all(y.astype(x.dtype).reshape(ep, cap, d), expert_axes, 0, 0)
        mine = back[dest, slot].reshape(n, k, d).astype(f32)
        return jnp.einsum("nc,ncd->nd", weights.astype(f32), mine)

    def run(bucket, *args):  # (lax.switch calls a lone branch directly)
        return jax.lax.switch(bucket, [functools.partial(exchange, c) for c in caps], *args)

    return jax.checkpoint(run)(bucket, x, weights, ids, dest, slot, gate, up, down)


def _send_pairs(rows, ids, axes):
    """``all_to_all`` of ``rows [ep, cap, D]`` and their int32 ``ids [ep, cap]`` as one message (the ids, exact in
    the rows' float dtype up to its mantissa, as one more column). Returns ``([ep * cap, D], [ep * cap, 1])``."""
    d = rows.shape[-1]
    recv = jax.lax.all_to_all(jnp.concatenate([rows, ids[..., None].astype(rows.dtype)], -1), axes, 0, 0)
    recv = recv.reshape(-1, d + 1)
    return recv[:, :d], jax.lax.stop_gradient(recv[:, d:]).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _send_fp8_pairs(rows, ids, axes):
    """:func:`_send_pairs` for FP8 experts: the rows travel as per-token 128-channel FP8 with their float32 scales
    (the quantisation the FP8 GEMMs apply anyway, so nothing is lost: quantising the dequantised rows again gives
    them back), packed as bytes with the ids; about half the bytes of bf16 rows. Returns float32 rows. Gradients
    pass straight through (as :func:`~step3_jax.quant.fake_quantize_activations`), back over the same all_to_all."""
    q, scale = quantize_activations(rows)
    lead = rows.shape[:-1]

    def as_bytes(a):
        return jax.lax.bitcast_convert_type(a, jnp.uint8).reshape(*lead, -1)

    recv = jax.lax.all_to_all(jnp.concatenate([as_bytes(q), as_bytes(scale), as_bytes(ids)], -1), axes, 0, 0)
    recv = recv.reshape(-1, recv.shape[-1])
    d, g = rows.shape[-1], scale.shape[-1]
    q = jax.lax.bitcast_convert_type(recv[:, :d], FP8_DTYPE)
    scale = jax.lax.bitcast_convert_type(recv[:, d : d + 4 * g].reshape(-1, g, 4), jnp.float32)
    ids = jax.lax.bitcast_convert_type(recv[:, d + 4 * g :], jnp.int32).reshape(-1, 1)
    return dequantize_activations(q, scale), ids


def _send_fp8_pairs_fwd(rows, ids, axes):
    return _send_fp8_pairs(rows, ids, axes), jnp.zeros((0, *rows.shape), rows.dtype)  # the rows' shape and dtype


def _send_fp8_pairs_bwd(axes, like, cotangents):
    rows_ct = cotangents[0].reshape(like.shape[1:]).astype(like.dtype)
    return jax.lax.all_to_all(rows_ct, axes, 0, 0), None


_send_fp8_pairs.defvjp(_send_fp8_pairs_fwd, _send_fp8_pairs_bwd)


class DecoderLayer(nnx.Module):
    """Pre-norm block: h = x + Attn(norm(x)); y = h + FFN(norm(h)), FFN dense SwiGLU or MoE + shared expert."""

    def __init__(self, config: Step3Config, layer_idx: int, *, rngs: nnx.Rngs, ctx: ShardCtx):
        dt, d, fp8 = config.dtype, config.hidden_size, config.quantization == "fp8"
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps, dt)
        self.self_attn = MFAAttention(config, rngs=rngs, ctx=ctx)
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps, dt)
        if self.is_moe:
            self.moe = MoE(config, rngs=rngs, ctx=ctx)
            self.share_expert = MLP(d, config.share_expert_dim, dt, rngs=rngs, fp8=fp8, ctx=ctx)
        else:
            self.mlp = MLP(d, config.intermediate_size, dt, rngs=rngs, fp8=fp8, ctx=ctx)

    def attention(self, x, positions, kv=None, start=None, segment_ids=None):
        """The attention half: returns (h, normed h for the FFN, new kv)."""
        with jax.named_scope("attention"):
            a, kv = self.self_attn(self.input_layernorm(x), positions, kv, start, segment_ids)
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

    def __call__(self, x, positions, kv=None, start=None, segment_ids=None):
        h, normed, kv = self.attention(x, positions, kv, start, segment_ids)
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

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array | None = None,
        cache: kvc.KVCache | kvc.PagedKVCache | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """input_ids int [B, T]. Without a cache, positions default to 0..T-1 and logits [B, T, V] are returned.

        With a :class:`~step3_jax.kv_cache.KVCache`, the T tokens are appended after each sequence's
        ``cache.lengths`` (positions default to those slots) and ``(logits, new_cache)`` is returned, with
        ``lengths`` advanced by T. A :class:`~step3_jax.kv_cache.PagedKVCache` works the same way (its block
        table must cover every written slot); decode steps (T == 1) then run the MFA decode kernel on GPU.

        ``segment_ids [B, T]`` (no cache): tokens attend only within their own segment (packed documents;
        give ``positions`` restarting per document too).
        """
        b, t = input_ids.shape if input_ids.ndim == 2 else (None, None)
        x = self.embed(input_ids)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            for layer in self.layers:
                x, _ = layer(x, positions, segment_ids=segment_ids)
            return self.logits(x)
        _check_cache(cache, b, t, self.ctx)
        start = cache.lengths
        if positions is None:
            positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if isinstance(cache, kvc.PagedKVCache):
            layers = []
            for i, layer in enumerate(self.layers):
                x, paged = layer(x, positions, cache.layer(i), start)
                layers.append(paged)
            return self.logits(x), kvc.PagedKVCache.from_layers(layers, cache.block_table, start + t)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, (k, v) = layer(x, positions, (cache.k[i], cache.v[i]), start)
            ks.append(k)
            vs.append(v)
        new_cache = kvc.KVCache(k=tuple(ks), v=tuple(vs), lengths=start + t)
        return self.logits(x), new_cache


def _readable(x) -> bool:
    """Whether ``x``'s values can be read on the host now (not traced, and not split over other processes)."""
    return not isinstance(x, jax.core.Tracer) and getattr(x, "is_fully_addressable", True)


def _check_cache(cache, b: int, t: int, ctx: ShardCtx) -> None:
    """Refuse a cache that cannot take these ``t`` tokens of ``b`` sequences, where it can be seen without tracing
    (an eager call: a notebook's): a cache of another batch size, ``t`` tokens past its room (a contiguous cache
    would overwrite earlier slots, a paged one drop them), or block-table page ids outside the pool. On a mesh
    with data-parallel groups the pool is split between them and page ids are local to each group's share."""
    if tuple(cache.lengths.shape) != (b,):
        raise ValueError(f"the cache's lengths have shape {tuple(cache.lengths.shape)}, the batch is {b} sequences")
    if not _readable(cache.lengths):
        return
    longest = int(np.max(np.asarray(cache.lengths))) + t  # (numpy: a concrete array closed over by a jit stays so)
    if isinstance(cache, kvc.KVCache):
        if longest > cache.max_length:
            raise ValueError(
                f"KV cache overflow: {t} more tokens after {longest - t} make {longest}, past its max_length "
                f"{cache.max_length}"
            )
        return
    table = cache.block_table
    if table.shape[0] != b:
        raise ValueError(f"the block table has {table.shape[0]} rows, the batch is {b} sequences")
    if longest > table.shape[1] * cache.page_size:
        raise ValueError(
            f"paged KV cache overflow: {longest} tokens need more than the block table's {table.shape[1]} pages of "
            f"{cache.page_size} tokens"
        )
    if not _readable(table) or not table.size:
        return
    groups = kvc.num_page_groups(ctx.mesh, ctx.rules)
    local = cache.k[0].shape[0] // groups
    table = np.asarray(table)
    lo, hi = int(table.min()), int(table.max())
    if lo < 0 or hi >= local:
        where = (
            f"each of the mesh's {groups} data-parallel groups holds {local} of the {cache.k[0].shape[0]} pages, "
            f"and a block table's ids are local to its row's group (0 .. {local - 1}; see create_page_pool and "
            "PageAllocator per group, as the engine does)"
            if groups > 1
            else f"the pool has {local} pages"
        )
        raise ValueError(f"block table page ids span {lo} .. {hi}, outside the pool: {where}")


def _check_ids(input_ids) -> None:
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, time], got shape {input_ids.shape}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.shape[1] < 1:
        raise ValueError("input_ids has no tokens (time axis of length 0)")


# ---------------------------------------------------------------------- construction on a mesh


def _path_names(keypath) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in keypath)


def param_spec(var, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec of one (possibly abstract) parameter from its logical axes.

    A block-FP8 weight in the HF layout has flattened sides (``wq`` ``[H*K, Q]``); its ``axis_sizes`` metadata
    gives the size of each dimension's logical axis (``H``), and a dimension is split only where that size
    (and, for the ``_scale_inv`` blocks, the number of blocks) divides evenly, so an FP8 projection is split
    over whole heads exactly when its plain counterpart is."""
    axes = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
    sizes = var.get_metadata().get("axis_sizes")
    shape = tuple(var.shape) if sizes is None else tuple(math.gcd(a, s) for a, s in zip(sizes, var.shape, strict=True))
    return rules.spec(axes, mesh, shape)


def param_shardings(state, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES):
    """NamedSharding for every parameter of a (possibly abstract) model state, from its logical axes.

    Raises ValueError naming the parameter when the split of an FP8 attention projection would cut its
    128 x 128 scale blocks (see :func:`step3_jax.sharding.check_block_sharding`)."""

    def one(keypath, var):
        spec = param_spec(var, mesh, rules)
        path = _path_names(keypath)
        if len(path) >= 2 and path[-2] == "self_attn" and var.dtype == FP8_DTYPE:
            name = "model." + ".".join(map(str, path)) + ".weight"  # the HF key
            check_block_sharding(mesh, spec, var.shape, BLOCK, name, var.get_metadata().get("logical_axes"))
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_model(
    config: Step3Config,
    *,
    seed: int = 0,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
) -> Step3ForCausalLM:
    """Build a randomly initialised model. The initialisers run as one compiled program (cached per config
    and mesh, so later calls with other seeds are quick); with a mesh, every parameter is created directly
    in its sharding, so no device ever holds the whole model. Same seed, same weights, on any mesh (drawn with
    the generator of :func:`step3_jax.init_rng.init_key`)."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh, rules=rules)))
    return nnx.merge(graphdef, _init_state(config, jnp.asarray(seed, jnp.int32), mesh, rules))


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _init_state(config, seed, mesh, rules):
    state = nnx.state(Step3ForCausalLM(config, rngs=nnx.Rngs(init_key(seed)), mesh=mesh, rules=rules))
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
        if str(path[-1]).endswith(SCALE_SUFFIX):
            continue  # FP8 block scales are not parameters of the model
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
