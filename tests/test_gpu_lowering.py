"""The GPU decode path of one whole Step-3 MFA layer lowers for CUDA on the CPU: at issue #6's shape (batch 64,
8K context, FP8 projections, BF16 or FP8 KV over 64-token pages) the layer's five projections go through the FP8
GEMM kernel and its attention through the MFA decode kernel, so layout, TMA and shared-memory errors of the
kernels *as the model calls them* show up without a GPU. Abstract weights: nothing of the 321B model is allocated."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from step3_jax import kv_cache as kvc
from step3_jax.config import get_preset
from step3_jax.model import abstract_model, use_fp8_gemm

S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("kv_dtype", [jnp.bfloat16, jnp.float8_e4m3fn], ids=["bf16_kv", "fp8_kv"])
def test_step3_mfa_decode_layer_lowers_for_cuda_through_both_kernels(monkeypatch, kv_dtype):
    config = dataclasses.replace(get_preset("step3"), num_hidden_layers=1, moe_layers_enum=(), quantization="fp8")
    graphdef, state = nnx.split(abstract_model(config).layers[0])
    batch, context, page = 64, 8192, 64
    pages = batch * context // page
    fp8_kv = kv_dtype == jnp.float8_e4m3fn
    scale = S((pages, page, 1), jnp.float32) if fp8_kv else None
    kv = kvc.PagedLayer(
        S((pages, page, 1, config.head_dim), kv_dtype),
        S((pages, page, 1, config.head_dim), kv_dtype),
        scale,
        scale,
        S((batch, context // page), jnp.int32),
    )
    x, pos = S((batch, 1, config.hidden_size), jnp.bfloat16), S((batch, 1), jnp.int32)

    def decode_attention(state, x, pos, kv):
        h, _, kv = nnx.merge(graphdef, state).attention(x, pos, kv, pos[:, 0])
        return h, kv

    # the decode dispatcher picks its kernel on a GPU backend; the FP8 GEMM path is forced to the kernel
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    with use_fp8_gemm("kernel"):
        text = jax.jit(decode_attention).trace(state, x, pos, kv).lower(lowering_platforms=("cuda",)).as_text()
    kernels = re.findall(r"stablehlo\.custom_call @mosaic_gpu\w*", text)
    assert len(kernels) == 6  # q_proj, wq, k_proj, v_proj, o_proj + the MFA decode kernel
