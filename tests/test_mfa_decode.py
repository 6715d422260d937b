"""MFA decode attention over a paged KV cache: kernel (GPU interpret mode) == reference, CUDA lowering at Step-3
shapes, paged cache == contiguous cache in the model, clear errors for bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels import mfa_decode as md
from step3_jax import KVCache, create_model
from step3_jax.kv_cache import PageAllocator, PagedKVCache, paged_gather, paged_write
from step3_jax.quant import quantize_per_token

SCALE = 256**-0.5


def random_cache(seed, *, num_pages, page_size, heads, batch, fp8, dim=256):
    rng = np.random.default_rng(seed)  # numpy draws: no per-shape compilation of jax.random on the CPU
    q = jnp.asarray(rng.standard_normal((batch, heads, dim), np.float32), jnp.bfloat16)
    # K with a spread of magnitudes so the softmax is far from uniform; V per-token scales differ a lot
    k = jnp.asarray(rng.standard_normal((num_pages, page_size, dim), np.float32) * 2.0)
    v = rng.standard_normal((num_pages, page_size, dim), np.float32)
    v = jnp.asarray(v * np.exp(rng.standard_normal((num_pages, page_size, 1), np.float32)))
    if fp8:
        (k, ks), (v, vs) = quantize_per_token(k), quantize_per_token(v)
        return q, k, v, ks, vs
    return q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), None, None


def shuffled_table(seed, batch, max_pages, num_pages):
    perm = np.random.default_rng(seed).permutation(num_pages)[: batch * max_pages]
    return jnp.asarray(perm.reshape(batch, max_pages), jnp.int32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("fp8", [False, True])
def test_reference_equals_dense_attention_per_sequence(fp8):
    q, k, v, ks, vs = random_cache(0, num_pages=9, page_size=8, heads=5, batch=3, fp8=fp8, dim=32)
    table = shuffled_table(1, 3, 3, 9)
    lengths = jnp.array([1, 8, 23], jnp.int32)
    out = md.mfa_decode_reference(q, k, v, table, lengths, scale=0.3, k_scales=ks, v_scales=vs)
    kf, vf = md.dequantize_pages(k, ks), md.dequantize_pages(v, vs)
    for b, n in enumerate(lengths.tolist()):
        keys = kf[table[b]].reshape(-1, 32)[:n]
        vals = vf[table[b]].reshape(-1, 32)[:n]
        p = jax.nn.softmax(q[b].astype(jnp.float32) @ keys.T * 0.3, axis=-1)
        np.testing.assert_allclose(np.asarray(out[b], np.float32), p @ vals, rtol=2e-2, atol=2e-2)


def test_dispatcher_uses_reference_off_gpu():
    q, k, v, _, _ = random_cache(2, num_pages=4, page_size=16, heads=4, batch=2, fp8=False)
    table = jnp.array([[2, 0], [1, 3]], jnp.int32)
    lengths = jnp.array([5, 32], jnp.int32)
    ref = md.mfa_decode_reference(q, k, v, table, lengths, scale=SCALE)
    np.testing.assert_array_equal(md.mfa_decode(q, k, v, table, lengths, scale=SCALE), ref)


def test_on_gpu_a_cache_the_kernel_cannot_take_runs_the_reference_and_says_why(monkeypatch, caplog):
    """FP8 pages of 16 tokens (the engine's default page size) are below the kernel's 64-token FP8 block: on a GPU
    the dispatcher must not crash on them but run the reference and log the reason."""
    assert md.kernel_supports(256, jnp.bfloat16, 16) is None and md.kernel_supports(256, jnp.float8_e4m3fn, 64) is None
    assert "64" in md.kernel_supports(256, jnp.float8_e4m3fn, 16)
    assert "head_dim" in md.kernel_supports(128, jnp.bfloat16, 64)
    assert "page_size 96" in md.kernel_supports(256, jnp.bfloat16, 96)
    q, k, v, ks, vs = random_cache(3, num_pages=4, page_size=16, heads=4, batch=2, fp8=True)
    table = jnp.array([[2, 0], [1, 3]], jnp.int32)
    lengths = jnp.array([5, 32], jnp.int32)
    ref = md.mfa_decode_reference(q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs)

    def no_kernel(*a, **k):
        raise AssertionError("the kernel was called for a cache it does not support")

    monkeypatch.setattr(md.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(md, "mfa_decode_kernel", no_kernel)
    monkeypatch.setattr(md, "_WARNED", set())
    with caplog.at_level("WARNING", logger=md.__name__):
        out = md.mfa_decode(q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs)
    np.testing.assert_array_equal(out, ref)
    assert "FP8 KV" in caplog.text and "reference" in caplog.text


# ---------------------------------------------------------------------------------------------- kernel (interpret)

INTERPRET_CASES = {
    # BF16, page 16 (= block_kv): lengths 1, a page boundary (80 = 5 pages) and one past one (49); H=12 pads to a
    # 64-head tile; 2 splits of up to 3 blocks with 2 stages, so the SMEM ring wraps around (producer refills),
    # and the length-1 sequence leaves its second split empty
    "bf16": dict(fp8=False, page_size=16, heads=12, lengths=[1, 80, 49], max_pages=5, splits=2),
    # FP8, page 128 = 2 blocks of 64 per page: lengths at / one past a page boundary and inside a page; one split
    # of up to 3 blocks through 2 stages
    "fp8": dict(fp8=True, page_size=128, heads=8, lengths=[128, 129, 70], max_pages=2, splits=1),
    # the same with Q K^T by FP8 wgmma on the FP8 K tile (q as two e4m3 terms), 2 splits
    "fp8-qk": dict(fp8=True, page_size=128, heads=8, lengths=[128, 129, 70], max_pages=2, splits=2, fp8_qk=True),
}


@pytest.mark.parametrize("case", sorted(INTERPRET_CASES))
def test_kernel_interpret_equals_reference(case):
    c = INTERPRET_CASES[case]
    batch, num_pages = len(c["lengths"]), 16
    q, k, v, ks, vs = random_cache(
        3, num_pages=num_pages, page_size=c["page_size"], heads=c["heads"], batch=batch, fp8=c["fp8"]
    )
    table = shuffled_table(4, batch, c["max_pages"], num_pages)
    lengths = jnp.asarray(c["lengths"], jnp.int32)
    cfg = md.KernelConfig(
        block_kv=min(64, c["page_size"]), stages=2, num_splits=c["splits"], fp8_qk=c.get("fp8_qk", False)
    )
    out = md.mfa_decode_kernel(
        q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs, config=cfg, interpret=True
    )
    ref = md.mfa_decode_reference(q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs)
    assert out.shape == q.shape and out.dtype == jnp.bfloat16
    assert rel_err(out, ref) < (3e-2 if c["fp8"] else 1e-2)
    # and per sequence (a wrong page or mask on one short sequence would hide in the global norm)
    for b in range(batch):
        assert rel_err(out[b], ref[b]) < (3e-2 if c["fp8"] else 1e-2), b


def test_q_as_two_fp8_terms_keeps_f16_precision():
    q = jnp.asarray(np.random.default_rng(6).standard_normal((3, 64, 256), np.float32) * 5.0)
    terms, scales = md.split_q_fp8(q)
    assert terms.dtype == md.FP8_DTYPE and terms.shape == (3, 2, 64, 256) and scales.shape == (3, 2, 64)
    parts = np.asarray(terms, np.float32) * np.asarray(scales)[..., None]
    assert rel_err(parts[:, 0], q) > 1e-2  # one e4m3 term alone: ~3% rms
    assert rel_err(parts.sum(axis=1), q) < 2e-3  # the pair: about the square of that
    zeros, zero_scales = md.split_q_fp8(jnp.zeros((1, 2, 256)))  # (a zero head: scale 1, no NaN)
    assert not np.any(np.asarray(zeros, np.float32)) and np.all(np.asarray(zero_scales) == 1.0)


def test_combine_splits_is_exact_for_one_split_and_ignores_empty_ones():
    o = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 4, 8), np.float32))
    lse = jnp.array([[[0.0] * 4, [-jnp.inf] * 4, [1.0] * 4], [[-jnp.inf] * 4, [2.0] * 4, [-jnp.inf] * 4]])
    out = md.combine_splits(o, lse, jnp.float32)
    w0 = np.array([1.0, 2.0]) / 3.0  # 2**0 : 2**1
    np.testing.assert_allclose(out[0], w0[0] * o[0, 0] + w0[1] * o[0, 2], rtol=1e-6)
    np.testing.assert_allclose(out[1], o[1, 1], rtol=1e-6)
    nan_o = o.at[1, 0].set(jnp.nan)  # an empty split's output is never used, even if it is garbage
    assert bool(jnp.all(jnp.isfinite(md.combine_splits(nan_o, lse, jnp.float32))))


# ---------------------------------------------------------------------------------------------- CUDA lowering


@pytest.mark.parametrize("fp8,page_size", [(False, 64), (True, 128)])
def test_kernel_lowers_for_cuda_at_step3_shapes(fp8, page_size):
    """Runs the Mosaic GPU lowering + verifier on the CPU: wgmma layouts, TMA shapes, the SMEM budget."""
    b, h, max_len, num_pages = 4, 64, 32768, 4096
    kv_dt = md.FP8_DTYPE if fp8 else jnp.bfloat16
    args = [
        jax.ShapeDtypeStruct((b, h, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((num_pages, page_size, 256), kv_dt),
        jax.ShapeDtypeStruct((num_pages, page_size, 256), kv_dt),
        jax.ShapeDtypeStruct((b, max_len // page_size), jnp.int32),
        jax.ShapeDtypeStruct((b,), jnp.int32),
    ]
    scales = [jax.ShapeDtypeStruct((num_pages, page_size), jnp.float32)] * 2 if fp8 else [None, None]

    def f(q, k, v, table, lengths, ks, vs):
        return md.mfa_decode_kernel(q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs)

    lowered = jax.jit(f).trace(*args, *scales).lower(lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()
    cfg = md.default_config(b, 1, max_len, page_size, fp8)
    assert cfg.smem_bytes(fp8) <= md.SMEM_BYTES
    assert b * cfg.num_splits >= md.NUM_SMS  # split-KV fills the chip


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_every_config_the_benchmark_times_lowers_for_cuda(fp8):
    """The H200 run's other configs at issue #4's headline shape (128 x 4K): none wastes its row on a layout error."""
    from pallas_kernels.bench_mfa_decode import kernel_variants

    b, ctx, page = 128, 4096, 64
    kv_dt = md.FP8_DTYPE if fp8 else jnp.bfloat16
    pages = jax.ShapeDtypeStruct((b * ctx // page, page, 256), kv_dt)
    scales = [jax.ShapeDtypeStruct(pages.shape[:2], jnp.float32)] * 2 if fp8 else [None, None]
    args = [jax.ShapeDtypeStruct((b, 64, 256), jnp.bfloat16), pages, pages]
    args += [jax.ShapeDtypeStruct((b, ctx // page), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32)]
    variants = kernel_variants(b, ctx, fp8, page, small=False)
    assert len(variants) == (4 if fp8 else 3)  # (FP8: Q K^T in FP8), twice and half the splits, one stage fewer
    for cfg in variants.values():

        def f(q, k, v, table, lengths, ks, vs, cfg=cfg):
            return md.mfa_decode_kernel(q, k, v, table, lengths, scale=SCALE, k_scales=ks, v_scales=vs, config=cfg)

        assert "mosaic_gpu" in jax.jit(f).trace(*args, *scales).lower(lowering_platforms=("cuda",)).as_text()


def test_smem_overflow_is_caught_by_cuda_lowering():
    """The lowering check is real: 4 stages of 64-token BF16 K and V do not fit in 227 KB."""
    args = [
        jax.ShapeDtypeStruct((2, 64, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((64, 64, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((64, 64, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 16), jnp.int32),
        jax.ShapeDtypeStruct((2,), jnp.int32),
    ]
    cfg = md.KernelConfig(block_kv=64, stages=4, num_splits=2)
    f = lambda q, k, v, t, n: md.mfa_decode_kernel(q, k, v, t, n, scale=SCALE, config=cfg)  # noqa: E731
    with pytest.raises(ValueError, match="shared memory"):
        jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",))


# ---------------------------------------------------------------------------------------------- errors


def test_invalid_inputs_raise_clear_errors():
    q, k, v, _, _ = random_cache(5, num_pages=4, page_size=16, heads=4, batch=2, fp8=False)
    table = jnp.array([[0, 1], [2, 3]], jnp.int32)
    ok = jnp.array([3, 20], jnp.int32)
    with pytest.raises(ValueError, match="capacity"):
        md.mfa_decode(q, k, v, table, jnp.array([3, 33], jnp.int32), scale=SCALE)
    with pytest.raises(ValueError, match="out of range"):
        md.mfa_decode(q, k, v, jnp.array([[0, 1], [2, 4]], jnp.int32), ok, scale=SCALE)
    with pytest.raises(ValueError, match="out of range"):
        md.mfa_decode(q, k, v, jnp.array([[-1, 1], [2, 3]], jnp.int32), ok, scale=SCALE)
    with pytest.raises(ValueError, match="at least one token"):
        md.mfa_decode(q, k, v, table, jnp.array([0, 3], jnp.int32), scale=SCALE)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        md.mfa_decode(q[..., :128], k, v, table, ok, scale=SCALE)
    with pytest.raises(ValueError, match="written for head_dim 256"):
        md.mfa_decode_kernel(q[..., :128], k[..., :128], v[..., :128], table, ok, scale=SCALE)
    with pytest.raises(ValueError, match="k_scales and v_scales"):
        md.mfa_decode(q, k.astype(md.FP8_DTYPE), v.astype(md.FP8_DTYPE), table, ok, scale=SCALE)
    with pytest.raises(ValueError, match="block_table must be"):
        md.mfa_decode(q, k, v, table[0], ok, scale=SCALE)
    with pytest.raises(ValueError, match="impl"):
        md.mfa_decode(q, k, v, table, ok, scale=SCALE, impl="triton")
    with pytest.raises(ValueError, match="page_size"):
        md.mfa_decode_kernel(q, k, v, table, ok, scale=SCALE, config=md.KernelConfig(block_kv=32, num_splits=1))


# ---------------------------------------------------------------------------------------------- paged cache


def test_page_allocator_hands_out_frees_and_reports_exhaustion():
    alloc = PageAllocator(num_pages=6, page_size=4, max_pages_per_seq=3, shuffle_seed=0)
    a = alloc.reserve("a", 5)  # 2 pages
    b = alloc.reserve("b", 4)  # 1 page
    assert len(a) == 2 and len(b) == 1 and not set(a) & set(b) and alloc.num_free == 3
    assert alloc.reserve("a", 8) == a  # still fits in its 2 pages
    assert alloc.reserve("a", 9)[:2] == a and len(alloc.pages("a")) == 3
    table = alloc.block_table(["a", "b"])
    assert table.shape == (2, 3) and table[0].tolist() == alloc.pages("a") and table[1, 0] == b[0]
    with pytest.raises(ValueError, match="block table row holds 3 pages"):
        alloc.reserve("c", 13)
    alloc.reserve("c", 8)
    with pytest.raises(RuntimeError, match="out of KV pages"):
        alloc.reserve("d", 1)
    alloc.free("a")
    assert alloc.num_free == 3 and alloc.pages("a") == []
    assert sorted(alloc.pages("b") + alloc.pages("c") + alloc.reserve("d", 12)) == list(range(6))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_paged_write_then_gather_round_trips(test_config, dtype):
    cfg = test_config
    alloc = PageAllocator(num_pages=8, page_size=4, max_pages_per_seq=3, shuffle_seed=3)
    for seq, n in enumerate([6, 11]):
        alloc.reserve(seq, n)
    cache = PagedKVCache.create(cfg, alloc.block_table([0, 1]), num_pages=8, page_size=4, dtype=dtype)
    rng = np.random.default_rng(0)
    k, v = (jnp.asarray(rng.standard_normal((2, 6, 1, cfg.head_dim), np.float32)) for _ in range(2))
    layer = paged_write(cache.layer(0), k[:, :2], v[:, :2], jnp.array([0, 5], jnp.int32))
    layer = paged_write(layer, k[:, 2:], v[:, 2:], jnp.array([2, 7], jnp.int32))
    keys, values = paged_gather(layer, jnp.float32)
    tol = 0.07 if dtype == jnp.float8_e4m3fn else 1e-2
    np.testing.assert_allclose(keys[0, :6], k[0], rtol=tol, atol=tol)
    np.testing.assert_allclose(values[1, 5:11], v[1], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def model_and_step(test_config):
    model = create_model(test_config, seed=0)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, ids, cache):
        return nnx.merge(graphdef, state)(ids, cache=cache)

    return model, lambda ids, cache: step(state, ids, cache)


@pytest.mark.parametrize("fp8", [False, True])
def test_model_decoding_with_paged_cache_equals_contiguous(test_config, model_and_step, fp8):
    """Ragged right-padded prefill, then decode steps: paged (shuffled pages, page 4) == contiguous cache."""
    _, step = model_and_step
    lens, prompt, total = [3, 7], 7, 12
    ids = jnp.asarray(np.random.default_rng(9).integers(3, test_config.vocab_size, (2, total)), jnp.int32)
    alloc = PageAllocator(num_pages=16, page_size=4, max_pages_per_seq=4, shuffle_seed=1)
    for seq in range(2):
        alloc.reserve(seq, 16)
    kv_dtype = jnp.float8_e4m3fn if fp8 else None
    paged = PagedKVCache.create(test_config, alloc.block_table([0, 1]), num_pages=16, page_size=4, dtype=kv_dtype)
    contig = KVCache.create(test_config, 2, 16)
    lp, paged = step(ids[:, :prompt], paged)
    lc, contig = step(ids[:, :prompt], contig)

    def check(lp, lc):
        if fp8:  # e4m3 per-token KV (~4% per element at head_dim 16) perturbs the logits: a relative bound
            assert rel_err(lp, lc) < 0.1
        else:
            np.testing.assert_allclose(lp, lc, rtol=1e-5, atol=1e-5)

    check(lp, lc)
    paged = paged.replace(lengths=jnp.asarray(lens, jnp.int32))
    contig = contig.replace(lengths=jnp.asarray(lens, jnp.int32))
    for t in range(prompt, total):
        lp, paged = step(ids[:, t : t + 1], paged)
        lc, contig = step(ids[:, t : t + 1], contig)
        check(lp, lc)
    assert paged.lengths.tolist() == [lens[0] + total - prompt, lens[1] + total - prompt]
    assert isinstance(paged, PagedKVCache) and paged.k[0].shape == (16, 4, 1, test_config.head_dim)
