"""Block-scaled FP8 grouped GEMM: reference vs dequantise-then-matmul, the Mosaic GPU kernel in interpret mode vs the
reference, CUDA lowering of the kernel at the Step-3 expert shapes, and the FP8 expert FFN vs the BF16 model path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.bench_fp8_gmm import GPU_CONFIGS
from pallas_kernels.fp8_gmm import (
    DEFAULT_CONFIG,
    SMEM_BYTES,
    GmmConfig,
    fp8_expert_ffn,
    fp8_expert_ffn_fused,
    fp8_grouped_matmul,
    fp8_grouped_matmul_kernel,
    fp8_grouped_matmul_reference,
    fp8_mlp,
    fuse_gate_up,
    kernel_supports,
    quantize_rows,
)
from step3_jax.model import grouped_experts
from step3_jax.quant import (
    FP8_DTYPE,
    dequantize_activations,
    dequantize_blockwise,
    quantize_activations,
    quantize_blockwise,
)

# Interpret mode simulates every SM of the grid: a few SMs keep it fast and still exercise the persistent loop.
SMALL = GmmConfig(num_sms=3)


def _operands(m, k, n, group_sizes, seed=0):
    rng = np.random.default_rng(seed)  # numpy draws: no per-shape compilation of jax.random on the CPU
    x = rng.standard_normal((m, k), np.float32) * np.linspace(0.1, 4.0, k, dtype=np.float32)  # channel ranges differ
    w = rng.standard_normal((len(group_sizes), n, k), np.float32) * 0.05
    w = w * np.exp(rng.standard_normal((len(group_sizes), 1, k), np.float32))  # per-block scales differ along K
    xq, xs = quantize_activations(jnp.asarray(x))
    wq, ws = quantize_blockwise(jnp.asarray(w))
    return xq, xs, wq, ws, jnp.array(group_sizes, jnp.int32)


def _dequant_matmul(xq, xs, wq, ws, group_sizes):
    """The plain definition: dequantise both operands, matmul each group's rows with its weights (numpy, f64)."""
    xd = np.asarray(dequantize_activations(xq, xs), np.float64)
    wd = np.asarray(dequantize_blockwise(wq, ws), np.float64)
    out = np.zeros((xd.shape[0], wd.shape[1]))
    start = 0
    for g, size in enumerate(np.asarray(group_sizes)):
        out[start : start + size] = xd[start : start + size] @ wd[g].T
        start += size
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
    "m,k,n,groups",
    [
        (200, 256, 256, [70, 0, 5, 100]),  # empty group, group smaller than a tile, rows past the groups
        (96, 384, 128, [0, 0, 96]),
        (50, 300, 200, [20, 30]),  # K and N not multiples of 128: partial edge blocks
    ],
)
def test_reference_equals_dequantise_then_matmul(m, k, n, groups):
    xq, xs, wq, ws, gs = _operands(m, k, n, groups)
    out = fp8_grouped_matmul_reference(xq, xs, wq, ws, gs, out_dtype=jnp.float32)
    want = _dequant_matmul(xq, xs, wq, ws, gs)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.all(np.asarray(out)[sum(groups) :] == 0)


@pytest.mark.parametrize(
    "m,k,n,groups,config",
    [
        # uneven groups: an empty one, one smaller than a tile, one straddling two row tiles, rows past the groups
        (200, 256, 256, [70, 0, 5, 100], SMALL),
        # empty first and last groups, M not a multiple of 4 (the scale rows are padded for TMA)
        (131, 384, 128, [0, 64, 60, 0], GmmConfig(num_sms=2, stages=2)),
        # 128-row warpgroups with two 64-wide partials, and a 256-wide N tile walked along N
        (150, 256, 256, [3, 0, 60, 80], GmmConfig(num_sms=4, wg_m=128, sub_n=64, stages=2)),
        (150, 384, 512, [40, 110], GmmConfig(num_sms=3, block_n=256, stages=3, grid_minor_dim=1, grid_tile_width=2)),
        # the warpgroups side by side (64 rows, each its own 128 of 256 columns): the same group cuts and zero rows
        (150, 256, 512, [3, 0, 60, 80], GmmConfig(num_sms=3, block_n=256, split="n", stages=2)),
    ],
)
def test_interpret_kernel_equals_reference(m, k, n, groups, config):
    xq, xs, wq, ws, gs = _operands(m, k, n, groups, seed=len(groups))
    ref = np.asarray(fp8_grouped_matmul_reference(xq, xs, wq, ws, gs, out_dtype=jnp.float32))
    out = fp8_grouped_matmul(xq, xs, wq, ws, gs, impl="interpret", config=config)
    assert out.dtype == jnp.bfloat16 and out.shape == (m, n)
    out = np.asarray(out, np.float32)
    # BF16 output: one rounding of the f32 accumulator
    np.testing.assert_allclose(out, ref, rtol=2**-8, atol=1e-3 * np.abs(ref).max())
    assert np.all(out[sum(groups) :] == 0), "rows past sum(group_sizes) must be zero"
    assert _rel(out, _dequant_matmul(xq, xs, wq, ws, gs)) < 2e-3


