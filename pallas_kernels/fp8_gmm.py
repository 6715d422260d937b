"""Block-scaled FP8 grouped GEMM for the MoE experts (Mosaic GPU, Hopper), its pure-JAX reference and the expert FFN.

    out[m, :] = dequant(x_q[m], x_scale[m]) @ dequant(w_q[g(m)], w_scale[g(m)])^T      for the rows m of group g

with the FP8 formats of :mod:`step3_jax.quant`: ``x_q`` float8_e4m3fn ``[M, K]`` with one float32 scale per row per
128 channels (``x_scale [M, ceil(K/128)]``), ``w_q`` float8_e4m3fn ``[G, N, K]`` (HF layout, K-major, which FP8 wgmma
needs for its B operand) with one float32 scale per 128 x 128 block (``w_scale [G, ceil(N/128), ceil(K/128)]``).
Groups are consecutive row ranges given by ``group_sizes [G]`` as in :func:`jax.lax.ragged_dot`; rows past
``sum(group_sizes)`` come out as zeros.

Both paths accumulate in float32 one 128-wide K block at a time and apply the two scales to that block's partial
product (DeepSeek-style block FP8: ``acc += (x_q_b @ w_q_b^T) * x_scale_b[:, None] * w_scale_b``):

* :func:`fp8_grouped_matmul_reference` -- pure JAX (``lax.ragged_dot`` per K block), the CPU path and the oracle.
* :func:`fp8_grouped_matmul_kernel` -- the Mosaic GPU kernel (see ``docs/kernels.md``): a persistent grid over the
  SMs walks (row tile, column tile) pairs; row tiles are cut group by group so a tile never mixes groups; a memory
  warpgroup streams x / w / x-scale tiles through a multi-stage TMA pipeline while two compute warpgroups (64 rows
  each) run one FP8 wgmma per 128-K step into a fresh f32 partial and fold it into a register accumulator with the
  two scales; the BF16 tile goes out through SMEM with TMA stores of only the group's rows.
* :func:`fp8_grouped_matmul` -- dispatcher: the kernel on a Hopper GPU for shapes it supports, the reference
  elsewhere.

On top of it: :func:`quantize_rows` (gather + per-token-group FP8 quantisation in one pass, scales emitted in the
kernel's transposed layout), :func:`fp8_linear` (one group: dense / shared-expert FP8 layers), :func:`fp8_mlp` and
:func:`fp8_expert_ffn` / :func:`fp8_expert_ffn_fused` (the routed-expert FFN: sort pairs by expert, quantise, gate|up
GEMM, SiLU * up, quantise, down GEMM, weighted scatter-add), mirroring :func:`step3_jax.model.grouped_experts`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.interpret import interpret_params
from step3_jax.model import sort_pairs
from step3_jax.quant import BLOCK, FP8_DTYPE, FP8_MAX

logger = logging.getLogger(__name__)

f32 = jnp.float32
Impl = Literal["auto", "kernel", "interpret", "reference"]
IMPLS = ("auto", "kernel", "interpret", "reference")

# Hopper: 228 KB of shared memory per SM, 227 KB usable by one block.
SMEM_BYTES = 227 * 1024
NUM_COMPUTE_WGS = 2
ROW_ALIGN = 8  # the kernel pads M to this (swizzled TMA tiles are 8 rows high)


# ----------------------------------------------------------------------------------------------------------------
# Shape checks
# ----------------------------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_operands(x_q, x_scale, w_q, w_scale, group_sizes, *, x_scale_transposed: bool = False) -> None:
    """Validate dtypes and shapes; raises ValueError naming the argument, the expected and the found shape."""
    if x_q.ndim != 2:
        raise ValueError(f"x_q must be [M, K], got shape {tuple(x_q.shape)}")
    if w_q.ndim != 3:
        raise ValueError(f"w_q must be [G, N, K] (HF layout, K-major), got shape {tuple(w_q.shape)}")
    m, k = x_q.shape
    g, n, k2 = w_q.shape
    if k2 != k:
        raise ValueError(f"w_q must be [G, N, K] with K={k} (from x_q {tuple(x_q.shape)}), got {tuple(w_q.shape)}")
    for name, arr in (("x_q", x_q), ("w_q", w_q)):
        if arr.dtype != FP8_DTYPE:
            raise ValueError(f"{name} must be {jnp.dtype(FP8_DTYPE).name}, got {arr.dtype}")
    kb, nb = _cdiv(k, BLOCK), _cdiv(n, BLOCK)
    want_xs = (kb, m) if x_scale_transposed else (m, kb)
    if tuple(x_scale.shape) != want_xs:
        raise ValueError(f"x_scale must have shape {want_xs} for x_q {tuple(x_q.shape)}, got {tuple(x_scale.shape)}")
    if tuple(w_scale.shape) != (g, nb, kb):
        raise ValueError(
            f"w_scale must have shape {(g, nb, kb)} for w_q {tuple(w_q.shape)}, got {tuple(w_scale.shape)}"
        )
    for name, arr in (("x_scale", x_scale), ("w_scale", w_scale)):
        if arr.dtype != f32:
            raise ValueError(f"{name} must be float32, got {arr.dtype}")
    if tuple(group_sizes.shape) != (g,):
        raise ValueError(f"group_sizes must have shape {(g,)} (one per group of w_q), got {tuple(group_sizes.shape)}")
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be an integer array, got {group_sizes.dtype}")


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def fp8_grouped_matmul_reference(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """Pure-JAX block-scaled FP8 grouped matmul: ``[M, K] x [G, N, K] -> [M, N]``, f32 accumulation per K block.

    Any K and N (partial edge blocks are zero-padded). Rows past ``sum(group_sizes)`` are zero.
    """
    _check_operands(x_q, x_scale, w_q, w_scale, group_sizes)
    m, k = x_q.shape
    g, n, _ = w_q.shape
    kb = _cdiv(k, BLOCK)
    pad_k = kb * BLOCK - k
    # [Kb, M, 128] and [Kb, G, 128, N]: one slice per K block for the scan.
    xb = jnp.pad(x_q.astype(f32), ((0, 0), (0, pad_k))).reshape(m, kb, BLOCK).transpose(1, 0, 2)
    w_s = jnp.repeat(w_scale, BLOCK, axis=1)[:, :n, :]  # [G, N, Kb]: the block scale of every output column
    wb = jnp.pad(w_q.astype(f32), ((0, 0), (0, 0), (0, pad_k))).reshape(g, n, kb, BLOCK)
    wb = (wb * w_s[..., None]).transpose(2, 0, 3, 1)  # [Kb, G, 128, N], w scale folded in (exact to f32 rounding)
    xs = x_scale.T  # [Kb, M]
    gs = group_sizes.astype(jnp.int32)

    def step(acc, blk):
        x_b, w_b, s_b = blk
        part = lax.ragged_dot(x_b, w_b, gs, precision=lax.Precision.HIGHEST, preferred_element_type=f32)
        return acc + part * s_b[:, None], None

    acc, _ = lax.scan(step, jnp.zeros((m, n), f32), (xb, wb, xs))
    return acc.astype(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# Activation quantisation (fused with the routing gather)
# ----------------------------------------------------------------------------------------------------------------


def quantize_rows(
    x: jax.Array, rows: jax.Array | None = None, *, transposed_scale: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Per-token, per-128-channel FP8 quantisation of ``x[rows]`` (``x`` itself if ``rows`` is None).

    Returns ``(q float8_e4m3fn [M, K], scale float32 [M, ceil(K/128)])``, the format of
    :func:`step3_jax.quant.quantize_activations`; with ``transposed_scale`` the scales come as ``[ceil(K/128), M]``,
    the layout the kernel streams (one contiguous row of scales per K block). Written as one gather + reduce +
    convert so XLA fuses it into a single pass over the gathered rows.
    """
    if x.ndim != 2:
        raise ValueError(f"quantize_rows expects x [N, K], got shape {tuple(x.shape)}")
    xr = x if rows is None else jnp.take(x, rows, axis=0)
    m, k = xr.shape
    kb = _cdiv(k, BLOCK)
    xp = jnp.pad(xr.astype(f32), ((0, 0), (0, kb * BLOCK - k))).reshape(m, kb, BLOCK)
    amax = jnp.max(jnp.abs(xp), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(f32)
    q = jnp.clip(xp / scale[..., None], -FP8_MAX, FP8_MAX).astype(FP8_DTYPE).reshape(m, kb * BLOCK)[:, :k]
    return q, (scale.T if transposed_scale else scale)


# ----------------------------------------------------------------------------------------------------------------
# Mosaic GPU kernel
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Tiling of the kernel. With ``split="m"`` a CTA computes a ``(2 * wg_m) x block_n`` output tile with two
    compute warpgroups of ``wg_m`` rows each; with ``split="n"`` a ``wg_m x block_n`` tile, each warpgroup taking
    ``block_n / 2`` of the columns (the decode shape: few rows per expert, so a CTA streams a wider weight tile per
    activation tile). One wgmma covers ``wg_m x sub_n`` (its f32 partial lives in registers next to the
    accumulator, so ``wg_m * (wg_n + sub_n) / 128`` registers per thread go to them)."""

    wg_m: int = 64
    block_n: int = 128
    sub_n: int = 128
    stages: int = 4
    grid_minor_dim: int = 0  # 0: consecutive tiles walk down the rows (share the weight tile), 1: along N
    grid_tile_width: int = 8
    num_sms: int = 132  # H100 / H200 SXM
    split: str = "m"  # how the two compute warpgroups share the CTA tile: "m" (rows) or "n" (columns)

    @property
    def block_m(self) -> int:
        """Rows of the CTA tile."""
        return NUM_COMPUTE_WGS * self.wg_m if self.split == "m" else self.wg_m

    @property
    def wg_n(self) -> int:
        """Columns of one compute warpgroup's part of the CTA tile."""
        return self.block_n if self.split == "m" else self.block_n // NUM_COMPUTE_WGS

    def smem_bytes(self, out_dtype=jnp.bfloat16) -> int:
        per_stage = self.block_m * BLOCK + self.block_n * BLOCK + self.block_m * 4  # x, w (fp8), x scales (f32)
        barriers = 1024  # pipeline barriers and alignment (measured: 96-592 bytes), rounded up
        return self.stages * per_stage + self.block_m * self.block_n * jnp.dtype(out_dtype).itemsize + barriers

    def validate(self, out_dtype=jnp.bfloat16) -> None:
        if self.wg_m not in (64, 128):
            raise ValueError(f"GmmConfig.wg_m must be 64 or 128, got {self.wg_m}")
        if self.block_n % BLOCK or self.block_n <= 0:
            raise ValueError(f"GmmConfig.block_n must be a positive multiple of {BLOCK}, got {self.block_n}")
        if self.sub_n not in (64, 128):
            raise ValueError(f"GmmConfig.sub_n must be 64 or 128, got {self.sub_n}")
        if self.split not in ("m", "n"):
            raise ValueError(f"GmmConfig.split must be 'm' (rows) or 'n' (columns), got {self.split!r}")
        if self.split == "n" and self.block_n % (NUM_COMPUTE_WGS * BLOCK):
            raise ValueError(
                f"GmmConfig.block_n must be a multiple of {NUM_COMPUTE_WGS * BLOCK} with split='n' (each warpgroup "
                f"takes whole {BLOCK}-column scale blocks), got {self.block_n}"
            )
        regs = self.wg_m * (self.wg_n + self.sub_n) // 128
        if regs > 192:
            raise ValueError(
                f"GmmConfig {self}: accumulator + partial need {regs} registers per thread (> 192); "
                "lower wg_m, block_n or sub_n"
            )
        if self.smem_bytes(out_dtype) > SMEM_BYTES:
            raise ValueError(
                f"GmmConfig {self} needs {self.smem_bytes(out_dtype)} bytes of shared memory (> {SMEM_BYTES})"
            )
        if self.stages < 2:
            raise ValueError(f"GmmConfig.stages must be >= 2, got {self.stages}")


DEFAULT_CONFIG = GmmConfig()


def kernel_supports(m: int, n: int, k: int, config: GmmConfig = DEFAULT_CONFIG) -> str | None:
    """None if the kernel handles this shape, else the reason it does not."""
    if k % BLOCK:
        return f"K={k} is not a multiple of {BLOCK} (pad the weights and activations along K, or use the reference)"
    if n % config.block_n:
        return f"N={n} is not a multiple of block_n={config.block_n}"
    if m == 0:
        return "M=0"
    return None


def _tile_of(gs_ref, num_groups: int, m: int, block_m: int, tid):
    """Map a row-tile id to (group, row block, group start, group end); group == num_groups is the zero tail.

    Row tiles are cut group by group: group i (rows [s, e)) owns row blocks s // block_m .. (e - 1) // block_m, so a
    block that straddles a boundary is visited once per group, and an empty group owns no tile. The pseudo group
    ``num_groups`` covers rows [sum(group_sizes), M) and is written as zeros. Also returns the number of tiles.
    """
    i32 = jnp.int32
    start = i32(0)
    count = i32(0)
    group = blk = g_start = g_end = i32(0)
    bm = i32(block_m)
    for i in range(num_groups + 1):
        size = gs_ref[i] if i < num_groups else jnp.maximum(i32(m) - start, 0)
        end = start + size
        first = lax.div(start, bm)
        tiles = lax.select(size > 0, lax.div(jnp.maximum(end - 1, 0), bm) - first + 1, i32(0))
        hit = (tid >= count) & (tid < count + tiles)
        group = lax.select(hit, i32(i), group)
        blk = lax.select(hit, first + tid - count, blk)
        g_start = lax.select(hit, start, g_start)
        g_end = lax.select(hit, end, g_end)
        count = count + tiles
        start = end
    return group, blk, g_start, g_end, count


def _num_tiles(gs_ref, num_groups: int, m: int, block_m: int):
    return _tile_of(gs_ref, num_groups, m, block_m, jnp.int32(-1))[-1]


def _build_kernel(m: int, n: int, k: int, g: int, out_dtype, config: GmmConfig, interpret: bool):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    wg_m, block_m, block_n, sub_n, wg_n = config.wg_m, config.block_m, config.block_n, config.sub_n, config.wg_n
    split_m = config.split == "m"
    k_steps = k // BLOCK
    grid_n = n // block_n
    n_sub = wg_n // sub_n
    sub_per_block = BLOCK // sub_n  # sub tiles sharing one 128-column weight scale
    fp8_swizzle = plgpu.find_swizzle(BLOCK * 8, "fp8 tile")
    fp8_transforms = (plgpu.TilingTransform((8, fp8_swizzle)), plgpu.SwizzleTransform(fp8_swizzle))
    acc_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(gs_ref, x_ref, xs_ref, w_ref, ws_ref, o_ref):
        wg = lax.axis_index("wg")
        is_compute = wg < NUM_COMPUTE_WGS

        def make_pipeline(group, blk, ni, compute_context, mma_body):
            return plgpu.emit_pipeline_warp_specialized(
                mma_body,
                grid=(k_steps,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((block_m, BLOCK), lambda kk: (blk, kk), transforms=fp8_transforms),
                    plgpu.BlockSpec((block_n, BLOCK), lambda kk: (ni, kk), transforms=fp8_transforms),
                    plgpu.BlockSpec((1, block_m), lambda kk: (kk, blk)),
                ],
                wg_axis="wg",
                num_compute_wgs=NUM_COMPUTE_WGS,
                max_concurrent_steps=min(config.stages, k_steps),
                compute_context=compute_context,
            )

        def ignore(*_, **__):
            return None

        allocs = make_pipeline(0, 0, 0, ignore, ignore).get_allocations(x_ref, w_ref.at[0], xs_ref)

        def scope(pipeline_allocs, o_smem):
            num_tiles = _num_tiles(gs_ref, g, m, block_m)

            @plgpu.nd_loop((num_tiles * grid_n,), collective_axes="sm")
            def _tile_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (num_tiles, grid_n), config.grid_minor_dim, config.grid_tile_width)
                group, blk, g_start, g_end = _tile_of(gs_ref, g, m, block_m, mi)[:4]
                # this warpgroup's rows and columns of the CTA tile: its own rows ("m") or its own columns ("n")
                row_off = wg * wg_m if split_m else 0
                col_off = 0 if split_m else wg * wg_n
                # rows of this warpgroup that belong to the group, relative to the warpgroup's first row
                wg_row0 = blk * block_m + row_off
                lo = jnp.clip(g_start - wg_row0, 0, wg_m)
                hi = jnp.clip(g_end - wg_row0, 0, wg_m)

                def store(accs):
                    out = o_smem.at[wg]
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read o_smem
                    for j, a in enumerate(accs):
                        out[:, pl.ds(j * sub_n, sub_n)] = a.astype(out.dtype)
                    plgpu.commit_smem()
                    # TMA boxes have static shapes: store [lo, hi) as a ladder of power-of-two row slabs.
                    start = lo
                    count = hi - lo
                    size = wg_m
                    while size >= 1:

                        @pl.when((count & size) != 0)
                        def _(start=start, size=size):
                            plgpu.copy_smem_to_gmem(
                                out.at[pl.ds(start, size)],
                                o_ref.at[pl.ds(wg_row0 + start, size), pl.ds(ni * block_n + col_off, wg_n)],
                            )

                        start = start + (count & size)
                        size //= 2

                def compute_context(run):
                    zero = plgpu.layout_cast(jnp.zeros((wg_m, sub_n), f32), acc_layout)
                    store(run(tuple(zero for _ in range(n_sub))))

                def mma_body(idxs, x_smem, w_smem, xs_smem, accs):
                    (kk,) = idxs
                    scale_col0 = ni * (block_n // BLOCK) + col_off // BLOCK
                    w_sc = [ws_ref[group, scale_col0 + j, kk] for j in range(wg_n // BLOCK)]
                    x_sc = plgpu.load(xs_smem.at[0, pl.ds(row_off, wg_m)], layout=row_layout)
                    x_rows = x_smem.at[pl.ds(row_off, wg_m)]
                    new = []
                    for j in range(n_sub):

                        def mma(acc_ref, j=j):
                            plgpu.wgmma(acc_ref, x_rows, w_smem.at[pl.ds(col_off + j * sub_n, sub_n)].T)
                            return acc_ref[...]

                        part = pl.run_scoped(mma, plgpu.ACC((wg_m, sub_n), f32))
                        scale = lax.broadcast_in_dim(x_sc * w_sc[j // sub_per_block], (wg_m, sub_n), [0])
                        new.append(accs[j] + part * scale)
                    return tuple(new)

                @pl.when(group < g)
                def _compute():
                    make_pipeline(group, blk, ni, compute_context, mma_body)(
                        x_ref, w_ref.at[group], xs_ref, allocations=pipeline_allocs
                    )

                @pl.when((group == g) & is_compute)
                def _zero_tail():
                    zero = plgpu.layout_cast(jnp.zeros((wg_m, sub_n), f32), acc_layout)
                    store([zero] * n_sub)

            @pl.when(is_compute)
            def _():
                plgpu.wait_smem_to_gmem(0)

        pl.run_scoped(
            scope,
            pipeline_allocs=allocs,
            o_smem=plgpu.SMEM((NUM_COMPUTE_WGS, wg_m, wg_n), out_dtype),
            collective_axes="wg",
        )

    threads = NUM_COMPUTE_WGS + 1  # (the compute warpgroups and a TMA producer)
    kwargs = {"interpret": interpret_params(threads, "FP8 grouped GEMM")} if interpret else {}
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(config.num_sms,),
        grid_names=("sm",),
        num_threads=threads,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        **kwargs,
    )


def fp8_grouped_matmul_kernel(
    x_q: jax.Array,
    x_scale_t: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    config: GmmConfig = DEFAULT_CONFIG,
    interpret: bool = False,
) -> jax.Array:
    """The Mosaic GPU kernel. ``x_scale_t`` is the activation scale in the kernel's layout ``[ceil(K/128), M]``.

    Needs K a multiple of 128 and N a multiple of ``config.block_n`` (raises ValueError otherwise);
    ``interpret=True`` runs it in the Mosaic GPU interpreter on the CPU.
    """
    _check_operands(x_q, x_scale_t, w_q, w_scale, group_sizes, x_scale_transposed=True)
    out_dtype = jnp.dtype(out_dtype)
    if out_dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(f32)):
        raise ValueError(f"out_dtype must be bfloat16 or float32, got {out_dtype}")
    config.validate(out_dtype)
    m, k = x_q.shape
    g, n, _ = w_q.shape
    if reason := kernel_supports(m, n, k, config):
        raise ValueError(f"fp8_grouped_matmul_kernel: {reason}")
    # The swizzled TMA tiles of x need M a multiple of 8 (and the scale rows 16-byte strides): pad with rows that
    # belong to no group (written as zeros, sliced off). The expert FFN pads its sorted rows itself, for free.
    pad_m = (-m) % ROW_ALIGN
    if pad_m:
        x_q = jnp.pad(x_q, ((0, pad_m), (0, 0)))
        x_scale_t = jnp.pad(x_scale_t, ((0, 0), (0, pad_m)))
    fn = _build_kernel(m + pad_m, n, k, g, out_dtype, config, interpret)
    out = fn(group_sizes.astype(jnp.int32), x_q, x_scale_t, w_q, w_scale)
    return out[:m] if pad_m else out


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------


@functools.cache
def on_hopper() -> bool:
    """True when the default backend is a CUDA GPU of compute capability 9.x (wgmma)."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:
        return False
    if dev.platform != "gpu":
        return False
    cc = str(getattr(dev, "compute_capability", ""))
    return cc.startswith("9.")


def _resolve(impl: Impl, m: int, n: int, k: int, config: GmmConfig) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if not on_hopper():
        return "reference"
    if reason := kernel_supports(m, n, k, config):
        logger.info("fp8_grouped_matmul: using the reference path for [%d, %d] x [%d, %d]: %s", m, k, n, k, reason)
        return "reference"
    return "kernel"


def fp8_grouped_matmul(
    x_q: jax.Array,
    x_scale: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    group_sizes: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    impl: Impl = "auto",
    config: GmmConfig | None = None,
    x_scale_transposed: bool = False,
) -> jax.Array:
    """Block-scaled FP8 grouped matmul ``[M, K] x [G, N, K] -> [M, N]`` (see the module docstring).

    ``impl``: "auto" = the Mosaic GPU kernel on Hopper for supported shapes, else the pure-JAX reference;
    "kernel" / "interpret" / "reference" force one. ``x_scale`` is ``[M, ceil(K/128)]``, or ``[ceil(K/128), M]``
    with ``x_scale_transposed`` (what :func:`quantize_rows` emits with ``transposed_scale=True``).
    """
    config = config or pick_config(x_q.shape[0], w_q.shape[1])
    m, k = x_q.shape
    path = _resolve(impl, m, w_q.shape[1], k, config)
    if path == "reference":
        xs = x_scale.T if x_scale_transposed else x_scale
        return fp8_grouped_matmul_reference(x_q, xs, w_q, w_scale, group_sizes, out_dtype=out_dtype)
    xs_t = x_scale if x_scale_transposed else x_scale.T
    return fp8_grouped_matmul_kernel(
        x_q, xs_t, w_q, w_scale, group_sizes, out_dtype=out_dtype, config=config, interpret=path == "interpret"
    )


def pick_config(m: int, n: int) -> GmmConfig:
    """Default tiling: 128 x 128 CTA tiles, 4 TMA stages (to be tuned on the H200 with the benchmark)."""
    del m
    if n % DEFAULT_CONFIG.block_n:
        return dataclasses.replace(DEFAULT_CONFIG, block_n=BLOCK)
    return DEFAULT_CONFIG


# ----------------------------------------------------------------------------------------------------------------
# FFN building blocks
# ----------------------------------------------------------------------------------------------------------------


def fp8_linear(
    x: jax.Array,
    w_q: jax.Array,
    w_scale: jax.Array,
    *,
    out_dtype=jnp.bfloat16,
    impl: Impl = "auto",
    config: GmmConfig | None = None,
) -> jax.Array:
    """``x [..., K] @ dequant(w_q [N, K], w_scale)^T`` with per-token-group FP8 activations (one-group GEMM)."""
    if w_q.ndim != 2:
        raise ValueError(f"fp8_linear expects w_q [N, K], got shape {tuple(w_q.shape)}")
    lead = x.shape[:-1]
    xq, xs = quantize_rows(x.reshape(-1, x.shape[-1]), transposed_scale=True)
    gs = jnp.array([xq.shape[0]], jnp.int32)
    out = fp8_grouped_matmul(
        xq, xs, w_q[None], w_scale[None], gs, out_dtype=out_dtype, impl=impl, config=config, x_scale_transposed=True
    )
    return out.reshape(*lead, w_q.shape[0])


def fp8_mlp(
    x, gate_q, gate_s, up_q, up_s, down_q, down_s, *, impl: Impl = "auto", config: GmmConfig | None = None
) -> jax.Array:
    """Dense SwiGLU ``down(silu(gate(x)) * up(x))`` on FP8 weights in HF layout ([F, D], [F, D], [D, F]);
    returns x.dtype. Used for the dense layers and the shared expert."""
    g = fp8_linear(x, gate_q, gate_s, impl=impl, config=config)
    u = fp8_linear(x, up_q, up_s, impl=impl, config=config)
    h = jax.nn.silu(g.astype(f32)) * u.astype(f32)
    return fp8_linear(h, down_q, down_s, impl=impl, config=config).astype(x.dtype)


def fuse_gate_up(gate_q, gate_s, up_q, up_s) -> tuple[jax.Array, jax.Array]:
    """Concatenate gate and up weights along N (``[E, 2F, D]``) for the one-GEMM gate|up path; do it once at load.

    Needs F a multiple of 128 so the 128 x 128 scale blocks do not straddle the gate / up boundary.
    """
    if gate_q.shape != up_q.shape or gate_s.shape != up_s.shape:
        raise ValueError(f"gate and up weights differ in shape: {gate_q.shape} / {up_q.shape}")
    f = gate_q.shape[-2]
    if f % BLOCK:
        raise ValueError(f"fuse_gate_up needs the FFN width F={f} to be a multiple of {BLOCK}")
    return jnp.concatenate([gate_q, up_q], axis=-2), jnp.concatenate([gate_s, up_s], axis=-2)


def _check_ffn(x, weights, ids, e: int, d: int):
    if x.ndim != 2 or x.shape[-1] != d:
        raise ValueError(f"x must be [N, D] with D={d} (from the expert weights), got shape {tuple(x.shape)}")
    if ids.ndim != 2 or ids.shape[0] != x.shape[0] or weights.shape != ids.shape:
        raise ValueError(
            f"weights and ids must both be [N, C] with N={x.shape[0]}, got {tuple(weights.shape)} / {tuple(ids.shape)}"
        )


def fp8_expert_ffn_fused(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    gate_up_q: jax.Array,
    gate_up_s: jax.Array,
    down_q: jax.Array,
    down_s: jax.Array,
    *,
    first_expert: int = 0,
    out_dtype=f32,
    impl: Impl = "auto",
    config: GmmConfig | None = None,
) -> jax.Array:
    """Routed experts on FP8 weights with gate|up fused into one grouped GEMM (see :func:`fuse_gate_up`).

    x [N, D]; weights, ids [N, C] (top-k routing, not renormalised here); gate_up_q [E_l, 2F, D], gate_up_s
    [E_l, 2F/128, D/128]; down_q [E_l, D, F], down_s [E_l, D/128, F/128] for experts ``first_expert ..
    first_expert + E_l - 1``. Returns ``sum_c weights[:, c] * Expert_{ids[:, c]}(x)`` as [N, D] ``out_dtype``.
    """
    e, f2, d = gate_up_q.shape
    f = f2 // 2
    _check_ffn(x, weights, ids, e, d)
    if tuple(down_q.shape) != (e, d, f):
        raise ValueError(f"down_q must be [E, D, F] = {(e, d, f)}, got {tuple(down_q.shape)}")
    order, token, is_local, gs = sort_pairs(ids, e, first_expert, ROW_ALIGN)
    with jax.named_scope("fp8_experts"):
        xq, xs = quantize_rows(x, token, transposed_scale=True)
        gu = fp8_grouped_matmul(xq, xs, gate_up_q, gate_up_s, gs, impl=impl, config=config, x_scale_transposed=True)
        h = jax.nn.silu(gu[:, :f].astype(f32)) * gu[:, f:].astype(f32)
        return _down_and_combine(x, h, weights, order, token, is_local, gs, down_q, down_s, out_dtype, impl, config)


def _down_and_combine(x, h, weights, order, token, is_local, gs, down_q, down_s, out_dtype, impl, config):
    hq, hs = quantize_rows(h, transposed_scale=True)
    y = fp8_grouped_matmul(hq, hs, down_q, down_s, gs, impl=impl, config=config, x_scale_transposed=True)  # [A, D] bf16
    w = jnp.where(is_local, weights.reshape(-1)[order], 0.0).astype(f32)  # is_local is already in sorted order
    y = jnp.where(is_local[:, None], y.astype(f32) * w[:, None], 0.0)
    return jnp.zeros(x.shape, f32).at[token].add(y).astype(out_dtype)


def fp8_expert_ffn(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    gate_q: jax.Array,
    gate_s: jax.Array,
    up_q: jax.Array,
    up_s: jax.Array,
    down_q: jax.Array,
    down_s: jax.Array,
    *,
    first_expert: int = 0,
    out_dtype=f32,
    impl: Impl = "auto",
    config: GmmConfig | None = None,
) -> jax.Array:
    """Routed experts on FP8 weights in HF layout, same semantics as :func:`step3_jax.model.grouped_experts`.

    x [N, D]; weights, ids [N, C]; gate_q, up_q [E_l, F, D] float8_e4m3fn with scales [E_l, F/128, D/128];
    down_q [E_l, D, F] with down_s [E_l, D/128, F/128]. The activations are quantised once and gate and up run as
    two grouped GEMMs (no per-call weight copy); with weights fused at load time use :func:`fp8_expert_ffn_fused`.
    Returns [N, D] ``out_dtype`` (float32 by default, like ``grouped_experts``).
    """
    e, f, d = gate_q.shape
    _check_ffn(x, weights, ids, e, d)
    for name, arr, want in (("up_q", up_q, (e, f, d)), ("down_q", down_q, (e, d, f))):
        if tuple(arr.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(arr.shape)}")
    order, token, is_local, gs = sort_pairs(ids, e, first_expert, ROW_ALIGN)
    with jax.named_scope("fp8_experts"):
        xq, xs = quantize_rows(x, token, transposed_scale=True)
        g = fp8_grouped_matmul(xq, xs, gate_q, gate_s, gs, impl=impl, config=config, x_scale_transposed=True)
        u = fp8_grouped_matmul(xq, xs, up_q, up_s, gs, impl=impl, config=config, x_scale_transposed=True)
        h = jax.nn.silu(g.astype(f32)) * u.astype(f32)
        return _down_and_combine(x, h, weights, order, token, is_local, gs, down_q, down_s, out_dtype, impl, config)


def flops(group_sizes, n: int, k: int) -> int:
    """Useful FLOPs of one grouped GEMM: 2 * rows * N * K."""
    return 2 * int(sum(int(s) for s in group_sizes)) * n * k


__all__ = [
    "DEFAULT_CONFIG",
    "GmmConfig",
    "fp8_expert_ffn",
    "fp8_expert_ffn_fused",
    "fp8_grouped_matmul",
    "fp8_grouped_matmul_kernel",
    "fp8_grouped_matmul_reference",
    "fp8_linear",
    "fp8_mlp",
    "fuse_gate_up",
    "kernel_supports",
    "on_hopper",
    "pick_config",
    "quantize_rows",
]
