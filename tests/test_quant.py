import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.fp8_gmm import GmmConfig
from step3_jax import create_model, get_preset
from step3_jax.model import _weight_value, abstract_model, count_params, use_fp8_gemm
from step3_jax.quant import (
    FP8_DTYPE,
    Fp8Weight,
    dequantize_activations,
    dequantize_blockwise,
    fake_quantize_activations,
    quantize_activations,
    quantize_blockwise,
)


def normal(seed, shape):
    """Standard normal float32 test inputs drawn with numpy (no per-shape compilation of jax.random on the CPU)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32))


@pytest.mark.parametrize("shape", [(256, 384), (200, 130), (3, 130, 257), (5, 17)])
def test_block_quantisation_round_trip(shape):
    w = normal(0, shape) * jnp.linspace(0.01, 3.0, shape[-1])
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
    x = normal(1, (4, 300)) * jnp.arange(1, 5)[:, None]
    q, s = quantize_activations(x)
    assert q.shape == x.shape and s.shape == (4, 3)
    back = dequantize_activations(q, s)
    assert np.linalg.norm(back - x) / np.linalg.norm(x) < 0.04
    np.testing.assert_allclose(s[:, 0], np.abs(np.asarray(x[:, :128])).max(-1) / 448.0, rtol=1e-6)


def test_fake_quantisation_is_straight_through():
    """Forward: the FP8 round trip; gradient: the identity (training through FP8 GEMMs, e.g. LoRA on FP8 weights)."""
    x = normal(2, (3, 200))
    np.testing.assert_array_equal(fake_quantize_activations(x), dequantize_activations(*quantize_activations(x)))
    w = normal(3, (3, 200))
    np.testing.assert_array_equal(jax.grad(lambda x: jnp.sum(fake_quantize_activations(x) * w))(x), w)


# ---------------------------------------------------------------------- the FP8 model (quantization="fp8")

ATTN_PROJ = ("q_proj", "wq", "k_proj", "v_proj", "o_proj")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def float_and_fp8(test_config):
    """The float32 test model and its FP8 twin from the same seed (same random draw, block-quantised)."""
    return create_model(test_config, seed=0), create_model(dataclasses.replace(test_config, quantization="fp8"), seed=0)


def test_fp8_model_keeps_attention_projections_in_the_checkpoint_format(test_config, float_and_fp8):
    c = dataclasses.replace(test_config, quantization="fp8")
    d, q, hk, gk = c.hidden_size, c.share_q_dim, c.num_attention_heads * c.head_dim, c.num_kv_heads * c.head_dim
    hf_shapes = {"q_proj": (q, d), "wq": (hk, q), "k_proj": (gk, d), "v_proj": (gk, d), "o_proj": (d, hk)}
    attn = abstract_model(c).layers[0].self_attn
    for name, shape in hf_shapes.items():
        w, s = getattr(attn, name), getattr(attn, name + "_scale_inv")
        assert w.dtype == FP8_DTYPE and w.shape == shape, name
        assert s.dtype == jnp.float32 and s.shape == tuple(-(-n // 128) for n in shape), name
    assert attn.inter_norm.weight.dtype == jnp.float32  # the norm between q_proj and wq stays float
    # HF layout, logical axes of the plain weight: wq's [H*K] rows and o_proj's [H*K] columns split by heads
    assert attn.wq.get_metadata()["logical_axes"] == ("heads", "q_rank")
    assert attn.o_proj.get_metadata()["logical_axes"] == ("embed", "heads")
    assert count_params(c) == count_params(test_config)  # scales are not parameters
    # same seed, same weights: each FP8 projection is the block quantisation of the float model's, bit for bit
    plain, fp8 = (m.layers[2].self_attn for m in float_and_fp8)
    for name in ATTN_PROJ:
        w = getattr(plain, name).get_value()  # JAX layout [in..., out...]
        w = w.reshape(hk, d) if name == "o_proj" else w.reshape(w.shape[0], -1)
        want_q, want_s = quantize_blockwise(w.T)  # HF [out, in]
        value = _weight_value(fp8, name)
        assert isinstance(value, Fp8Weight)
        np.testing.assert_array_equal(np.asarray(value.q).view(np.uint8), np.asarray(want_q).view(np.uint8))
        np.testing.assert_allclose(value.scale_inv, want_s, rtol=1e-6)  # amax / 448, to the last bit or so


def test_fp8_model_stays_close_to_the_float_model(test_config, float_and_fp8):
    """Every GEMM of the FP8 model (attention projections, dense FFN, shared and routed experts) rounds its
    activations per token and 128 channels and its weights per 128 x 128 block to e4m3 (3 mantissa bits, ~2.5% rms
    per rounding); over 3 layers of 5 attention + 3 FFN GEMMs the logits move by about 8-10% (rms) on this model.
    The bound is that with a margin; a wrong layout or scale gives ~100%. The greedy token can only change where
    the float model's top-2 margin is comparable to the FP8 error of a logit difference (~0.13 rms here): wherever
    the margin exceeds 5 times that error, the FP8 model's greedy token is the same."""
    ids = jnp.asarray(np.random.default_rng(1).integers(3, test_config.vocab_size, (16, 24)), jnp.int32)
    want, got = (np.asarray(nnx.jit(lambda m, ids: m(ids))(m, ids)) for m in float_and_fp8)
    assert _rel(got, want) < 0.12, _rel(got, want)
    err = got - want
    top = np.argmax(want, axis=-1)[..., None]
    sigma = float(np.std(err - np.take_along_axis(err, top, axis=-1)))  # error of (other logit - top logit)
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 5 * sigma
    assert clear.mean() > 0.05, (sigma, clear.mean())
    np.testing.assert_array_equal(np.argmax(got, -1)[clear], np.argmax(want, -1)[clear])


