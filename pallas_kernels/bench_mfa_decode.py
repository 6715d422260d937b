"""Benchmark: MFA decode attention (64 query heads, one 256-wide K/V head) against its peers, in ONE call.

    python -m pallas_kernels.bench_mfa_decode --out bench_mfa_decode.json          # GPU: the full table
    python -m pallas_kernels.bench_mfa_decode --small --out /tmp/mfa_small.json    # CPU: tiny, interpret mode

For every (batch, context) x {BF16 KV, FP8 KV} it times our kernel (paged cache, shuffled pages), XLA
einsum + softmax, jax's Triton ``decode_attention.mqa`` (block_k=128) and cuDNN ``jax.nn.dot_product_attention``
(the peers read a contiguous cache; with FP8 KV they first dequantise it, inside the timed function). It
prints time, KV bytes / time, the fraction of the HBM read ceiling measured in the same run (``jnp.sum`` over
a 4 GiB buffer) and the relative error against a float32 reference, and writes everything as JSON.
Each peer runs in its own try/except: a failing peer prints its error in the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mfa_decode as md
from pallas_kernels.bench_common import Budget, git_commit, short_error, write_json
from pallas_kernels.interpret import size_pool_for_interpret
from step3_jax.quant import quantize_per_token

HEADS, DIM = 64, 256
# (issue #4's headline shape first, then the split-KV ones: under the time budget the last ones lose their peers)
FULL_SHAPES = [(128, 4096), (16, 32768), (1, 65536), (64, 8192), (32, 4096)]
SMALL_SHAPES = [(2, 256), (1, 320)]
L2_BYTES = 60 << 20
OURS = "ours (paged)"
VARIANT_SHAPES = 2  # the first this many shapes (the targets' headline ones) also time other kernel configs


def kernel_variants(batch: int, ctx: int, fp8: bool, page_size: int, small: bool) -> dict[str, md.KernelConfig]:
    """Other configs than the default to time beside it (optional rows: the H200 run says which pays): for FP8 KV
    the FP8 ``Q K^T`` (``fp8_qk``); twice and half the split count (more / fewer waves of CTAs) and one pipeline
    stage fewer; on the CPU only the first."""
    base = md.default_config(batch, 1, ctx, page_size, fp8)
    blocks = -(-ctx // base.block_kv)
    out = {}
    if fp8:
        out["ours [fp8 QK]"] = dataclasses.replace(base, fp8_qk=True)
    if 2 * base.num_splits <= blocks:
        out[f"ours [splits={2 * base.num_splits}]"] = dataclasses.replace(base, num_splits=2 * base.num_splits)
    if base.num_splits > 1:
        out[f"ours [splits={base.num_splits // 2}]"] = dataclasses.replace(base, num_splits=base.num_splits // 2)
    out[f"ours [stages={base.stages - 1}]"] = dataclasses.replace(base, stages=base.stages - 1)
    return dict(list(out.items())[:1]) if small else out


def config_note(cfg: md.KernelConfig) -> str:
    return f"block_kv={cfg.block_kv} stages={cfg.stages} splits={cfg.num_splits}" + (" fp8_qk" if cfg.fp8_qk else "")


def time_fn(fn, arg_sets, *, min_time_s: float, repeats: int = 5) -> float:
    """Median seconds per call: calls dispatched back to back over rotating argument sets (so the data is not
    served from L2), one block_until_ready per batch of calls."""
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    jax.block_until_ready(fn(*arg_sets[-1]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    one = max(time.perf_counter() - t0, 1e-6)
    n = max(len(arg_sets), min(200, int(min_time_s / one) + 1))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / n)
    return statistics.median(samples)


def read_ceiling(nbytes: int, min_time_s: float) -> float:
    """HBM read bandwidth (bytes/s): jnp.sum over a bf16 buffer of ``nbytes``."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 2 // 4096, 4096), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    t = time_fn(f, [(x,)], min_time_s=min_time_s)
    del x
    return nbytes / t


def build_case(batch: int, ctx: int, fp8: bool, page_size: int, seed: int = 0):
    """Random q and a paged cache (shuffled pages), rotated in copies so the set of copies exceeds L2."""
    kv_bytes_per_token = 2 * DIM * (1 if fp8 else 2) + (8 if fp8 else 0)
    kv_bytes = batch * ctx * kv_bytes_per_token
    copies = max(1, min(4, math.ceil(4 * L2_BYTES / kv_bytes)))
    pages_per_seq = ctx // page_size
    num_pages = copies * batch * pages_per_seq
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, HEADS, DIM), jnp.float32).astype(jnp.bfloat16)
    k = jax.random.normal(kk, (num_pages, page_size, DIM), jnp.bfloat16)
    v = jax.random.normal(kv, (num_pages, page_size, DIM), jnp.bfloat16)
    if fp8:
        (k, ks), (v, vs) = quantize_per_token(k), quantize_per_token(v)
    else:
        ks = vs = None
    perm = np.random.default_rng(seed).permutation(num_pages).reshape(copies, batch, pages_per_seq)
    tables = [jnp.asarray(p, jnp.int32) for p in perm]
    lengths = jnp.full((batch,), ctx, jnp.int32)
    return dict(q=q, k=k, v=v, ks=ks, vs=vs, tables=tables, lengths=lengths, kv_bytes=kv_bytes, copies=copies)