def test_interpret_kernel_float32_output_and_transposed_scales():
    xq, xs, wq, ws, gs = _operands(72, 256, 128, [30, 42], seed=3)
    out = fp8_grouped_matmul_kernel(xq, xs.T, wq, ws, gs, out_dtype=jnp.float32, config=SMALL, interpret=True)
    ref = fp8_grouped_matmul_reference(xq, xs, wq, ws, gs, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))


def test_unsupported_shapes_and_bad_arguments_raise_clearly():
    xq, xs, wq, ws, gs = _operands(40, 300, 128, [40])
    with pytest.raises(ValueError, match="K=300 is not a multiple of 128"):
        fp8_grouped_matmul(xq, xs, wq, ws, gs, impl="kernel")
    assert kernel_supports(40, 200, 256) is not None and kernel_supports(40, 256, 256) is None
    # "auto" on the CPU (and on a GPU for shapes the kernel does not take) is the reference
    np.testing.assert_array_equal(
        np.asarray(fp8_grouped_matmul(xq, xs, wq, ws, gs), np.float32),
        np.asarray(fp8_grouped_matmul_reference(xq, xs, wq, ws, gs), np.float32),
    )
    with pytest.raises(ValueError, match=r"w_scale must have shape \(1, 1, 3\)"):
        fp8_grouped_matmul_reference(xq, xs, wq, ws[:, :, :2], gs)
    with pytest.raises(ValueError, match="x_q must be float8_e4m3fn"):
        fp8_grouped_matmul_reference(xq.astype(jnp.bfloat16), xs, wq, ws, gs)
    with pytest.raises(ValueError, match=r"group_sizes must have shape \(1,\)"):
        fp8_grouped_matmul_reference(xq, xs, wq, ws, jnp.array([20, 20]))
    with pytest.raises(ValueError, match="impl must be one of"):
        fp8_grouped_matmul(xq, xs, wq, ws, gs, impl="triton")
    with pytest.raises(ValueError, match="shared memory"):
        GmmConfig(block_n=256, stages=6).validate()
    with pytest.raises(ValueError, match="registers"):
        GmmConfig(wg_m=128, block_n=256).validate()
    with pytest.raises(ValueError, match="multiple of 256 with split='n'"):
        GmmConfig(split="n").validate()  # each warpgroup would hold half a 128-column scale block
    with pytest.raises(ValueError, match="split must be 'm'"):
        GmmConfig(split="k").validate()


def test_quantize_rows_matches_quant_format():
    x = jnp.asarray(np.random.default_rng(5).standard_normal((9, 300), np.float32), jnp.bfloat16)
    rows = jnp.array([3, 3, 0, 8])
    q, s = quantize_rows(x, rows)
    q_ref, s_ref = quantize_activations(x[rows])
    assert q.dtype == FP8_DTYPE and q.shape == (4, 300) and s.shape == (4, 3)
    np.testing.assert_array_equal(np.asarray(q, np.float32), np.asarray(q_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s_ref))
    _, s_t = quantize_rows(x, rows, transposed_scale=True)
    np.testing.assert_array_equal(np.asarray(s_t), np.asarray(s).T)


