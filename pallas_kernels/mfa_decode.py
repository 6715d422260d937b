"""MFA decode attention over a paged KV cache: a Mosaic GPU (Hopper) kernel, its pure-JAX reference, a dispatcher.

Step-3's decode step attends with ``H = 64`` query heads to ONE shared 256-wide K/V head, so the whole cost is
reading the cache: every K/V byte serves 64 heads. The kernel streams the cache once at (close to) HBM speed.

Inputs (one layer):
  q            [B, H, 256]               query heads of the one new token per sequence (bf16)
  k_pages      [P, page_size, 256]       K pages, bf16, or float8_e4m3fn with ``k_scales``
  v_pages      [P, page_size, 256]       V pages, same dtype as ``k_pages``
  k_scales     [P, page_size] float32    FP8 only: one scale per token (``k ~= k_pages * k_scales[..., None]``)
  v_scales     [P, page_size] float32    FP8 only: same for V
  block_table  [B, max_pages] int32      page ids of each sequence, in order (entries past a sequence's
                                         length are never read and may hold anything in range)
  lengths      [B] int32                 tokens in each sequence (>= 1)
Output: [B, H, 256] in q's dtype, ``softmax(scale * q k^T) v`` over each sequence's first ``lengths[b]`` tokens.

Kernel design (see docs/kernels.md for the full story):
  * grid ``(batch, head_tile, split)``: heads are padded to tiles of 64 (one wgmma M tile); the KV length of
    each sequence is cut into ``num_splits`` contiguous ranges of ``block_kv``-token blocks (flash-decoding),
    so small batches with long contexts still fill the 132 SMs.
  * two warpgroups per CTA: a producer that TMA-loads K and V blocks (page id read from the block table)
    into a ``stages``-deep ring of SMEM slots, and a consumer that runs ``S = Q K^T`` (wgmma, M = 64 heads,
    N = block_kv, K = 256), an online softmax in registers (log2 domain), and ``O += P V`` (wgmma).
  * FP8 KV: the consumer dequantises each FP8 tile to float16 in registers (Hopper converts e4m3 -> f16 in
    hardware, not e4m3 -> bf16), multiplies by the per-token scales, writes an f16 SMEM tile and runs f16
    wgmma (q is cast to f16 for this path). The HBM read, which sets the speed, stays FP8.
  * each CTA writes its normalised partial output (bf16) and log-sum-exp (f32, log2 domain); a small JAX
    combine merges the splits stably (weights ``2 ** (lse_s - max_s lse)``).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.interpret import interpret_params

log = logging.getLogger(__name__)

HEAD_DIM = 256  # the kernel is written for Step-3's 256-wide head
HEAD_TILE = 64  # query heads per wgmma M tile
NUM_WARPGROUPS = 2  # a consumer (Q K^T, softmax, P V) and a TMA producer
NUM_SMS = 132  # H100 / H200 SXM
SMEM_BYTES = 227 * 1024
FP8_DTYPE = jnp.float8_e4m3fn
IMPLS = ("auto", "kernel", "reference")
_LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_inputs(q, k_pages, v_pages, block_table, lengths, k_scales=None, v_scales=None) -> None:
    """Shape / dtype checks, plus value checks (lengths, page ids) when the arrays are concrete.

    Inside ``jit`` the values are traced and only shapes are checked: out-of-range page ids or lengths then
    read the wrong pages (the reference clamps ids), so check them where the cache is managed
    (:class:`step3_jax.kv_cache.PageAllocator`).
    """
    if q.ndim != 3:
        raise ValueError(f"q must be [batch, heads, head_dim], got shape {q.shape}")
    if k_pages.ndim != 3 or v_pages.shape != k_pages.shape:
        raise ValueError(
            f"k_pages and v_pages must both be [num_pages, page_size, head_dim]; got {k_pages.shape}, {v_pages.shape}"
        )
    b, _, d = q.shape
    num_pages, page_size, kd = k_pages.shape
    if kd != d:
        raise ValueError(f"head_dim mismatch: q has {d}, the KV pages have {kd}")
    if block_table.ndim != 2 or block_table.shape[0] != b:
        raise ValueError(f"block_table must be [batch={b}, max_pages], got shape {block_table.shape}")
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be [batch={b}], got shape {lengths.shape}")
    if not jnp.issubdtype(block_table.dtype, jnp.integer) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"block_table and lengths must be integer, got {block_table.dtype}, {lengths.dtype}")
    if k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages and v_pages must share a dtype, got {k_pages.dtype}, {v_pages.dtype}")
    fp8 = k_pages.dtype == FP8_DTYPE
    if fp8 != (k_scales is not None) or fp8 != (v_scales is not None):
        raise ValueError("FP8 (float8_e4m3fn) KV pages need k_scales and v_scales; other dtypes take none")
    if fp8 and (k_scales.shape != (num_pages, page_size) or v_scales.shape != (num_pages, page_size)):
        raise ValueError(
            f"k_scales / v_scales must be [num_pages, page_size] = {(num_pages, page_size)} (one per token), "
            f"got {k_scales.shape}, {v_scales.shape}"
        )
    if _is_concrete(lengths):
        lens = jax.device_get(lengths)
        capacity = block_table.shape[1] * page_size
        if lens.min(initial=1) < 1:
            raise ValueError(f"every sequence needs at least one token; lengths = {lens.tolist()}")
        if lens.max(initial=0) > capacity:
            raise ValueError(
                f"lengths {lens.tolist()} exceed the block table's capacity of {block_table.shape[1]} pages x "
                f"{page_size} tokens = {capacity}"
            )
        if _is_concrete(block_table):
            bt = jax.device_get(block_table)
            for row, n in enumerate(lens):
                used = bt[row, : -(-int(n) // page_size)]
                if used.size and (used.min() < 0 or used.max() >= num_pages):
                    raise ValueError(
                        f"sequence {row}: page ids {used.tolist()} out of range [0, {num_pages}) of the KV pages"
                    )


# ---------------------------------------------------------------------------------------------- reference


def gather_pages(pages: jax.Array, block_table: jax.Array) -> jax.Array:
    """``pages [P, page_size, ...]``, ``block_table [B, M]`` -> contiguous ``[B, M * page_size, ...]``."""
    g = jnp.take(pages, block_table, axis=0, mode="clip")  # [B, M, page_size, ...]
    return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])


def dequantize_pages(pages: jax.Array, scales: jax.Array | None, dtype=jnp.float32) -> jax.Array:
    """FP8 pages times per-token scales -> ``dtype``; other pages are just cast."""
    if scales is None:
        return pages.astype(dtype)
    return (pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)).astype(dtype)


def mfa_decode_reference(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Pure JAX: gather the pages, dequantise, float32 scores and softmax. Returns ``[B, H, K]`` in q's dtype."""
    k = gather_pages(dequantize_pages(k_pages, k_scales), block_table)  # [B, S, K] f32
    v = gather_pages(dequantize_pages(v_pages, v_scales), block_table)
    s = jnp.einsum("bhk,bsk->bhs", q.astype(jnp.float32), k, precision="highest") * scale
    valid = jnp.arange(k.shape[1], dtype=jnp.int32)[None, :] < lengths[:, None]
    s = jnp.where(valid[:, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhs,bsk->bhk", p, v, precision="highest").astype(q.dtype)


# ---------------------------------------------------------------------------------------------- kernel


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tiling of the kernel. ``block_kv`` tokens per pipeline step (divides page_size); ``stages`` SMEM slots;
    ``num_splits`` KV ranges per (sequence, head tile); None picks one from the shapes.

    ``fp8_qk`` (FP8 KV only): ``S = Q K^T`` by FP8 wgmma straight on the FP8 K tile instead of dequantising K
    into an f16 tile first (V is still dequantised to f16): half the consumer's staging work and SMEM traffic.
    ``q`` goes in as the sum of two e4m3 terms, each with one f32 scale per head (:func:`split_q_fp8`), so the
    scores keep about f16's precision (one e4m3 ``q`` alone costs ~5% relative error on a peaked softmax); two
    FP8 wgmmas take the tensor-core time of one f16 one."""

    block_kv: int = 64
    stages: int = 3
    num_splits: int | None = None
    fp8_qk: bool = False

    def smem_bytes(self, fp8: bool) -> int:
        q = HEAD_TILE * HEAD_DIM * 2 + (2 * HEAD_TILE * 4 if fp8 and self.fp8_qk else 0)  # f16, or 2 x e4m3 + scales
        elt = 1 if fp8 else 2
        ring = self.stages * 2 * self.block_kv * HEAD_DIM * elt
        extra = self.block_kv * HEAD_DIM * 2 + self.stages * 2 * self.block_kv * 4 if fp8 else 0
        return q + ring + extra + HEAD_TILE * 4


def kernel_supports(head_dim: int, kv_dtype, page_size: int) -> str | None:
    """Why the kernel cannot take this cache (None if it can): head_dim 256, BF16 or FP8 pages, and pages cut into
    whole ``min(64, page_size)``-token blocks (a multiple of 16; of 64 for FP8 KV, so FP8 needs pages >= 64)."""
    if head_dim != HEAD_DIM:
        return f"head_dim {head_dim} (the kernel is written for {HEAD_DIM})"
    if kv_dtype not in (jnp.bfloat16, FP8_DTYPE):
        return f"KV dtype {jnp.dtype(kv_dtype).name} (the kernel takes bfloat16 or float8_e4m3fn)"
    block_kv = min(64, page_size)
    if page_size % block_kv or block_kv % 16:
        return f"page_size {page_size} (the kernel needs a multiple of 16, and of 64 above 64)"
    if kv_dtype == FP8_DTYPE and block_kv % 64:
        return f"page_size {page_size} with FP8 KV (the kernel needs pages of a multiple of 64 tokens)"
    return None


_WARNED: set = set()


def default_config(batch: int, head_tiles: int, max_len: int, page_size: int, fp8: bool) -> KernelConfig:
    """Tiles that fit SMEM and a split count that gives every SM some of the KV length."""
    block_kv = min(64, page_size)
    stages = 4 if fp8 else 3
    blocks = max(1, -(-max_len // block_kv))
    ctas = batch * head_tiles
    # about two full waves of CTAs on the 132 SMs (one CTA per SM: the SMEM ring takes it all), rounded down so a
    # third, nearly empty wave never starts; each split keeps >= 4 blocks so its pipeline has work to overlap
    splits = max(1, min(2 * NUM_SMS // ctas, blocks // 4))
    return KernelConfig(block_kv=block_kv, stages=stages, num_splits=splits)


def _swizzled(dtype, minor: int = HEAD_DIM) -> tuple:
    """Tiling + the widest swizzle that the ``minor`` dimension allows (wgmma / TMA friendly SMEM layout)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    bits = jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(minor * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _mma_into(acc, a, b, a_smem):
    """``acc + a @ b`` with wgmma, ``a`` from registers, accumulating in place (``run_state``).

    GPU interpret mode (jax 0.11.2) implements neither ``run_state`` nor wgmma operands in registers, so for it
    (``a_smem`` given) ``a`` goes through SMEM and the product into a fresh scoped accumulator that is added."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if a_smem is not None:
        a_smem[...] = a
        plgpu.commit_smem()

        def fresh(acc_ref):
            plgpu.wgmma(acc_ref, a_smem, b)
            return acc_ref[...]

        return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, a, b))(plgpu.ACC.init(acc))


def split_q_fp8(q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``q [B, H, K]`` as two e4m3 terms, ``q ~= t[:, 0] * s[:, 0, :, None] + t[:, 1] * s[:, 1, :, None]``: the
    first quantises ``q`` per head (scale from its absolute max), the second the remainder. Returns (``t`` e4m3
    ``[B, 2, H, K]``, ``s`` f32 ``[B, 2, H]``); the pair's relative error is about the square of one term's."""

    def per_head(x):
        amax = jnp.max(jnp.abs(x), axis=-1)
        sc = jnp.where(amax > 0, amax / float(jnp.finfo(FP8_DTYPE).max), 1.0)
        t = (x / sc[..., None]).astype(FP8_DTYPE)
        return t, sc, x - t.astype(jnp.float32) * sc[..., None]

    hi, s_hi, rest = per_head(q.astype(jnp.float32))
    lo, s_lo, _ = per_head(rest)
    return jnp.stack([hi, lo], axis=1), jnp.stack([s_hi, s_lo], axis=1)


def _kernel_partials(q, k_pages, v_pages, k_scales, v_scales, block_table, lengths, *, scale, cfg, interpret):
    """Run the Mosaic GPU kernel: returns (o_part [B, S, Hp, K] bf16, lse_part [B, S, Hp] f32, log2 domain)."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    b, hp, d = q.shape
    _, page_size, _ = k_pages.shape
    fp8 = k_pages.dtype == FP8_DTYPE
    fp8_qk = fp8 and cfg.fp8_qk  # Q K^T in FP8 on the FP8 K tile (q as two e4m3 terms)
    cdt = jnp.float16 if fp8 else jnp.bfloat16  # wgmma operand dtype (P V; and Q K^T unless fp8_qk)
    bk, stages, splits = cfg.block_kv, cfg.stages, cfg.num_splits
    bpp = page_size // bk  # blocks per page
    head_tiles = hp // HEAD_TILE
    qk_scale = scale * _LOG2E  # scores in the log2 domain: exp2 instead of exp

    def body(q_ref, qs_ref, k_ref, v_ref, ks_ref, vs_ref, bt_ref, len_ref, o_ref, lse_ref, smem, bars):
        q_smem, qs_smem, k_smem, v_smem, ks_smem, vs_smem, kv16_smem, lse_smem, p_smem = smem
        q_bar, k_bar, v_bar, k_free, v_free = bars
        bi = lax.axis_index("batch")
        hi = lax.axis_index("heads")
        si = lax.axis_index("split")
        wg = lax.axis_index("wg")
        length = len_ref[bi]
        nblocks = lax.div(length + (bk - 1), bk)
        per = lax.div(nblocks + (splits - 1), splits)
        first = si * per
        nsteps = jnp.maximum(jnp.minimum(nblocks, first + per) - first, 0)
        heads = pl.ds(hi * HEAD_TILE, HEAD_TILE)

        @pl.when(wg == 0)
        def _consumer():
            if fp8_qk:
                for j in range(2):
                    plgpu.copy_gmem_to_smem(q_ref.at[bi, j, heads], q_smem.at[j], q_bar.at[0])
                    plgpu.copy_gmem_to_smem(qs_ref.at[bi, j, heads], qs_smem.at[j], q_bar.at[0])
            else:
                plgpu.copy_gmem_to_smem(q_ref.at[bi, heads], q_smem, q_bar.at[0])
            plgpu.barrier_wait(q_bar.at[0])
            if fp8_qk:  # each q term's per-head scale, folded with the softmax scale, per row of the scores
                row = plgpu.Layout.WGMMA.reduce(1)
                q_row_scale = [plgpu.load(qs_smem.at[j], layout=row) * qk_scale for j in range(2)]
            m_i = plgpu.layout_cast(jnp.full((HEAD_TILE,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            l_i = plgpu.layout_cast(jnp.full((HEAD_TILE,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = plgpu.layout_cast(jnp.full((HEAD_TILE, d), 0.0, jnp.float32), plgpu.Layout.WGMMA)

            def dequant(src, scales_ref, dst):
                x = src[...].astype(jnp.float16)
                s = scales_ref[...].astype(jnp.float16)
                dst[...] = x * lax.broadcast_in_dim(s, x.shape, [0])
                plgpu.commit_smem()

            def step(t, carry):
                acc, m_i, l_i = carry
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                if fp8_qk:
                    k_tile = k_smem.at[slot]  # FP8, K-major as FP8 wgmma wants its B operand
                elif fp8:
                    dequant(k_smem.at[slot], ks_smem.at[slot], kv16_smem)
                    plgpu.barrier_arrive(k_free.at[slot])
                    k_tile = kv16_smem
                else:
                    k_tile = k_smem.at[slot]

                def qk(acc_ref):
                    plgpu.wgmma(acc_ref, q_smem, k_tile.transpose((1, 0)))
                    return acc_ref[...]

                def qk2(hi_ref, lo_ref):  # the two e4m3 terms of q, each against the FP8 K tile
                    plgpu.wgmma(hi_ref, q_smem.at[0], k_tile.transpose((1, 0)))
                    plgpu.wgmma(lo_ref, q_smem.at[1], k_tile.transpose((1, 0)))
                    return hi_ref[...], lo_ref[...]

                if fp8_qk:
                    acc_s = plgpu.ACC((HEAD_TILE, bk), jnp.float32)
                    s_hi, s_lo = pl.run_scoped(qk2, acc_s, acc_s)
                    k_col_scale = plgpu.load(ks_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
                    plgpu.barrier_arrive(k_free.at[slot])
                    s = s_hi * lax.broadcast_in_dim(q_row_scale[0], s_hi.shape, [0])
                    s = s + s_lo * lax.broadcast_in_dim(q_row_scale[1], s_lo.shape, [0])
                    s = s * lax.broadcast_in_dim(k_col_scale, s.shape, [1])
                else:
                    s = pl.run_scoped(qk, plgpu.ACC((HEAD_TILE, bk), jnp.float32))
                    if not fp8:
                        plgpu.barrier_arrive(k_free.at[slot])
                    s = s * qk_scale
                col = plgpu.broadcasted_iota(jnp.int32, (HEAD_TILE, bk), 1, layout=plgpu.Layout.WGMMA)
                s = jnp.where(col + (first + t) * bk < length, s, -jnp.inf)
                m_new = jnp.maximum(m_i, s.max(axis=1))
                alpha = jnp.exp2(m_i - m_new)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
                l_i = l_i * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                plgpu.barrier_wait(v_bar.at[slot])
                if fp8:
                    dequant(v_smem.at[slot], vs_smem.at[slot], kv16_smem)  # K's wgmma is done
                    plgpu.barrier_arrive(v_free.at[slot])
                    v_tile = kv16_smem
                else:
                    v_tile = v_smem.at[slot]

                acc = _mma_into(acc, p.astype(cdt), v_tile, p_smem)
                if not fp8:
                    plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l_i

            acc, m_i, l_i = lax.fori_loop(0, nsteps, step, (acc, m_i, l_i))
            l_safe = jnp.where(l_i == 0.0, 1.0, l_i)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            # (an FP8 q tile cannot hold the output; V's f16 tile is free now, and block_kv >= 64 rows with FP8 KV)
            out_smem = kv16_smem.at[pl.ds(0, HEAD_TILE)] if fp8_qk else q_smem
            out_smem[...] = acc.astype(out_smem.dtype)
            lse_smem[...] = m_i + jnp.log2(l_safe)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, o_ref.at[bi, si, heads])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, si, heads])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 1)
        def _producer():
            def issue(t, slot):
                blk = first + t
                page = bt_ref[bi, lax.div(blk, bpp)]
                rows = pl.ds(lax.rem(blk, bpp) * bk, bk)
                plgpu.copy_gmem_to_smem(k_ref.at[page, rows], k_smem.at[slot], k_bar.at[slot])
                plgpu.copy_gmem_to_smem(v_ref.at[page, rows], v_smem.at[slot], v_bar.at[slot])
                if fp8:
                    plgpu.copy_gmem_to_smem(ks_ref.at[page, rows], ks_smem.at[slot], k_bar.at[slot])
                    plgpu.copy_gmem_to_smem(vs_ref.at[page, rows], vs_smem.at[slot], v_bar.at[slot])

            for i in range(stages):

                @pl.when(i < nsteps)
                def _prologue(i=i):
                    issue(i, i)

            @pl.loop(stages, jnp.maximum(nsteps, stages))
            def _refill(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])
                issue(t, slot)

            # Observe the consumer's last release of every slot, so each barrier phase is waited on exactly once
            # (free on hardware; GPU interpret mode checks it when the barriers are deallocated).
            @pl.loop(jnp.maximum(nsteps - stages, 0), nsteps)
            def _drain(t):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    kv_dt = k_pages.dtype
    smem = (
        plgpu.SMEM((2, HEAD_TILE, d), FP8_DTYPE, transforms=_swizzled(FP8_DTYPE))
        if fp8_qk
        else plgpu.SMEM((HEAD_TILE, d), cdt, transforms=_swizzled(cdt)),
        plgpu.SMEM((2, HEAD_TILE), jnp.float32) if fp8_qk else None,
        plgpu.SMEM((stages, bk, d), kv_dt, transforms=_swizzled(kv_dt)),
        plgpu.SMEM((stages, bk, d), kv_dt, transforms=_swizzled(kv_dt)),
        plgpu.SMEM((stages, bk), jnp.float32) if fp8 else None,
        plgpu.SMEM((stages, bk), jnp.float32) if fp8 else None,
        plgpu.SMEM((bk, d), cdt, transforms=_swizzled(cdt)) if fp8 else None,  # dequantised K, then V
        plgpu.SMEM((HEAD_TILE,), jnp.float32),
        plgpu.SMEM((HEAD_TILE, bk), cdt, transforms=_swizzled(cdt, bk)) if interpret else None,
    )
    tma_per_stage = 2 if fp8 else 1
    bars = (
        plgpu.Barrier(num_arrivals=4 if fp8_qk else 1, num_barriers=1),
        plgpu.Barrier(num_arrivals=tma_per_stage, num_barriers=stages),
        plgpu.Barrier(num_arrivals=tma_per_stage, num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
    )
    out_type = (
        jax.ShapeDtypeStruct((b, splits, hp, d), cdt),
        jax.ShapeDtypeStruct((b, splits, hp), jnp.float32),
    )
    kernel = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=(smem, bars),
        grid=(b, head_tiles, splits),
        grid_names=("batch", "heads", "split"),
        num_threads=NUM_WARPGROUPS,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0),
        interpret=interpret_params(NUM_WARPGROUPS, "MFA decode") if interpret else None,
    )
    if not fp8:  # the kernel signature is fixed; unused scale refs get tiny placeholders
        k_scales = v_scales = jnp.zeros((1, 1), jnp.float32)
    if fp8_qk:
        q_in, q_scales = split_q_fp8(q)
    else:
        q_in, q_scales = q.astype(cdt), jnp.zeros((1, 1), jnp.float32)
    return kernel(q_in, q_scales, k_pages, v_pages, k_scales, v_scales, block_table, lengths)


def combine_splits(o_part: jax.Array, lse_part: jax.Array, dtype) -> jax.Array:
    """Merge per-split normalised outputs ``o_part [B, S, H, K]`` with log2-domain ``lse_part [B, S, H]``."""
    lse_max = jnp.max(lse_part, axis=1, keepdims=True)
    lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
    w = jnp.exp2(lse_part - lse_max)  # empty splits: lse = -inf -> weight 0
    w = w / jnp.sum(w, axis=1, keepdims=True)
    o = jnp.where(w[..., None] > 0, o_part.astype(jnp.float32), 0.0)
    return jnp.einsum("bsh,bshk->bhk", w, o).astype(dtype)


def mfa_decode_kernel(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    config: KernelConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The Mosaic GPU kernel (``interpret=True``: simulated on the CPU). Same contract as the reference."""
    check_inputs(q, k_pages, v_pages, block_table, lengths, k_scales, v_scales)
    b, h, d = q.shape
    num_pages, page_size, _ = k_pages.shape
    if d != HEAD_DIM:
        raise ValueError(f"the MFA decode kernel is written for head_dim {HEAD_DIM}, got {d}")
    fp8 = k_pages.dtype == FP8_DTYPE
    if not fp8 and k_pages.dtype != jnp.bfloat16:
        raise ValueError(f"KV pages must be bfloat16 or float8_e4m3fn for the kernel, got {k_pages.dtype}")
    head_tiles = -(-h // HEAD_TILE)
    max_len = block_table.shape[1] * page_size
    cfg = config or default_config(b, head_tiles, max_len, page_size, fp8)
    if cfg.num_splits is None:
        cfg = dataclasses.replace(cfg, num_splits=default_config(b, head_tiles, max_len, page_size, fp8).num_splits)
    if page_size % cfg.block_kv or cfg.block_kv % 16:
        raise ValueError(f"block_kv {cfg.block_kv} must be a multiple of 16 dividing page_size {page_size}")
    if fp8 and cfg.block_kv % 64:
        raise ValueError(f"FP8 KV needs block_kv a multiple of 64 (page_size >= 64), got {cfg.block_kv}")
    hp = head_tiles * HEAD_TILE
    qp = jnp.pad(q, ((0, 0), (0, hp - h), (0, 0))) if hp != h else q
    o_part, lse_part = _kernel_partials(
        qp,
        k_pages,
        v_pages,
        k_scales,
        v_scales,
        block_table.astype(jnp.int32),
        lengths.astype(jnp.int32),
        scale=scale,
        cfg=cfg,
        interpret=interpret,
    )
    return combine_splits(o_part, lse_part, q.dtype)[:, :h]


def mfa_decode(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_table: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Dispatcher: the Mosaic GPU kernel on a CUDA backend when it supports the cache (:func:`kernel_supports`),
    the reference elsewhere. On a GPU, a cache the kernel cannot take runs the (slower) reference with a warning
    saying why, once per reason; ``impl="kernel"`` raises instead."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_inputs(q, k_pages, v_pages, block_table, lengths, k_scales, v_scales)
    if impl == "auto":
        impl = "reference"
        if jax.default_backend() == "gpu":
            why = kernel_supports(q.shape[-1], k_pages.dtype, k_pages.shape[1])
            if why is None:
                impl = "kernel"
            elif why not in _WARNED:
                _WARNED.add(why)
                log.warning("MFA decode: the Pallas kernel does not support %s; using the pure-JAX reference", why)
    fn = mfa_decode_kernel if impl == "kernel" else mfa_decode_reference
    return fn(q, k_pages, v_pages, block_table, lengths, scale=scale, k_scales=k_scales, v_scales=v_scales)