def contiguous(case, i):
    """Copy ``i``'s cache as contiguous ``[B, S, K]`` arrays (+ per-token scales for FP8)."""
    t = case["tables"][i]
    k, v = md.gather_pages(case["k"], t), md.gather_pages(case["v"], t)
    if case["ks"] is None:
        return k, v, None, None
    return k, v, md.gather_pages(case["ks"], t), md.gather_pages(case["vs"], t)


def _dequant(x, s):
    return x if s is None else (x.astype(jnp.float32) * s[..., None]).astype(jnp.bfloat16)


def peer_xla(q, k, v, ks, vs, lengths):
    k, v = _dequant(k, ks), _dequant(v, vs)
    s = jnp.einsum("bhk,bsk->bhs", q, k, preferred_element_type=jnp.float32) * DIM**-0.5
    s = jnp.where(jnp.arange(k.shape[1])[None, None, :] < lengths[:, None, None], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhs,bsk->bhk", p.astype(v.dtype), v, preferred_element_type=jnp.float32).astype(q.dtype)


def peer_mqa(q, k, v, ks, vs, lengths, interpret=False):
    from jax.experimental.pallas.ops.gpu import decode_attention

    k, v = _dequant(k, ks), _dequant(v, vs)
    return decode_attention.mqa(q, k, v, kv_seq_len=lengths, sm_scale=DIM**-0.5, block_k=128, interpret=interpret)


def peer_cudnn(q, k, v, ks, vs, lengths):
    k, v = _dequant(k, ks), _dequant(v, vs)
    out = jax.nn.dot_product_attention(
        q[:, None],
        k[:, :, None],
        v[:, :, None],
        scale=DIM**-0.5,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
    )
    return out[:, 0]


def run(
    shapes,
    *,
    small: bool,
    page_size: int,
    min_time_s: float,
    ceiling_bytes: int,
    budget: Budget | None = None,
    on_row=None,
) -> dict:
    """The table: a row per (shape, KV dtype, implementation). Past the ``budget`` only our kernel in its default
    config is measured (the peers' and the other configs' rows say skipped); ``on_row(result so far)`` after every
    row (the script writes its JSON)."""
    on_gpu = jax.default_backend() == "gpu"
    budget = budget or Budget(None)
    ceiling = read_ceiling(ceiling_bytes, min_time_s)
    rows = []
    result = dict(ceiling_bytes_per_s=ceiling, rows=rows)
    for shape_index, (batch, ctx) in enumerate(shapes):
        for fp8 in (False, True):
            case = build_case(batch, ctx, fp8, page_size)
            q, lengths, tables = case["q"], case["lengths"], case["tables"]
            ref32 = _f32_reference(q, case, tables[0], lengths)
            default = md.default_config(batch, 1, ctx, page_size, fp8)
            variants = {}  # timed after the peers
            if shape_index < VARIANT_SHAPES:
                variants = kernel_variants(batch, ctx, fp8, page_size, small)
            notes = {name: config_note(c) for name, c in {OURS: default, **variants}.items()}

            def ours(cfg, case=case, q=q, lengths=lengths, tables=tables):
                kernel = jax.jit(
                    functools.partial(md.mfa_decode_kernel, scale=DIM**-0.5, config=cfg, interpret=not on_gpu)
                )
                return (
                    lambda t: kernel(q, case["k"], case["v"], t, lengths, k_scales=case["ks"], v_scales=case["vs"]),
                    [(t,) for t in tables],
                )

            impls = {OURS: ours(default)}
            contig = [contiguous(case, i) for i in range(len(tables))]
            peers = {"XLA einsum+softmax": peer_xla, "jax mqa (Triton, block_k=128)": peer_mqa, "cuDNN": peer_cudnn}
            for name, fn in peers.items():  # off GPU cuDNN fails: an error row, the code path still runs
                if small and name.startswith("jax mqa"):
                    fn = functools.partial(peer_mqa, interpret=True)
                f = jax.jit(fn)
                impls[name] = (lambda *a, f=f, q=q, lengths=lengths: f(q, *a, lengths), [tuple(c) for c in contig])
            for name, cfg in variants.items():
                impls[name] = ours(cfg)
            for name, (fn, arg_sets) in impls.items():
                row = dict(batch=batch, context=ctx, kv="fp8" if fp8 else "bf16", impl=name, kv_bytes=case["kv_bytes"])
                if name in notes:
                    row["config"] = notes[name]
                if name != OURS and budget.over():
                    row["error"] = f"skipped: over the --budget-s of {budget.seconds:g} s"
                    rows.append(row)
                    _print_row(row)
                    continue
                try:
                    out = fn(*arg_sets[0])
                    row["rel_err"] = float(np.linalg.norm(np.asarray(out, np.float32) - ref32) / np.linalg.norm(ref32))
                    if small:  # a smoke run: one timed call (the kernel is interpreted; the time means nothing)
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(*arg_sets[0]))
                        t = time.perf_counter() - t0
                    else:
                        t = time_fn(fn, arg_sets, min_time_s=min_time_s)
                    row.update(
                        time_us=t * 1e6, tb_s=case["kv_bytes"] / t / 1e12, frac_ceiling=case["kv_bytes"] / t / ceiling
                    )
                except Exception as e:  # noqa: BLE001 - one failing peer must not abort the table
                    row["error"] = short_error(e, 90)
                rows.append(row)
                _print_row(row)
                if on_row is not None:
                    on_row(result)
            del case, contig, impls
    return result


