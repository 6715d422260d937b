"""The GPU decode path of one whole Step-3 MFA layer lowers for CUDA on the CPU: at issue #6's shape (batch 64,
8K context, FP8 projections, BF16 or FP8 KV over 64-token pages) the layer's five projections go through the FP8
GEMM kernel and its attention through the MFA decode kernel, so layout, TMA and shared-memory errors of the
kernels *as the model calls them* show up without a GPU. On 8 fake devices the sharded layers lower with every
kernel inside ``shard_map`` on per-device shapes. Abstract weights: nothing of the 321B model is allocated."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from step3_jax import kv_cache as kvc
from step3_jax import make_mesh
from step3_jax.config import get_preset
from step3_jax.model import Step3ForCausalLM, abstract_model, param_shardings, use_fp8_gemm

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


def _kernels_inside_manual_computations(text: str) -> tuple[int, int]:
    """(kernel calls inside ``shard_map`` regions, kernel calls in all) of a StableHLO module's text."""
    inside = total = 0
    depth = 0
    for line in text.splitlines():
        if "sdy.manual_computation" in line:
            depth += 1
        calls = len(re.findall(r"stablehlo\.custom_call @mosaic_gpu", line))
        total += calls
        inside += calls if depth else 0
        if "sdy.return" in line and depth:
            depth -= 1
    return inside, total


def _sharded_fp8_layer(mesh, moe: bool = False):
    """(graphdef, abstract state with the parameters' shardings) of one Step-3 FP8 layer (dense or MoE) on ``mesh``."""
    config = dataclasses.replace(
        get_preset("step3"), num_hidden_layers=1, moe_layers_enum=(0,) if moe else (), quantization="fp8"
    )
    layer = nnx.eval_shape(lambda: Step3ForCausalLM(config, rngs=nnx.Rngs(0), mesh=mesh)).layers[0]
    graphdef, state = nnx.split(layer)
    shardings = nnx.to_pure_dict(param_shardings(state, mesh))
    pure = jax.tree.map(lambda s, n: S(s.shape, s.dtype, sharding=n), nnx.to_pure_dict(state), shardings)
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


def test_sharded_fp8_layer_runs_every_kernel_on_its_own_shard(monkeypatch):
    """A Step-3 dense FP8 layer on a data 2 x tensor 4 mesh, lowered for CUDA with the FP8 GEMM kernel: every
    kernel call sits inside ``shard_map`` with per-device operands (batch 64 -> 32 rows; the dense FFN's 18432
    columns -> 4608, its down projection reducing over them), so XLA's partitioner never sees the opaque kernel and
    never gathers whole weights onto every GPU to feed it."""
    graphdef, state = _sharded_fp8_layer(make_mesh(data=2, tensor=4))
    batch = 64
    x, pos = S((batch, 1, get_preset("step3").hidden_size), jnp.bfloat16), S((batch, 1), jnp.int32)

    def dense_layer(state, x, pos):
        layer = nnx.merge(graphdef, state)
        h, normed, _ = layer.attention(x, pos)
        return h + layer.ffn(normed)

    with use_fp8_gemm("kernel"):
        text = jax.jit(dense_layer).trace(state, x, pos).lower(lowering_platforms=("cuda",)).as_text()
    inside, total = _kernels_inside_manual_computations(text)
    assert total == 8 and inside == total  # 5 attention projections + gate, up, down
    for shard_operand in ("32x1x7168xbf16", "4608x7168xf8E4M3FN", "7168x4608xf8E4M3FN", "4096x2048xf8E4M3FN"):
        assert f"tensor<{shard_operand}>" in text, shard_operand
    assert "all_reduce" in text  # o_proj and down_proj sum their partial products over tensor


def test_fp8_ffn_on_a_submesh_without_batch_axes_splits_its_rows():
    """The AFD runner's FFN submesh (tensor 2 x expert 4, no batch axes; the micro-batch arrives split over all its
    devices): the dense FFN's kernels run on 64 / 4 = 16 rows per device (over the ``expert`` axis the weights
    leave free) and 9216-column weight shards, not on every row on every device."""
    graphdef, state = _sharded_fp8_layer(make_mesh(tensor=2, expert=4))
    x = S((64, 1, get_preset("step3").hidden_size), jnp.bfloat16)

    def ffn(state, x):
        return nnx.merge(graphdef, state).ffn(x)

    with use_fp8_gemm("kernel"):
        text = jax.jit(ffn).trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    inside, total = _kernels_inside_manual_computations(text)
    assert total == 3 and inside == total
    for shard_operand in ("16x1x7168xbf16", "9216x7168xf8E4M3FN", "16x1x9216xbf16", "7168x9216xf8E4M3FN"):
        assert f"tensor<{shard_operand}>" in text, shard_operand


def test_expert_parallel_fp8_moe_dispatches_pairs_by_all_to_all():
    """A Step-3 FP8 MoE layer's FFN half on an 8-way expert-parallel mesh (6 experts per device, 256 tokens, top-3),
    lowered for CUDA on the FP8 kernel path: each device keeps its 32 tokens and sends their 96 token-expert pairs
    to the experts' owners as FP8 bytes, an [8, cap, 7168 + 56 x 4 + 4] uint8 buffer (values, float32 scales per
    128 channels, local expert id), cap one of (26, 51, 96) (1.25x the even share of 12 pairs per destination
    + 3 sqrt(12), doubling, then all 96); the experts' three kernels run on the 120-row bucket (1.25x the shard's
    share of all 768 pairs) or on all 8 x cap received slots, and the outputs come back by a second all_to_all. The
    only other collective is the scalar ``pmax`` that picks the capacity: no token all-gather, no all-reduce of the
    outputs. Every kernel sits inside ``shard_map``, the shared expert's on the device's own 32 rows.
    (``dispatch="all_gather"`` runs its row buckets through the same ``shard_map`` and ``_bucketed_experts``; its
    numerics are tested on the CPU in test_sharding.)"""
    config = get_preset("step3")
    graphdef, state = _sharded_fp8_layer(make_mesh(expert=8), moe=True)

    def moe_ffn(state, x, weights, ids):
        return nnx.merge(graphdef, state).ffn(x, (weights, ids))

    tokens, k = 256, config.moe_top_k
    x = S((tokens, 1, config.hidden_size), jnp.bfloat16)
    args = (x, S((tokens, 1, k), jnp.float32), S((tokens, 1, k), jnp.int32))
    with use_fp8_gemm("kernel"):
        text = jax.jit(moe_ffn).trace(state, *args).lower(lowering_platforms=("cuda",)).as_text()
    caps = (26, 51, 96)
    inside, total = _kernels_inside_manual_computations(text)
    assert total == 3 * 2 * len(caps) + 3 and inside == total  # two row counts per capacity, + the shared expert
    for cap in caps:
        assert f"tensor<8x{cap}x7396xui8>" in text and f"tensor<8x{cap}x7168xbf16>" in text, cap
        for rows in (120, 8 * cap):
            assert f"tensor<{rows}x7168xf8E4M3FN>" in text and f"tensor<{rows}x5120xf8E4M3FN>" in text, rows
    assert len(re.findall(r'"stablehlo\.all_to_all"', text)) == 2 * len(caps)
    reduces = re.findall(r'"stablehlo\.all_reduce"\(.*?\) -> (tensor<[^>]*>)', text, re.S)
    assert "all_gather" not in text and set(reduces) == {"tensor<i32>"}, reduces
    assert "tensor<32x1x7168xbf16>" in text  # the shared expert on this device's rows
