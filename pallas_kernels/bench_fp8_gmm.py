"""Benchmark of the block-scaled FP8 grouped GEMM against its peers, in one call.

    python -m pallas_kernels.bench_fp8_gmm --out fp8_gmm.json          # H200: Step-3 expert shapes
    python -m pallas_kernels.bench_fp8_gmm --small                     # CPU: tiny shapes, kernel in interpret mode

For each token count (default 4096, 1024, 256, 64 tokens, top-3 over 48 experts with skewed random routing, so
rows = 3 x tokens) and each expert GEMM (fused gate|up: K=7168 -> N=2x5120; down: K=5120 -> N=7168) it times:

* ``fp8_gmm``        this repo's kernel (best of a few tilings; every tiling is in the JSON)
* ``xla_ragged_bf16`` XLA ``lax.ragged_dot`` in BF16
* ``mgpu_bf16``      jax's ``ragged_dot_mgpu`` (Pallas Mosaic GPU) in BF16
* ``mgpu_fp8_noscale`` the same kernel on the FP8 operands without scales (K-major weights, FP8 output)
* ``tokamax_bf16``   tokamax ``ragged_dot`` in BF16, where importable
* ``ffn_fp8``        the whole FP8 expert FFN (sort, quantise, gate|up GEMM, SiLU*up, quantise, down, combine)

and, in the same run, the ceilings: dense FP8 and BF16 GEMMs through XLA at the same M x N x K, and the HBM read
rate. Columns: time, TFLOP/s (useful FLOPs 2*rows*N*K), weight bytes/s (each used expert's weights read once), and
the relative error against a float32 reference of the dequantised operands on a few sampled groups. A failing
variant prints its error in the table instead of aborting. Results go to ``--out`` as JSON after every shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import fp8_gmm
from pallas_kernels.bench_common import Budget, git_commit, short_error, write_json
from pallas_kernels.interpret import size_pool_for_interpret
from step3_jax.quant import dequantize_activations, dequantize_blockwise, quantize_activations, quantize_blockwise

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Problem:
    experts: int
    hidden: int
    ffn: int
    top_k: int
    tokens: tuple[int, ...]

    def gemms(self) -> dict[str, tuple[int, int]]:
        """name -> (K, N)"""
        return {"gate_up": (self.hidden, 2 * self.ffn), "down": (self.ffn, self.hidden)}


STEP3 = Problem(experts=48, hidden=7168, ffn=5120, top_k=3, tokens=(4096, 1024, 256, 64))
SMALL = Problem(experts=4, hidden=256, ffn=128, top_k=2, tokens=(40, 12))

GPU_CONFIGS = (
    fp8_gmm.GmmConfig(),
    fp8_gmm.GmmConfig(stages=5, grid_minor_dim=1, grid_tile_width=4),
    fp8_gmm.GmmConfig(block_n=256, stages=3),
    fp8_gmm.GmmConfig(block_n=256, stages=3, grid_minor_dim=1, grid_tile_width=2),
    fp8_gmm.GmmConfig(wg_m=128, sub_n=64, stages=3),
    # 64 rows x 256 columns, the warpgroups side by side: at decode (~16 rows per expert) a quarter of the activation
    # bytes per weight byte that the 128-row tiles stream
    fp8_gmm.GmmConfig(block_n=256, split="n", stages=4),
)


def routed_group_sizes(rng: np.random.Generator, tokens: int, experts: int, top_k: int) -> np.ndarray:
    """Skewed routing: each token picks top_k distinct experts with log-normal popularity."""
    p = np.exp(rng.normal(0.0, 0.8, experts))
    p /= p.sum()
    counts = np.zeros(experts, np.int64)
    for _ in range(tokens):
        counts[rng.choice(experts, size=top_k, replace=False, p=p)] += 1
    return counts.astype(np.int32)


def timeit(fn, *args, reps: int = 5) -> tuple[float, object]:
    """Median seconds per call: warm-up/compile, then ``reps`` batches of back-to-back calls (one sync each);
    ``reps=0``: the time of one call after the warm-up."""
    out = jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t0
    if reps == 0:  # (a smoke run: that one call)
        return first, out
    inner = int(np.clip(0.02 / max(first, 1e-6), 1, 50))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            o = fn(*args)
        jax.block_until_ready(o)
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times)), out


def dot_nt(a, b):
    """a [M, K] x b [N, K] -> [M, N] in BF16 (the weights stay K-major, as cuBLASLt FP8 wants)."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.bfloat16)