def _cuda_lowering(m, k, n, groups=48, config=DEFAULT_CONFIG, out_dtype=jnp.bfloat16):
    args = [
        jax.ShapeDtypeStruct((m, k), FP8_DTYPE),
        jax.ShapeDtypeStruct((k // 128, m), jnp.float32),
        jax.ShapeDtypeStruct((groups, n, k), FP8_DTYPE),
        jax.ShapeDtypeStruct((groups, n // 128, k // 128), jnp.float32),
        jax.ShapeDtypeStruct((groups,), jnp.int32),
    ]

    def f(xq, xs, wq, ws, gs):
        return fp8_grouped_matmul_kernel(xq, xs, wq, ws, gs, config=config, out_dtype=out_dtype)

    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("rows", [12288, 768])
@pytest.mark.parametrize(
    "k,n",
    [(7168, 5120), (7168, 10240), (5120, 7168)],  # gate or up, fused gate|up, down
)
def test_cuda_lowering_at_step3_expert_shapes(rows, k, n):
    # Runs the Mosaic GPU lowering and verifier (wgmma operand layouts, TMA, shared-memory budget) on the CPU.
    assert "mosaic_gpu" in _cuda_lowering(rows, k, n).as_text()


@pytest.mark.parametrize(
    "config",
    GPU_CONFIGS[1:],  # every tiling the H200 benchmark sweeps (the default is lowered above)
    ids=str,
)
def test_cuda_lowering_of_other_tilings(config):
    _cuda_lowering(12288, 7168, 10240, config=config)
    # an M that is not a multiple of 8 (padded by the wrapper) and float32 output where it fits in shared memory
    f32_fits = config.smem_bytes(jnp.float32) <= SMEM_BYTES
    _cuda_lowering(769, 5120, 7168, config=config, out_dtype=jnp.float32 if f32_fits else jnp.bfloat16)


def test_cuda_lowering_reports_the_fp8_transpose_rule():
    # the verifier is really on: FP8 wgmma with an N-major B operand must be refused (see docs/kernels.md)
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    tr = (plgpu.TilingTransform((8, 128)), plgpu.SwizzleTransform(128))

    def body(a_ref, b_ref, o_ref):
        def scoped(a_smem, b_smem, bar):
            plgpu.copy_gmem_to_smem(a_ref, a_smem, bar.at[0])
            plgpu.copy_gmem_to_smem(b_ref, b_smem, bar.at[1])
            plgpu.barrier_wait(bar.at[0])
            plgpu.barrier_wait(bar.at[1])
            o_ref[...] = pl.run_scoped(lambda r: (plgpu.wgmma(r, a_smem, b_smem), r[...])[1], plgpu.ACC((64, 128)))

        pl.run_scoped(
            scoped,
            plgpu.SMEM((64, 128), FP8_DTYPE, transforms=tr),
            plgpu.SMEM((128, 128), FP8_DTYPE, transforms=tr),  # [K, N]: N-major, as bf16 wgmma would allow
            plgpu.Barrier(num_barriers=2),
        )

    kern = plgpu.kernel(body, out_type=jax.ShapeDtypeStruct((64, 128), jnp.float32))
    args = [jax.ShapeDtypeStruct((64, 128), FP8_DTYPE), jax.ShapeDtypeStruct((128, 128), FP8_DTYPE)]
    with pytest.raises(Exception, match="Only f16 WGMMA supports transposes"):
        jax.jit(kern).trace(*args).lower(lowering_platforms=("cuda",))


# ------------------------------------------------------------------------------------------------------------------
# The expert FFN
# ------------------------------------------------------------------------------------------------------------------


def _moe_case(n_tok=24, d=256, f=128, e=5, c=2, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))  # noqa: E731
    x = normal(n_tok, d)
    gate = normal(e, d, f) * d**-0.5  # the model's layout [E, D, F]
    up = normal(e, d, f) * d**-0.5
    down = normal(e, f, d) * f**-0.5
    probs = jax.nn.softmax(normal(n_tok, e) * 2.0)
    weights, ids = jax.lax.top_k(probs, c)
    # HF layout [E, out, in], block-quantised
    q = [quantize_blockwise(w.transpose(0, 2, 1)) for w in (gate, up, down)]
    return x, weights, ids.astype(jnp.int32), (gate, up, down), q


def _emulated_fp8_ffn(x, weights, ids, q):
    """What the FP8 FFN computes, written out per expert in f32: FP8-rounded activations (x per token per 128
    channels; h after SiLU * up), dequantised weights, gate / up outputs rounded to BF16 as the GEMM stores them."""
    (gq, gs), (uq, us), (dq, ds) = q
    wg, wu, wd = (np.asarray(dequantize_blockwise(a, b)) for a, b in ((gq, gs), (uq, us), (dq, ds)))
    xd = np.asarray(dequantize_activations(*quantize_activations(x)))
    out = np.zeros(x.shape, np.float32)
    bf16 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    for e in range(wg.shape[0]):
        w_e = np.asarray(jnp.sum(jnp.where(ids == e, weights, 0.0), axis=-1))
        h = np.asarray(jax.nn.silu(bf16(xd @ wg[e].T))) * bf16(xd @ wu[e].T)
        hd = np.asarray(dequantize_activations(*quantize_activations(jnp.asarray(h))))
        out += w_e[:, None] * bf16(hd @ wd[e].T)
    return out


def test_fp8_expert_ffn_is_block_fp8_arithmetic_and_close_to_the_bf16_model():
    x, weights, ids, (gate, up, down), q = _moe_case()
    ((gq, gs), (uq, us), (dq, ds)) = q
    got = fp8_expert_ffn(x, weights, ids, gq, gs, uq, us, dq, ds)
    assert got.shape == x.shape and got.dtype == jnp.float32
    # exactly the block-FP8 arithmetic (up to f32 summation order and rare FP8 rounding-boundary flips)
    assert _rel(got, _emulated_fp8_ffn(x, weights, ids, q)) < 2e-3
    # against the BF16 model: e4m3 keeps 3 mantissa bits, so each FP8 rounding of an operand costs ~2.5% (rms);
    # x, h and the three weights are rounded here -> ~6.5% on Gaussian data, ~4.5% with the same (dequantised)
    # weights on both sides. The bound is that floor with a margin, not the 3e-2 (see docs/kernels.md).
    assert _rel(got, grouped_experts(x, weights, ids, gate, up, down)) < 8e-2
    deq = [dequantize_blockwise(a, b).transpose(0, 2, 1) for a, b in q]
    assert _rel(got, grouped_experts(x, weights, ids, *deq)) < 6e-2
    # one GEMM over the concatenated gate|up weights computes the same numbers as two
    fused = fp8_expert_ffn_fused(x, weights, ids, *fuse_gate_up(gq, gs, uq, us), dq, ds)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(got), rtol=1e-5, atol=1e-6)


def test_fp8_expert_ffn_local_experts_only():
    # experts 2..3 of 5 on this shard: pairs routed elsewhere contribute nothing (expert-parallel semantics)
    x, weights, ids, (gate, up, down), ((gq, gs), (uq, us), (dq, ds)) = _moe_case(seed=1)
    want = grouped_experts(x, weights, ids, gate[2:4], up[2:4], down[2:4], first_expert=2)
    got = fp8_expert_ffn(x, weights, ids, gq[2:4], gs[2:4], uq[2:4], us[2:4], dq[2:4], ds[2:4], first_expert=2)
    assert np.linalg.norm(want) > 0 and _rel(got, want) < 8e-2
    untouched = ~np.any((np.asarray(ids) >= 2) & (np.asarray(ids) < 4), axis=-1)
    assert untouched.any() and np.all(np.asarray(got)[untouched] == 0)


def test_fp8_expert_ffn_interpret_kernel_equals_reference_path():
    x, weights, ids, _, ((gq, gs), (uq, us), (dq, ds)) = _moe_case(n_tok=20, d=256, f=256, e=4, c=2, seed=2)
    gu_q, gu_s = fuse_gate_up(gq, gs, uq, us)
    x = x.astype(jnp.bfloat16)
    ref = fp8_expert_ffn_fused(x, weights, ids, gu_q, gu_s, dq, ds, impl="reference")
    got = fp8_expert_ffn_fused(x, weights, ids, gu_q, gu_s, dq, ds, impl="interpret", config=SMALL)
    assert _rel(got, ref) < 1e-2


def test_fp8_mlp_matches_dense_swiglu():
    rng = np.random.default_rng(7)
    d, f = 256, 384
    x = jnp.asarray(rng.standard_normal((3, 5, d), np.float32))
    gate, up = (jnp.asarray(rng.standard_normal((f, d), np.float32) * d**-0.5) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((d, f), np.float32) * f**-0.5)
    want = (jax.nn.silu(x @ gate.T) * (x @ up.T)) @ down.T
    got = fp8_mlp(x, *quantize_blockwise(gate), *quantize_blockwise(up), *quantize_blockwise(down))
    assert got.shape == x.shape
    assert _rel(got, want) < 8e-2


def test_model_fp8_layers_run_the_kernel_when_forced(monkeypatch):
    """The model's FP8 MoE layer (routed experts + shared expert) through the FP8 grouped-GEMM kernel (interpret
    mode standing in for the GPU) equals its pure-JAX path: the wiring the GPU backend uses by default."""
    import dataclasses

    from flax import nnx

    import pallas_kernels.fp8_gmm as gmm
    from step3_jax import create_model, get_preset
    from step3_jax.model import use_fp8_gemm

    config = dataclasses.replace(
        get_preset("test"),
        hidden_size=128,
        moe_intermediate_size=128,
        share_expert_dim=128,
        intermediate_size=128,
        moe_num_experts=4,
        num_hidden_layers=2,
        moe_layers_enum=(1,),
        quantization="fp8",
    )
    layer = create_model(config, seed=3).layers[1]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 128), np.float32), jnp.bfloat16)
    graphdef, state = nnx.split(layer)
    calls = []
    kernel = gmm.fp8_grouped_matmul_kernel
    monkeypatch.setattr(
        gmm, "fp8_grouped_matmul_kernel", lambda *a, **k: calls.append(k["interpret"]) or kernel(*a, **k)
    )

    def ffn(state, x):
        return nnx.merge(graphdef, state).ffn(x)

    # the path is chosen at trace time: a fresh function object per setting, so no trace is reused
    ref = jax.jit(lambda s, x: ffn(s, x))(state, x)
    assert calls == []  # on the CPU the pure-JAX path is the default
    with use_fp8_gemm("interpret", SMALL):
        got = jax.jit(lambda s, x: ffn(s, x))(state, x)
    assert calls == [True] * 6  # gate, up, down of the experts and of the shared expert
    assert np.linalg.norm(np.asarray(ref, np.float32)) > 0
    assert _rel(got, ref) < 1e-2