def test_fp8_attention_through_the_gemm_kernel_equals_the_reference_path(monkeypatch):
    """An FP8 attention layer (q_proj, wq, k_proj, v_proj, o_proj) through the FP8 grouped-GEMM kernel (interpret
    mode standing in for the GPU) equals its pure-JAX path: the wiring the GPU backend uses by default."""
    import pallas_kernels.fp8_gmm as gmm

    config = dataclasses.replace(  # every projection a multiple of 128 wide, as the kernel needs
        get_preset("test"),
        hidden_size=128,
        share_q_dim=128,
        num_attention_heads=2,
        head_dim=128,
        num_hidden_layers=1,
        moe_layers_enum=(),
        intermediate_size=128,
        quantization="fp8",
    )
    layer = create_model(config, seed=3).layers[0]
    x = normal(0, (2, 6, 128)).astype(jnp.bfloat16)
    pos = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    graphdef, state = nnx.split(layer)
    calls = []
    kernel = gmm.fp8_grouped_matmul_kernel
    monkeypatch.setattr(
        gmm, "fp8_grouped_matmul_kernel", lambda *a, **k: calls.append(k["interpret"]) or kernel(*a, **k)
    )

    def attention(state, x):
        h, normed, _ = nnx.merge(graphdef, state).attention(x, pos)
        return h, normed

    # the path is chosen at trace time: a fresh function object per setting, so no trace is reused
    ref = jax.jit(lambda s, x: attention(s, x))(state, x)
    assert calls == []  # on the CPU the pure-JAX path is the default
    with use_fp8_gemm("interpret", GmmConfig(num_sms=3)):
        got = jax.jit(lambda s, x: attention(s, x))(state, x)
    assert calls == [True] * 5  # q_proj, wq, k_proj, v_proj, o_proj
    assert got[0].dtype == ref[0].dtype == jnp.bfloat16  # output dtypes as in the float model
    assert np.linalg.norm(np.asarray(ref[0] - x, np.float32)) > 0
    for g, r in zip(got, ref, strict=True):
        assert _rel(g, r) < 1e-2