def configs_to_time(configs, over_budget: bool) -> list[fp8_gmm.GmmConfig]:
    """Every candidate tiling; past the time budget only one of each kind: the default (warpgroups over rows) and
    the first side-by-side one (``split="n"``), where the list has one."""
    if not over_budget:
        return list(configs)
    return [*configs[:1], *[c for c in configs[1:] if c.split == "n"][:1]]


def config_name(c: fp8_gmm.GmmConfig) -> str:
    wgs = f"{c.wg_m}x2" if c.split == "m" else f"{c.wg_m},2x{c.wg_n}"  # the warpgroups over rows / side by side
    return f"fp8_gmm[{wgs},{c.block_n}/{c.sub_n},s{c.stages},d{c.grid_minor_dim}w{c.grid_tile_width}]"


def measure_ceilings(small: bool, reps: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n = 1 << (20 if small else 31)  # 2 Gi bf16 = 4 GiB
    try:
        big = jnp.ones((n,), jnp.bfloat16) * 1.5
        t, _ = timeit(jax.jit(lambda a: jnp.sum(a, dtype=f32)), big, reps=reps)
        out["hbm_read_TBps"] = 2 * n / t / 1e12
        del big
    except Exception as e:  # noqa: BLE001 - a ceiling that fails is reported, not fatal
        out["hbm_read_error"] = short_error(e)
    s = 512 if small else 8192
    for name, dt in (("dense_fp8_8192_TFLOPs", jnp.float8_e4m3fn), ("dense_bf16_8192_TFLOPs", jnp.bfloat16)):
        try:
            a = jax.random.normal(jax.random.key(0), (s, s)).astype(dt)
            b = jax.random.normal(jax.random.key(1), (s, s)).astype(dt)
            t, _ = timeit(jax.jit(dot_nt), a, b, reps=reps)
            out[name] = 2 * s**3 / t / 1e12
        except Exception as e:  # noqa: BLE001
            out[name.replace("TFLOPs", "error")] = short_error(e)
    return out


def make_weights(key, e: int, n: int, k: int):
    kw, ks = jax.random.split(key)

    @jax.jit
    def build(kw, ks):
        w = jax.random.normal(kw, (e, n, k), jnp.bfloat16) * 0.02
        w = w * jnp.exp(0.5 * jax.random.normal(ks, (e, 1, k), f32)).astype(jnp.bfloat16)
        return quantize_blockwise(w)

    w_q, w_s = build(kw, ks)
    w_bf16 = jax.jit(lambda q, s: dequantize_blockwise(q, s, dtype=jnp.bfloat16))(w_q, w_s)
    return w_q, w_s, w_bf16


def sample_reference(x_q, x_s, w_q, w_s, gs: np.ndarray):
    """f32 reference rows for up to three non-empty groups (largest, smallest, median)."""
    starts = np.concatenate([[0], np.cumsum(gs)[:-1]])
    nonempty = [g for g in range(len(gs)) if gs[g] > 0]
    by_size = sorted(nonempty, key=lambda g: gs[g])
    picks = sorted({by_size[-1], by_size[0], by_size[len(by_size) // 2]})
    rows = np.concatenate([np.arange(starts[g], starts[g] + gs[g]) for g in picks])
    refs = []
    for g in picks:
        xd = dequantize_activations(x_q[starts[g] : starts[g] + gs[g]], x_s[starts[g] : starts[g] + gs[g]])
        wd = dequantize_blockwise(w_q[g], w_s[g])
        refs.append(jnp.dot(xd, wd.T, precision=lax.Precision.HIGHEST))
    return rows, jnp.concatenate(refs)


def rel_err(out, rows, ref) -> float:
    got = jnp.asarray(out)[rows].astype(f32)
    return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def peer_fns(small: bool, interpret_cfg):
    """name -> (callable(x_q, x_s_t, x_bf16, w_q, w_s, w_bf16, gs), input kind, compares to the reference?)"""
    fns = {}

    def xla_bf16(x_q, x_s_t, x_bf16, w_q, w_s, w_bf16, gs):
        dn = lax.RaggedDotDimensionNumbers((([1], [2]), ([], [])), [0], [0])
        return lax.ragged_dot_general(x_bf16, w_bf16, gs, dn, preferred_element_type=jnp.bfloat16)

    fns["xla_ragged_bf16"] = (xla_bf16, 2, True)

    def mgpu(dtype_bytes, block_k):
        def f(x_q, x_s_t, x_bf16, w_q, w_s, w_bf16, gs):
            from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

            lhs, rhs = (x_q, w_q) if dtype_bytes == 1 else (x_bf16, w_bf16)
            return ragged_dot_mgpu.ragged_dot(
                lhs,
                rhs,
                group_sizes=gs,
                block_m=128,
                block_n=128,
                block_k=block_k,
                max_concurrent_steps=4,
                grid_block_n=8,
                transpose_rhs=True,
            )

        return f

    fns["mgpu_bf16"] = (mgpu(2, 64), 2, True)
    fns["mgpu_fp8_noscale"] = (mgpu(1, 128), 1, False)

    def tokamax_bf16(x_q, x_s_t, x_bf16, w_q, w_s, w_bf16, gs):
        import tokamax  # noqa: PLC0415 - optional peer

        return tokamax.ragged_dot(x_bf16, jnp.swapaxes(w_bf16, 1, 2), gs)

    fns["tokamax_bf16"] = (tokamax_bf16, 2, True)
    return fns


# What a peer's figure means, where it is not what its name says.
PEER_NOTES = {
    # (XLA's GPU rewriter turns ragged_dot into a dense dot over a masked copy of the rows: every expert's weights
    # against every row, ~E x the useful FLOPs; the TFLOP/s column counts the useful ones)
    "xla_ragged_bf16": "XLA: dense masked dot over all experts",
    "mgpu_fp8_noscale": "no scales, fp8 out",
}


def run(problem: Problem, small: bool, reps: int, out_path: str | None, budget_s: float | None) -> dict:
    budget = Budget(budget_s)
    dev = jax.devices()[0]
    num_sms = int(getattr(dev, "core_count", 132) or 132)
    if small:
        configs = (fp8_gmm.GmmConfig(num_sms=4),)
        ours_impl = "interpret"
    else:
        configs = tuple(dataclasses.replace(c, num_sms=num_sms) for c in GPU_CONFIGS)
        ours_impl = "kernel"
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "git_commit": git_commit(),
        "device": f"{dev.platform}: {getattr(dev, 'device_kind', '')}",
        "problem": dataclasses.asdict(problem),
        "ceilings": measure_ceilings(small, reps),
        "results": [],
    }
    print("ceilings:", json.dumps(report["ceilings"]), flush=True)
    rng = np.random.default_rng(0)
    key = jax.random.key(0)
    peers = peer_fns(small, None)
    for gemm, (k, n) in problem.gemms().items():
        key, kw = jax.random.split(key)
        w_q, w_s, w_bf16 = make_weights(kw, problem.experts, n, k)
        for tokens in problem.tokens:
            rows = tokens * problem.top_k
            gs_np = routed_group_sizes(rng, tokens, problem.experts, problem.top_k)
            gs = jnp.asarray(gs_np)
            key, kx = jax.random.split(key)
            x = jax.random.normal(kx, (rows, k), jnp.bfloat16) * jnp.linspace(0.2, 3.0, k, dtype=jnp.bfloat16)
            x_q, x_s = quantize_activations(x)
            x_bf16 = dequantize_activations(x_q, x_s, dtype=jnp.bfloat16)
            x_s_t = x_s.T
            ref_rows, ref = sample_reference(x_q, x_s, w_q, w_s, gs_np)
            flops = 2.0 * rows * n * k
            used = int((gs_np > 0).sum())
            base = {"gemm": gemm, "tokens": tokens, "rows": rows, "K": k, "N": n, "experts_used": used}

            ctx = {"base": base, "flops": flops, "weight_elems": used * n * k}

            def record(variant, t=None, err=None, note="", weight_bytes=1.0, ctx=ctx):
                r = dict(ctx["base"], variant=variant, note=note)
                if t is not None:
                    r["time_us"] = t * 1e6
                    r["TFLOPs"] = ctx["flops"] / t / 1e12
                    r["weight_TBps"] = ctx["weight_elems"] * weight_bytes / t / 1e12
                if err is not None:
                    r["rel_err"] = err
                report["results"].append(r)
                print(format_row(r), flush=True)

            # ours: every candidate tiling; the best one is the "fp8_gmm" row
            best = None
            over_budget = budget.over()
            for cfg in configs_to_time(configs, over_budget):
                name = config_name(cfg)
                try:
                    if fp8_gmm.kernel_supports(rows, n, k, cfg):
                        raise ValueError(fp8_gmm.kernel_supports(rows, n, k, cfg))
                    fn = jax.jit(
                        lambda xq, xs, wq, ws, g, cfg=cfg: fp8_gmm.fp8_grouped_matmul_kernel(
                            xq, xs, wq, ws, g, config=cfg, interpret=ours_impl == "interpret"
                        )
                    )
                    t, out = timeit(fn, x_q, x_s_t, w_q, w_s, gs, reps=0 if small else reps)
                    err = rel_err(out, ref_rows, ref)
                    if best is None or t < best[0]:
                        best = (t, err, name)
                    report["results"].append(dict(base, variant=name, time_us=t * 1e6, TFLOPs=flops / t / 1e12))
                    del out
                except Exception as e:  # noqa: BLE001
                    report["results"].append(dict(base, variant=name, note=short_error(e)))
                    print(f"  {name}: {short_error(e)}", flush=True)
            if best is None:
                record("fp8_gmm", note="all tilings failed (see JSON)")
            else:
                record("fp8_gmm", best[0], best[1], note=best[2])

            for name, (fn, wbytes, compare) in peers.items():
                if name == "xla_ragged_bf16" and over_budget:
                    record(name, note="skipped: over the time budget")
                    continue
                try:
                    t, out = timeit(jax.jit(fn), x_q, x_s_t, x_bf16, w_q, w_s, w_bf16, gs, reps=reps)
                    err = rel_err(out, ref_rows, ref) if compare else None
                    record(name, t, err, note=PEER_NOTES.get(name, ""), weight_bytes=wbytes)
                    del out
                except Exception as e:  # noqa: BLE001
                    record(name, note=short_error(e))

            # dense ceilings at this M x N x K
            for name, dt in (("dense_fp8_xla", jnp.float8_e4m3fn), ("dense_bf16_xla", jnp.bfloat16)):
                try:
                    a = x_q if dt == jnp.float8_e4m3fn else x_bf16
                    b = w_q[0] if dt == jnp.float8_e4m3fn else w_bf16[0]
                    t, _ = timeit(jax.jit(dot_nt), a, b, reps=reps)
                    record(name, t, note="dense, one weight matrix", weight_bytes=jnp.dtype(dt).itemsize / used)
                except Exception as e:  # noqa: BLE001
                    record(name, note=short_error(e))
            write_json(out_path, report)
        del w_q, w_s, w_bf16

    ffn_rows(problem, small, reps, report, ours_impl, configs[0], budget, out_path)
    report["elapsed_s"] = budget.elapsed()
    write_json(out_path, report)
    return report


def ffn_rows(
    problem: Problem, small: bool, reps: int, report: dict, impl: str, cfg, budget: Budget, out_path: str | None
) -> None:
    """The whole FP8 expert FFN (gate|up fused) per token count; on --small also its error vs the BF16 path.
    Past the time budget the remaining token counts are recorded as skipped."""
    e, d, f = problem.experts, problem.hidden, problem.ffn
    key = jax.random.key(1)

    def skip(tokens: int) -> None:
        r = {"gemm": "ffn", "tokens": tokens, "rows": tokens * problem.top_k, "variant": "ffn_fp8",
             "note": "skipped: over the time budget"}  # fmt: skip
        report["results"].append(r)
        print(format_row(r), flush=True)

    if budget.over():
        for tokens in problem.tokens:
            skip(tokens)
        return
    try:
        kg, kd = jax.random.split(key)
        gu_q, gu_s, _ = make_weights(kg, e, 2 * f, d)
        dn_q, dn_s, _ = make_weights(kd, e, d, f)
    except Exception as ex:  # noqa: BLE001
        report["results"].append({"gemm": "ffn", "variant": "ffn_fp8", "note": short_error(ex)})
        return
    rng = np.random.default_rng(1)
    for tokens in problem.tokens:
        if budget.over():
            skip(tokens)
            continue
        logits = rng.normal(size=(tokens, e)) + rng.normal(0, 0.8, e)
        probs = jax.nn.softmax(jnp.asarray(logits, f32), -1)
        weights, ids = lax.top_k(probs, problem.top_k)
        x = jax.random.normal(jax.random.key(tokens), (tokens, d), jnp.bfloat16)
        base = {"gemm": "ffn", "tokens": tokens, "rows": tokens * problem.top_k}
        try:
            fn = jax.jit(
                lambda x, w, i: fp8_gmm.fp8_expert_ffn_fused(x, w, i, gu_q, gu_s, dn_q, dn_s, impl=impl, config=cfg)
            )
            t, out = timeit(fn, x, weights, ids.astype(jnp.int32), reps=0 if small else reps)
            flops = 2.0 * tokens * problem.top_k * (2 * f * d + d * f)
            r = dict(base, variant="ffn_fp8", time_us=t * 1e6, TFLOPs=flops / t / 1e12)
            if small:
                ref = fp8_gmm.fp8_expert_ffn_fused(x, weights, ids, gu_q, gu_s, dn_q, dn_s, impl="reference")
                r["rel_err"] = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                r["note"] = "rel_err vs the reference path"
        except Exception as ex:  # noqa: BLE001
            r = dict(base, variant="ffn_fp8", note=short_error(ex))
        report["results"].append(r)
        print(format_row(r), flush=True)
        write_json(out_path, report)


HEADER = (
    f"{'gemm':8} {'tokens':>6} {'rows':>6} {'variant':18} {'time us':>10} {'TFLOP/s':>8} {'W TB/s':>7} "
    f"{'rel err':>8}  note"
)


def format_row(r: dict) -> str:
    def num(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    return (
        f"{r.get('gemm', ''):8} {r.get('tokens', ''):>6} {r.get('rows', ''):>6} {r['variant'][:18]:18} "
        f"{num('time_us', '10.1f'):>10} {num('TFLOPs', '8.1f'):>8} {num('weight_TBps', '7.2f'):>7} "
        f"{num('rel_err', '8.1e'):>8}  {r.get('note', '')}"
    )


def print_table(report: dict) -> None:
    print()
    print(f"FP8 grouped GEMM benchmark  {report['date']}  jax {report['jax']}  commit {report['git_commit']}")
    print(f"device {report['device']}  ceilings {json.dumps(report['ceilings'])}")
    print(HEADER)
    for r in report["results"]:
        if r["variant"].startswith("fp8_gmm["):
            continue  # the per-tiling rows are in the JSON
        print(format_row(r))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes; the kernel runs in interpret mode (CPU)")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (default: 4096 1024 256 64)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="seconds from the process start after which no more tilings are swept and the XLA peer and "
                   "the FFN rows are skipped (the report is written after every shape)")  # fmt: skip
    p.add_argument("--out", help="write the JSON report here")
    args = p.parse_args(argv)
    size_pool_for_interpret()  # (before the backend starts: on the CPU the kernels are interpreted)
    problem = SMALL if args.small else STEP3
    if args.tokens:
        problem = dataclasses.replace(problem, tokens=tuple(args.tokens))
    if not args.small and not fp8_gmm.on_hopper():
        print("warning: no Hopper GPU: the kernel rows will fail; use --small on the CPU", file=sys.stderr)
    print(HEADER, flush=True)
    try:
        report = run(problem, args.small, args.reps, args.out, args.budget_s)
    except Exception:  # noqa: BLE001 - print what we have
        traceback.print_exc()
        return 1
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