def _f32_reference(q, case, table, lengths):
    k = md.gather_pages(md.dequantize_pages(case["k"], case["ks"]), table)
    v = md.gather_pages(md.dequantize_pages(case["v"], case["vs"]), table)
    s = jnp.einsum("bhk,bsk->bhs", q.astype(jnp.float32), k, precision="highest") * DIM**-0.5
    s = jnp.where(jnp.arange(k.shape[1])[None, None, :] < lengths[:, None, None], s, -jnp.inf)
    out = jnp.einsum("bhs,bsk->bhk", jax.nn.softmax(s, axis=-1), v, precision="highest")
    return np.asarray(out, np.float32)


HEADER = f"{'B x ctx':>12} {'KV':>4}  {'impl':<30} {'time us':>10} {'TB/s':>6} {'%ceil':>6} {'rel err':>9}  note"


def _fmt(row) -> str:
    shape = (
        f"{row['batch']} x {row['context'] // 1024}K"
        if row["context"] >= 1024
        else f"{row['batch']} x {row['context']}"
    )
    if "error" in row:
        err = f"{row['rel_err']:.2e}" if "rel_err" in row else "-"
        return f"{shape:>12} {row['kv']:>4}  {row['impl']:<30} {'-':>10} {'-':>6} {'-':>6} {err:>9}  {row['error']}"
    return (
        f"{shape:>12} {row['kv']:>4}  {row['impl']:<30} {row['time_us']:>10.1f} {row['tb_s']:>6.2f} "
        f"{100 * row['frac_ceiling']:>5.1f}% {row['rel_err']:>9.2e}"
    )


_printed_header = False


def _print_row(row) -> None:
    global _printed_header
    if not _printed_header:
        print(HEADER, flush=True)
        _printed_header = True
    print(_fmt(row), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU: kernel in GPU interpret mode)")
    p.add_argument("--out", default="bench_mfa_decode.json", help="where to write the JSON table")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--min-time", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds from the process start after which the peers are skipped (our kernel is still "
                   "measured); the JSON is written after every row")  # fmt: skip
    args = p.parse_args(argv)
    size_pool_for_interpret()  # (before the backend starts: on the CPU the kernels are interpreted)
    small = args.small or jax.default_backend() != "gpu"
    shapes = SMALL_SHAPES if small else FULL_SHAPES
    min_time = args.min_time if args.min_time is not None else (0.01 if small else 0.2)
    ceiling_bytes = (64 << 20) if small else (4 << 30)
    print(f"MFA decode: {HEADS} heads x {DIM}, page {args.page_size}; jax {jax.__version__}; {jax.devices()[0]}")
    meta = dict(
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        jax=jax.__version__,
        device=str(jax.devices()[0]),
        backend=jax.default_backend(),
        commit=git_commit(),
        small=small,
        heads=HEADS,
        head_dim=DIM,
        page_size=args.page_size,
    )
    budget = Budget(args.budget_s)
    result = run(
        shapes,
        small=small,
        page_size=args.page_size,
        min_time_s=min_time,
        ceiling_bytes=ceiling_bytes,
        budget=budget,
        on_row=lambda partial: write_json(args.out, {**meta, **partial}),
    )
    ceiling = result["ceiling_bytes_per_s"]
    print(f"\nread ceiling (jnp.sum over {ceiling_bytes >> 20} MiB): {ceiling / 1e12:.3f} TB/s\n")
    print(HEADER)
    for row in result["rows"]:
        print(_fmt(row))
    write_json(args.out, {**meta, **result, "elapsed_s": budget.elapsed()})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
