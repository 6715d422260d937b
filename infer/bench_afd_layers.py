"""AFD per-layer step times (not a test): the attention side and the FFN side of one layer, each on one device at
the per-GPU shapes of the paper's 2A2F deployment, written as the cost model's kernel-times JSON.

    python -m infer.bench_afd_layers --out afd_layers.json                 # accelerator (H200): Step-3 widths
    python -m infer.bench_afd_layers --small --out /tmp/afd_layers.json    # CPU smoke run: narrow widths, tiny sizes
    python -m infer.cost afd --attn-hw H200 --kernel-times afd_layers.json # the cost model with these times

One device cannot show disaggregation, but under AFD each side's per-layer step is a program of its own. The
programs timed are the AFD runner's (``infer.afd.attention_program`` / ``ffn_program`` around ``attention_stage`` /
``ffn_stage``, which call the model's ``DecoderLayer.attention``, ``MoE.route`` and ``DecoderLayer.ffn``) on one
layer whose halves are split as the runner splits them (``infer.afd.is_ffn_param``), random weights (block FP8
with ``quantization="fp8"``: FFN, experts and, where the model has them, the MFA projections):

* attention side, one attention GPU and micro-batch: residual add, input norm, MFA (projections, rope, write of
  the new token into the paged KV cache, the MFA decode kernel over ``context`` cached tokens, o_proj), residual,
  post-attention norm, router top-k, FP8 quantisation and packing of the A->F message;
* FFN side, one FFN GPU and micro-batch: unpack, FP8 dequantisation, the routed experts it holds (grouped FP8
  GEMMs on the sent routing) and the shared expert, output in BF16.

Shapes (paper 7.3, "2A2F": 2 attention + 2 FFN instances of 8 GPUs, total batch 6,144 in 3 micro-batches of
2,048 at 4K context; the cost model's ``AFDSetup(2, 2)``): each attention GPU runs 2,048 / (2 x 8) = 128
sequences per micro-batch; the 48 experts spread over the 2 x 8 FFN GPUs, 3 per GPU, which see 2,048 x 3 / 16 =
384 routed rows; the cost model also spreads the shared expert's work evenly over the FFN GPUs (2,048 / 16 = 128
tokens' worth per GPU). So the FFN step is 128 tokens, each routed to top-3 of the GPU's 3 experts, plus the shared
expert on those 128 tokens: exactly the per-GPU FLOPs the cost model charges (its weight bytes: one whole shared
expert per GPU where the cost model counts 1/16 of it). The records hold it as ``tokens`` = micro-batch per FFN
instance (8 x the per-GPU tokens: 1,024 at the 2A2F point), the unit of ``KernelTimes.ffn_us``; valid for
deployments with 16 FFN GPUs (3 experts each). Several sizes are measured so the cost model's linear fits are
determined. Times: median over ``repeats`` of ``iters`` chained calls after a warm-up call, with
``block_until_ready``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from infer import afd
from infer.bench_decode import timeit
from infer.cli import positive_int
from pallas_kernels.bench_common import Budget, git_commit, short_error, write_json
from step3_jax import cost_model as cm
from step3_jax.config import STEP3, Step3Config
from step3_jax.init_rng import init_key
from step3_jax.model import DecoderLayer, ShardCtx
from step3_jax.quant import quantize_per_token

PAPER_TOTAL_BATCH = 6144  # paper 7.3: 2A2F, 3 micro-batches of 2,048
PAPER_CONTEXT = 4096
KV_LABEL = {"bfloat16": "BF16", "float8_e4m3fn": "FP8"}
ROUTINGS = ("uniform", "skewed")


# ---------------------------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class AFDPoint:
    """Per-GPU work of an M:N AFD deployment at a total batch (paper 7.3; the cost model's ``afd_layer_times``)."""

    setup: cm.AFDSetup
    total_batch: int
    num_experts: int
    top_k: int

    @property
    def micro_batch(self) -> float:
        return self.total_batch / self.setup.stages

    @property
    def attention_gpus(self) -> int:
        return self.setup.attention_instances * self.setup.gpus_per_instance

    @property
    def ffn_gpus(self) -> int:
        return self.setup.ffn_instances * self.setup.gpus_per_instance

    @property
    def sequences_per_attention_gpu(self) -> float:
        return self.micro_batch / self.attention_gpus

    @property
    def experts_per_ffn_gpu(self) -> int:
        if self.num_experts % self.ffn_gpus:
            raise ValueError(f"{self.num_experts} experts do not split evenly over {self.ffn_gpus} FFN GPUs")
        return self.num_experts // self.ffn_gpus

    @property
    def tokens_per_ffn_gpu(self) -> float:
        """Each FFN GPU's share of the micro-batch's activated FFN work, in tokens (routed top-k + shared)."""
        return self.micro_batch / self.ffn_gpus

    @property
    def routed_rows_per_ffn_gpu(self) -> float:
        return self.micro_batch * self.top_k / self.ffn_gpus

    def ffn_record_tokens(self, tokens_per_gpu: float) -> float:
        """``KernelTimes.ffn_us``'s argument (micro-batch per FFN instance) for a per-GPU token count."""
        return tokens_per_gpu * self.setup.gpus_per_instance

    def describe(self) -> dict:
        return {
            "deployment": self.setup.label,
            "gpus_per_instance": self.setup.gpus_per_instance,
            "total_batch": self.total_batch,
            "stages": self.setup.stages,
            "micro_batch": self.micro_batch,
            "sequences_per_attention_gpu": self.sequences_per_attention_gpu,
            "experts_per_ffn_gpu": self.experts_per_ffn_gpu,
            "tokens_per_ffn_gpu": self.tokens_per_ffn_gpu,
            "routed_rows_per_ffn_gpu": self.routed_rows_per_ffn_gpu,
            "ffn_record_tokens": self.ffn_record_tokens(self.tokens_per_ffn_gpu),
        }


def paper_point(config: Step3Config = STEP3) -> AFDPoint:
    return AFDPoint(cm.AFDSetup(2, 2), PAPER_TOTAL_BATCH, config.moe_num_experts, config.moe_top_k)


def layer_config(small: bool, fp8: bool) -> Step3Config:
    """One MoE layer with Step-3's widths (``small``: the same structure, 48 experts top-3, narrow widths)."""
    if small:
        base = Step3Config(
            hidden_size=256,
            num_hidden_layers=1,
            vocab_size=512,
            num_attention_heads=4,
            head_dim=64,
            share_q_dim=128,
            intermediate_size=256,
            moe_num_experts=STEP3.moe_num_experts,
            moe_top_k=STEP3.moe_top_k,
            moe_intermediate_size=128,
            share_expert_dim=128,
            moe_layers_enum=(0,),
            max_position_embedding=4096,
        )
    else:
        base = dataclasses.replace(STEP3, num_hidden_layers=1, moe_layers_enum=(0,))
    return dataclasses.replace(base, quantization="fp8" if fp8 else None)


def ffn_gpu_config(config: Step3Config, point: AFDPoint) -> Step3Config:
    """The layer as one FFN GPU holds it: its own experts only (ids 0 .. experts_per_ffn_gpu - 1)."""
    local = point.experts_per_ffn_gpu
    if local < config.moe_top_k:
        raise ValueError(f"{local} experts per FFN GPU is fewer than top-{config.moe_top_k}: not modelled here")
    return dataclasses.replace(config, moe_num_experts=local)


def layer_half(config: Step3Config, ffn_side: bool, seed: int = 0):
    """``(graphdef, the other half's abstract state, this half's parameters)`` of one ``DecoderLayer`` split as the
    AFD runner splits it; only this half is materialised (the other half's initialisers are dead code)."""

    def build(rngs):
        return DecoderLayer(config, 0, rngs=rngs, ctx=ShardCtx())

    gd, abs_ffn, abs_attn = nnx.split(nnx.eval_shape(lambda: build(nnx.Rngs(0))), afd.is_ffn_param, ...)

    def init(seed):
        _, ffn, attn = nnx.split(build(nnx.Rngs(init_key(seed))), afd.is_ffn_param, ...)
        return ffn if ffn_side else attn

    params = jax.jit(init)(jnp.asarray(seed, jnp.int32))
    return gd, (abs_attn if ffn_side else abs_ffn), params


# ---------------------------------------------------------------------------------------------- the two sides


def _check_finite(name: str, x: jax.Array) -> None:
    x = np.asarray(x.astype(jnp.float32))
    if not np.isfinite(x).all() or not np.abs(x).max() > 0:
        raise RuntimeError(f"{name}: output is not finite or all zero; the timing would be meaningless")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _random_pages(key, shape: tuple[int, ...], dtype: str):
    """Random K and V pages ``shape`` in ``dtype`` (FP8: per-token scales, the cache's format) as one program."""
    out = []
    for sub in jax.random.split(key):
        x = jax.random.normal(sub, shape, jnp.float32)
        out.append(quantize_per_token(x) if dtype == "float8_e4m3fn" else (x.astype(dtype), None))
    (k, ks), (v, vs) = out
    return k, v, ks, vs


def random_cache(config: Step3Config, batch: int, context: int, page_size: int, kv_dtype: str, seed: int = 0):
    """One layer's paged KV cache holding ``batch`` sequences of ``context`` random tokens plus a page slot for the
    next one: ``((k, v, k_scale, v_scale) pages, block table)``, pages shuffled over the pool."""
    pages_per_seq = -(-(context + 1) // page_size)
    num_pages = batch * pages_per_seq
    shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
    pages = _random_pages(jax.random.key(seed), shape, kv_dtype)
    table = np.random.default_rng(seed).permutation(num_pages).reshape(batch, pages_per_seq).astype(np.int32)
    return pages, jnp.asarray(table)


def bench_attention(
    program,
    params,
    config: Step3Config,
    batch: int,
    context: int,
    page_size: int,
    kv_dtype: str,
    *,
    iters: int,
    repeats: int,
    seed: int = 0,
) -> float:
    """Seconds per attention-side step for ``batch`` sequences holding ``context`` tokens (the new one is written
    at slot ``context``); the page pool is threaded through the calls (donated, updated in place)."""
    pages, table = random_cache(config, batch, context, page_size, kv_dtype, seed=seed)
    k1, k2 = jax.random.split(jax.random.key(seed + 1))
    d = config.hidden_size
    x = jax.random.normal(k1, (batch, 1, d), jnp.float32).astype(config.dtype)
    f = (0.5 * jax.random.normal(k2, (batch, 1, d), jnp.float32)).astype(config.dtype)  # previous FFN output
    start = jnp.full((batch,), context, jnp.int32)
    positions = start[:, None]
    h, message, pages = program(params, x, f, positions, pages, table, start)
    _check_finite("attention side", h)

    def step(pages):
        return program(params, x, f, positions, pages, table, start)[2]

    return timeit(step, pages, iters=iters, repeats=repeats)


def routing(tokens: int, top_k: int, local_experts: int, kind: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(weights [tokens, 1, k] float32, ids [tokens, 1, k] int32)`` over an FFN GPU's local experts.

    ``uniform``: each token's k distinct experts drawn uniformly (exactly balanced when the GPU holds k experts);
    ``skewed``: each slot drawn independently with probabilities 1 : 1/2 : 1/3 ... (repeats allowed), a load
    imbalance to compare with, not a realistic per-token routing."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        ids = np.stack([rng.permutation(local_experts)[:top_k] for _ in range(tokens)])
    elif kind == "skewed":
        p = 1.0 / np.arange(1, local_experts + 1)
        ids = rng.choice(local_experts, size=(tokens, top_k), p=p / p.sum())
    else:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {kind!r}")
    weights = rng.uniform(0.05, 0.5, size=(tokens, top_k))
    return weights[:, None].astype(np.float32), ids[:, None].astype(np.int32)


def ffn_message(config: Step3Config, tokens: int, transfer: str, kind: str, seed: int = 0):
    """The A->F message one FFN GPU receives (the runner's encoding and packing) and its expert group sizes."""
    normed = jax.random.normal(jax.random.key(seed + 2), (tokens, 1, config.hidden_size), jnp.float32)
    fields = afd.encode(normed.astype(config.dtype), transfer)
    weights, ids = routing(tokens, config.moe_top_k, config.moe_num_experts, kind, seed)
    fields["weights"], fields["ids"] = jnp.asarray(weights), jnp.asarray(ids)
    return afd.pack(fields), np.bincount(ids.reshape(-1), minlength=config.moe_num_experts).tolist()


def bench_ffn(program, params, message, *, iters: int, repeats: int) -> float:
    """Seconds per FFN-side step on one A->F message."""
    (out,) = program(params, (message,))
    _check_finite("FFN side", out)
    return timeit(lambda _: program(params, (message,)), None, iters=iters, repeats=repeats)


def transfer_bytes(config: Step3Config, transfer: str, point: AFDPoint) -> dict:
    """Wire bytes of one MoE layer (paper 7.1: every token broadcast to every FFN instance, FP8 hidden + scales +
    top-k weights and ids; the FFN output back in BF16 from every FFN instance)."""
    a2f = afd.message_struct(afd.payload_struct(config, transfer, True, 1, 1)).shape[-1]
    x_bytes = config.hidden_size * {"fp8": 1, "bf16": 2, "model": config.dtype.itemsize}[transfer]
    f2a = config.hidden_size * jnp.dtype(afd.return_dtype(config, transfer)).itemsize
    seqs, n_ffn = point.sequences_per_attention_gpu, point.setup.ffn_instances
    return {
        "a2f_bytes_per_token": a2f,
        "a2f_hidden_bytes_per_token": x_bytes,
        "a2f_metadata_bytes_per_token": a2f - x_bytes,  # scales + top-k weights and ids
        "f2a_bytes_per_token": f2a,
        "dispatch_bytes_per_element": a2f / config.hidden_size,  # AFDSetup.dispatch_bytes incl. the metadata
        "combine_bytes_per_element": f2a / config.hidden_size,
        "attention_gpu_sends_per_layer": seqs * a2f * n_ffn,
        "attention_gpu_receives_per_layer": seqs * f2a * n_ffn,
        "ffn_instance_receives_per_layer": point.micro_batch * a2f,
        "ffn_instance_sends_per_layer": point.micro_batch * f2a,
    }


# ---------------------------------------------------------------------------------------------- cost model


def estimates(
    kernel_times: dict[str, cm.KernelTimes], hardware: str, wire: dict, context: int = PAPER_CONTEXT
) -> list[dict]:
    """Step-3 2A2F throughput (largest batch within the 50 ms TPOT; and TPOT at the paper's 6,144) with each
    measured kernel-times set, the paper's Table 9 times (H800) and the calibrated roofline, communication from
    the measured wire format. ``kernel_times`` maps a KV dtype to its fit."""
    pool = cm.select_hardware(list(dict.fromkeys([hardware, "H800"])))
    hw = pool[next(n for n in pool if n.lower() == hardware.lower())]
    setup = cm.AFDSetup(
        2, 2, dispatch_bytes=wire["dispatch_bytes_per_element"], combine_bytes=wire["combine_bytes_per_element"]
    )
    eff = cm.CALIBRATED_EFFICIENCY
    cases = [(f"measured, {KV_LABEL.get(kv, kv)} KV", hw, kt, kv) for kv, kt in kernel_times.items()]
    cases += [("paper Table 9 (H800 times)", pool["H800"], cm.paper_table9_kernel_times("H800"), "float8_e4m3fn")]
    cases += [(f"calibrated roofline ({n})", pool[n], None, "float8_e4m3fn") for n in dict.fromkeys([hw.name, "H800"])]
    rows = []
    for label, card, kt, kv in cases:
        spec = cm.step3_spec(kv_bytes=jnp.dtype(kv).itemsize)
        try:
            best = cm.estimate_afd_throughput(spec, context, card, card, setup, eff, kt)
            fixed = cm.evaluate_afd(spec, context, PAPER_TOTAL_BATCH, card, card, setup, eff, kt)
        except ValueError as e:  # (a fit the cost model refuses at these sizes: that row says so, the rest stand)
            rows.append({"label": label, "hardware": card.name, "error": short_error(e, limit=500)})
            continue
        rows.append(
            {
                "label": label,
                "hardware": card.name,
                "method": best.method,
                "total_batch": best.total_batch,
                "tokens_per_gpu_s": best.tokens_per_gpu_s,
                "limit": best.bottleneck,
                "paper_batch_tpot_ms": fixed.tpot_s * 1e3,
                "paper_batch_tokens_per_gpu_s": fixed.tokens_per_gpu_s,
                "paper_batch_per_layer_us": dataclasses.asdict(fixed.mean_layer),
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------- CLI


def _points(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        b, _, c = item.lower().partition("x")
        out.append((int(b), int(c)))
    return out


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def _hardware_name(device) -> str | None:
    kind = str(device.device_kind).upper()
    names = sorted(cm.default_hardware(), key=len, reverse=True)
    return next((n for n in names if n.upper() in kind), None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.bench_afd_layers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="narrow widths and tiny sizes (CPU smoke run)")
    ap.add_argument("--out", default="afd_layers.json", help="kernel-times JSON path")
    ap.add_argument("--attention-points", type=_points, default=None,
                    help="comma-separated SEQUENCESxCONTEXT per attention GPU (first = headline)")  # fmt: skip
    ap.add_argument("--ffn-tokens", type=_ints, default=None, help="comma-separated tokens per FFN GPU")
    ap.add_argument("--kv-dtypes", default="float8_e4m3fn,bfloat16",
                    help="KV cache dtypes; the first one's attention times become the records")  # fmt: skip
    ap.add_argument("--transfer", default="fp8", choices=afd.TRANSFERS, help="A->F hidden-state format")
    ap.add_argument("--routing", default="uniform", choices=ROUTINGS)
    ap.add_argument("--page-size", type=positive_int, default=None)
    ap.add_argument("--no-fp8", action="store_true", help="BF16 weights instead of block FP8")
    ap.add_argument("--iters", type=positive_int, default=None, help="chained calls per timed repeat")
    ap.add_argument("--repeats", type=positive_int, default=None, help="timed repeats (the median is kept)")
    ap.add_argument("--hardware", default=None, help="cost-model accelerator for the estimates (default: this "
                    "device's if known, else H200)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=75.0,
                    help="seconds from the process start after which the further KV dtypes are skipped "
                    "(0: no limit)")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    small = args.small
    config = layer_config(small, fp8=not args.no_fp8)
    point = paper_point(config)
    try:
        ffn_config = ffn_gpu_config(config, point)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head_seqs = round(point.sequences_per_attention_gpu)
    head_tokens = round(point.tokens_per_ffn_gpu)
    attn_points = args.attention_points or (
        [(2, 64), (4, 64), (2, 128)]
        if small
        else [(head_seqs, PAPER_CONTEXT), (2 * head_seqs, PAPER_CONTEXT), (head_seqs, 2 * PAPER_CONTEXT)]
    )
    ffn_tokens = args.ffn_tokens or ([2, 4, 8] if small else [head_tokens // 2, head_tokens, 2 * head_tokens])
    kv_dtypes = [k.strip() for k in args.kv_dtypes.split(",") if k.strip()]
    bad = [k for k in kv_dtypes if k not in KV_LABEL]
    if bad or not kv_dtypes:
        print(f"error: --kv-dtypes takes {sorted(KV_LABEL)}, got {args.kv_dtypes!r}", file=sys.stderr)
        return 2
    if len({b * c for b, c in attn_points}) < 2 or len(set(ffn_tokens)) < 2:
        print("error: the cost model's fits need >= 2 attention sizes (sequences x context) and >= 2 FFN token "
              "counts", file=sys.stderr)  # fmt: skip
        return 2
    page_size = args.page_size or (16 if small else 64)  # the FP8-KV decode kernel needs pages of >= 64 tokens
    iters = args.iters or (3 if small else 20)
    repeats = args.repeats or 5
    device = jax.devices()[0]
    hardware = args.hardware or _hardware_name(device) or "H200"
    try:  # (a typo fails now, not after every measurement)
        cm.select_hardware([hardware])
    except ValueError as e:
        print(f"error: --hardware: {e}", file=sys.stderr)
        return 2

    print(
        f"AFD per-layer steps on one {device.device_kind} ({device.platform}), jax {jax.__version__}: "
        f"{'SMALL smoke run (narrow widths, not performance)' if small else 'Step-3 widths'}; hidden "
        f"{config.hidden_size}, {config.num_attention_heads} heads x {config.head_dim}, weights "
        f"{'block FP8' if config.quantization else 'BF16'}, A->F {args.transfer}"
    )
    print(
        f"paper 2A2F point: micro-batch {point.micro_batch:.0f} -> {point.sequences_per_attention_gpu:.0f} sequences "
        f"per attention GPU at {PAPER_CONTEXT} context; {point.experts_per_ffn_gpu} experts and "
        f"{point.routed_rows_per_ffn_gpu:.0f} routed rows ({point.tokens_per_ffn_gpu:.0f} tokens + shared expert) "
        f"per FFN GPU"
    )

    budget = Budget(args.budget_s or None)
    gd, abs_ffn, attn_params = layer_half(config, ffn_side=False, seed=args.seed)
    attn_program = afd.attention_program(gd, abs_ffn, args.transfer, moe=True)

    def measure_attention(kv: str, optional: bool) -> list[dict]:
        out = []
        for b, ctx in attn_points:
            if optional and budget.over():
                print(f"  ({KV_LABEL[kv]} KV: stopped at the --budget-s of {args.budget_s:g} s)", flush=True)
                return out if len({r["tokens_per_gpu"] * r["context"] for r in out}) >= 2 else []
            t = bench_attention(attn_program, attn_params, config, b, ctx, page_size, kv, iters=iters,
                                repeats=repeats, seed=args.seed)  # fmt: skip
            out.append({"component": "attention", "tokens_per_gpu": b, "context": ctx, "time_us": t * 1e6,
                        "note": f"{KV_LABEL[kv]} KV, pages of {page_size}"})  # fmt: skip
            print(f"  attention  {b:>5} seq x {ctx:>6} ctx, {KV_LABEL[kv]:>4} KV: {t * 1e6:10.1f} us/layer", flush=True)
        return out

    # the records first (attention with the first KV dtype, then the FFN), written at once; other KV dtypes after
    attention = {kv_dtypes[0]: measure_attention(kv_dtypes[0], optional=False)}
    fgd, abs_attn, ffn_params = layer_half(ffn_config, ffn_side=True, seed=args.seed)
    ffn_prog = afd.ffn_program(fgd, abs_attn, ffn_config, args.transfer, moe=True)
    ffn_records, group_sizes = [], {}
    for n in ffn_tokens:
        message, sizes = ffn_message(ffn_config, n, args.transfer, args.routing, seed=args.seed)
        t = bench_ffn(ffn_prog, ffn_params, message, iters=iters, repeats=repeats)
        group_sizes[n] = sizes
        ffn_records.append(
            {"component": "ffn", "tokens": point.ffn_record_tokens(n), "time_us": t * 1e6, "gpus": point.ffn_gpus,
             "note": f"per FFN GPU: {n} tokens, {n * config.moe_top_k} routed rows over {ffn_config.moe_num_experts} "
                     f"experts {sizes} + shared expert; tokens = x{point.setup.gpus_per_instance} per FFN instance"}
        )  # fmt: skip
        print(f"  FFN        {n:>5} tokens ({n * config.moe_top_k} routed rows {sizes}): {t * 1e6:10.1f} us/layer",
              flush=True)  # fmt: skip
    del ffn_params

    wire = transfer_bytes(config, args.transfer, point)
    stage_budget = cm.stage_budget_us(cm.step3_spec())

    def write_report() -> dict:
        fits = {
            kv: cm.kernel_times_from_records(recs + ffn_records, hardware, "step3", f"this run, {KV_LABEL[kv]} KV")
            for kv, recs in attention.items()
        }
        report = {
            "benchmark": "afd_layers",
            "hardware": hardware if not small else f"{device.device_kind} (small smoke run)",
            "model": "step3" if not small else "step3-small",
            "records": attention[kv_dtypes[0]] + ffn_records,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "device": f"{device.device_kind} ({device.platform})",
            "commit": git_commit(),
            "small": small,
            "kv_dtype": kv_dtypes[0],
            "attention_by_kv_dtype": attention,
            "transfer": args.transfer,
            "routing": args.routing,
            "ffn_group_sizes": group_sizes,
            "page_size": page_size,
            "iters": iters,
            "repeats": repeats,
            "seconds": round(budget.elapsed(), 1),  # (from the process start)
            "shapes": {
                "paper_2a2f": point.describe(),
                "attention_points": attn_points,
                "ffn_tokens_per_gpu": ffn_tokens,
            },
            "config": {k: v for k, v in dataclasses.asdict(config).items() if not isinstance(v, tuple) or len(v) < 8},
            "ffn_gpu_experts": ffn_config.moe_num_experts,
            "wire_bytes": wire,
            "stage_budget_us": stage_budget,
            "estimates": estimates(fits, hardware, wire),
        }
        write_json(args.out, report)
        return report

    write_report()
    for kv in kv_dtypes[1:]:
        if recs := measure_attention(kv, optional=True):
            attention[kv] = recs
    report = write_report()
    print_summary(report, point, stage_budget)
    print(f"\nwrote {args.out} in {report['seconds']:.0f} s  (python -m infer.cost afd --attn-hw "
          f"{hardware if not small else 'H200'} --kernel-times {args.out})")  # fmt: skip
    return 0


def print_summary(report: dict, point: AFDPoint, budget: float) -> None:
    """The headline records (the first attention point, the middle FFN size: the 2A2F point unless overridden)
    against the per-stage budget, the wire bytes and the cost model's estimates."""
    small = report["small"]
    tag = "  [CPU smoke run: narrow widths, NOT performance]" if small else ""
    print(
        f"\nper-layer step times vs the paper's per-stage budget ({budget:.0f} us = 50 ms / 3 stages / 61 layers){tag}"
    )
    for kv, recs in report["attention_by_kv_dtype"].items():
        r = recs[0]
        print(f"  attention side, {r['tokens_per_gpu']:>4} seq x {r['context']:>5} ctx, {KV_LABEL[kv]:>4} KV: "
              f"{r['time_us']:9.1f} us  ({r['time_us'] / budget:.0%} of budget)")  # fmt: skip
    ffn = report["records"][len(report["attention_by_kv_dtype"][report["kv_dtype"]]) :]
    r = ffn[len(ffn) // 2]
    n = round(r["tokens"] / point.setup.gpus_per_instance)
    print(f"  FFN side, {n:>4} tokens / {n * point.top_k} routed rows per GPU + shared:  {r['time_us']:9.1f} us  "
          f"({r['time_us'] / budget:.0%} of budget)")  # fmt: skip
    w = report["wire_bytes"]
    print(
        f"wire per token: A->F {w['a2f_bytes_per_token']} B ({w['a2f_hidden_bytes_per_token']} hidden + "
        f"{w['a2f_metadata_bytes_per_token']} scales/routing), F->A {w['f2a_bytes_per_token']} B; per attention GPU "
        f"per layer and micro-batch at the 2A2F point: sends {w['attention_gpu_sends_per_layer'] / 1e6:.2f} MB, "
        f"receives {w['attention_gpu_receives_per_layer'] / 1e6:.2f} MB (to / from {point.setup.ffn_instances} FFN "
        f"instances)"
    )
    print(f"\ncost model, Step-3 {point.setup.label} at {PAPER_CONTEXT} context, 50 ms TPOT, 3 stages, calibrated "
          f"network, wire bytes above (measured rows: the fitted records){tag}")  # fmt: skip
    print(f"  {'kernel times':<30} {'card':<6} {'batch':>6} {'tokens/GPU/s':>13} {'TPOT@6144':>10} "
          f"{'attn/comm/FFN us @6144':>24}  limit")  # fmt: skip
    for r in report["estimates"]:
        if "error" in r:
            print(f"  {r['label']:<30} {r['hardware']:<6} error: {r['error']}")
            continue
        lt = r["paper_batch_per_layer_us"]
        layers = f"{lt['attention_us']:.0f} / {lt['communication_us']:.0f} / {lt['ffn_us']:.0f}"
        print(
            f"  {r['label']:<30} {r['hardware']:<6} {r['total_batch']:>6} {r['tokens_per_gpu_s']:>13,.0f} "
            f"{r['paper_batch_tpot_ms']:>8.1f}ms {layers:>24}  {r['limit']}"
        )
    print("  (paper, Table 8: 4,039 tokens/GPU/s on 32 H800s at batch 6,144, FP8 attention)")
    if small:
        print("  (smoke run: narrow-model CPU times extrapolated to Step-3's sizes; the measured rows mean nothing)")


if __name__ == "__main__":
    sys.exit(main())
