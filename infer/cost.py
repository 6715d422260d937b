"""Decoding-cost tables, Pareto plots and AFD throughput estimates from the Step-3 paper's cost model.

python -m infer.cost                                  # Tables 2/3 (8K, 32K), 4/5, 6, deployments, 7
python -m infer.cost --context 4K 64K --hardware H800 H20 H200 --models step3 DSv3
python -m infer.cost --json                           # one object per model per context
python -m infer.cost --hardware-file my_cards.json    # add / override accelerators
python -m infer.cost pareto --out plots/              # Figure 1 and cost vs context, as PNG
python -m infer.cost afd --model step3 --context 4K --deployment 2A2F --efficiency calibrated
python -m infer.cost afd --paper-table9 H800 --batch 6144   # measured kernel times, fixed batch
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from infer.cli import positive_int
from step3_jax import cost_model as cm


def parse_context(text: str) -> int:
    """'8K' / '8k' -> 8192, '1M' -> 1048576, '5000' -> 5000."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(t[-1:], 1)
    if scale != 1:
        t = t[:-1]
    try:
        exact = float(t) * scale
        value = int(exact)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"bad context length {text!r}; use e.g. 8192 or 8K") from None
    if value != exact:
        raise argparse.ArgumentTypeError(f"context length {text!r} is not a whole number of tokens ({exact:g})")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"context length must be positive, got {text!r}")
    return value


def fmt_ctx(context: int) -> str:
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def _common(p: argparse.ArgumentParser, default_contexts: list[str]) -> None:
    p.add_argument("--context", nargs="+", type=parse_context, default=[parse_context(c) for c in default_contexts])
    p.add_argument("--models", nargs="+", default=None, help="names, display names or spec JSON paths")
    p.add_argument("--hardware", nargs="+", default=None, help="accelerator names (default: the paper's four)")
    p.add_argument("--hardware-file", type=Path, default=None, help="JSON with extra / overriding accelerators")


def _load(args: argparse.Namespace) -> tuple[list[cm.ModelSpec], dict[str, cm.Hardware]]:
    extra = cm.load_hardware(args.hardware_file) if args.hardware_file else None
    hardware = cm.select_hardware(args.hardware, extra)
    models = [cm.get_model(n) for n in (args.models or cm.PAPER_MODELS)]
    return models, hardware


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "  ".join(cells)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def record(spec: cm.ModelSpec, context: int, hardware: dict[str, cm.Hardware]) -> dict:
    t = spec.token_cost(context)
    costs = cm.cost_per_mtok(spec, hardware, context)
    afd = cm.best_afd(spec, hardware, context)
    single = cm.best_single(spec, hardware, context)
    moe = spec.moe
    return {
        "model": spec.name,
        "display_name": spec.display_name,
        "context": context,
        "kv_bytes": t.kv_bytes,
        "attn_flops": t.attn_flops,
        "linear_flops": t.linear_flops,
        "ffn_flops": t.ffn_flops,
        "arithmetic_intensity": t.arithmetic_intensity,
        "activated_params": spec.activated_params(),
        "total_params": spec.total_params(),
        "moe_sparsity": moe.sparsity if moe else None,
        "cost_per_mtok": {n: {"attn": c.attn, "ffn": c.ffn} for n, c in costs.items()},
        "best_afd": {"attn_hardware": afd.attn_hardware, "ffn_hardware": afd.ffn_hardware, "cost": afd.total},
        "best_single": {"hardware": single.attn_hardware, "cost": single.total},
        "min_moe_sparsity": {
            n: cm.min_moe_sparsity(hw, spec.hidden_size, spec.num_layers) for n, hw in hardware.items()
        },
    }


def print_tables(models: list[cm.ModelSpec], hardware: dict[str, cm.Hardware], contexts: list[int]) -> None:
    hw_names = list(hardware)
    rows = []
    for hw in hardware.values():
        fp8 = f"{hw.fp8_flops:.3g}" if hw.fp8_flops else "N/A"
        src = (
            "paper"
            if all("paper" in hw.sources.get(k, "") for k in ("price_per_hour", "memory_bandwidth"))
            else ("datasheet/assumed")
        )
        rows.append(
            [
                hw.name,
                f"{hw.price_per_hour:g}",
                f"{hw.bf16_flops:.3g}",
                fp8,
                f"{hw.memory_bandwidth:.3g}",
                f"{hw.roofline:.0f}",
                f"{hw.cost_per_flop:.3g}",
                f"{hw.cost_per_byte:.3g}",
                f"{hw.network_bandwidth * 8 / 1e9:g} Gb/s",
                src,
            ]
        )
    print("Accelerators (paper Tables 4 and 5; costs use FP8 FLOP/s where supported)")
    print(
        _table(
            rows,
            [
                "card",
                "USD/h",
                "BF16 FLOP/s",
                "FP8 FLOP/s",
                "HBM B/s",
                "roofline",
                "USD/FLOP",
                "USD/byte",
                "NIC/card",
                "source",
            ],
        )
    )
    for ctx in contexts:
        rows = []
        for s in models:
            t = s.token_cost(ctx)
            rows.append(
                [
                    s.display_name,
                    f"{t.kv_bytes:.2e}",
                    f"{t.attn_flops:.2e}",
                    f"{t.linear_flops:.2e}",
                    f"{t.ffn_flops:.2e}",
                    f"{t.arithmetic_intensity:.1f}",
                    f"{s.activated_params() / 1e9:.1f}B",
                ]
            )
        print(f"\nPer decoded token at {fmt_ctx(ctx)} context (paper Tables 2/3)")
        print(_table(rows, ["model", "KV/state bytes", "attn FLOPs", "linear FLOPs", "FFN FLOPs", "attn AI", "active"]))
    rows = []
    for s in models:
        row = [s.display_name]
        for ctx in contexts:
            costs = cm.cost_per_mtok(s, hardware, ctx)
            row += [f"{costs[n].attn:.3f}" for n in hw_names]
        costs = cm.cost_per_mtok(s, hardware, contexts[0])
        rows.append(row + [f"{costs[n].ffn:.3f}" for n in hw_names])
    header = ["model"] + [f"attn {fmt_ctx(c)} {n}" for c in contexts for n in hw_names] + [f"FFN {n}" for n in hw_names]
    print("\nDecoding cost, USD per 1M tokens (paper Table 6)")
    print(_table(rows, header))
    rows = []
    for s in models:
        for ctx in contexts:
            single = cm.best_single(s, hardware, ctx)
            afd = cm.best_afd(s, hardware, ctx)
            rows.append(
                [
                    s.display_name,
                    fmt_ctx(ctx),
                    single.label,
                    f"{single.total:.3f}",
                    afd.label,
                    f"{afd.total:.3f}",
                    f"{1 - afd.total / single.total:.0%}",
                ]
            )
    print("\nBest deployment, USD per 1M tokens: one accelerator type vs AFD (cheapest card per part)")
    print(_table(rows, ["model", "ctx", "single", "cost", "AFD", "cost", "AFD saving"]))
    rows = []
    for s in models:
        moe = s.moe
        row = [s.display_name, str(s.hidden_size), str(s.num_layers), f"{moe.sparsity:.3f}" if moe else "dense"]
        for hw in hardware.values():
            smin = cm.min_moe_sparsity(hw, s.hidden_size, s.num_layers)
            row.append(f"{smin:.3f}" + ("" if not moe or moe.sparsity >= smin else "*"))
        rows.append(row)
    print(
        "\nMinimum MoE sparsity for roofline FFN with the network hidden (paper Table 7 uses H=7168, L=61; "
        "50 ms TPOT, 3 stages, FP8 dispatch + BF16 combine; * = model sparser than the card allows)"
    )
    print(_table(rows, ["model", "H", "L", "model S"] + hw_names))


def main_tables(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m infer.cost",
        description=__doc__.split("\n")[0],
        epilog="subcommands: `python -m infer.cost pareto --help` (Figure 1 and cost vs context), "
        "`python -m infer.cost afd --help` (AFD throughput estimate)",
    )
    _common(p, ["8K", "32K"])
    p.add_argument("--json", action="store_true", help="emit a JSON list, one object per model per context")
    args = p.parse_args(argv)
    models, hardware = _load(args)
    if args.json:
        print(json.dumps([record(s, c, hardware) for s in models for c in args.context], indent=2))
    else:
        print_tables(models, hardware, args.context)
    return 0


def main_pareto(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.cost pareto", description="Figure 1 and cost vs context")
    _common(p, ["8K"])
    p.add_argument(
        "--sweep",
        nargs="+",
        type=parse_context,
        default=[parse_context(c) for c in ("4K", "8K", "16K", "32K", "64K", "128K")],
        help="contexts for the cost-vs-context plot",
    )
    p.add_argument("--out", type=Path, default=Path("."), help="output folder")
    args = p.parse_args(argv)
    from matplotlib.figure import Figure

    models, hardware = _load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for ctx in args.context:  # one Figure-1 chart per context
        fig = Figure(figsize=(6.4, 4.8))
        ax = fig.subplots()
        for s in models:
            cost = cm.best_afd(s, hardware, ctx).total
            act = s.activated_params() / 1e9
            ax.scatter(cost, act, color="C3" if s.name == "step3" else "C0")
            ax.annotate(s.display_name, (cost, act), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"Theoretical decoding cost, USD per 1M tokens, {fmt_ctx(ctx)} context (best AFD)")
        ax.set_ylabel("Activated parameters (B)")
        ax.set_title(f"Activated parameters vs decoding cost ({', '.join(hardware)})", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        written.append(args.out / f"pareto_{fmt_ctx(ctx)}.png")
        fig.savefig(written[-1], dpi=120)

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.subplots()
    for s in models:
        costs = [cm.best_afd(s, hardware, c).total for c in args.sweep]
        ax.plot(
            [c / 1024 for c in args.sweep],
            costs,
            marker="o",
            label=s.display_name,
            linewidth=2.5 if s.name == "step3" else 1.2,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("Context length (K tokens)")
    ax.set_ylabel("USD per 1M decoded tokens (best AFD)")
    ax.set_title("Decoding cost vs context", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    sweep = args.out / "cost_vs_context.png"
    fig.savefig(sweep, dpi=120)
    print(f"wrote {', '.join(map(str, written))} and {sweep}")
    return 0


def _parse_deployment(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)A(\d+)F", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"deployment must look like 2A2F, got {text!r}")
    return int(match[1]), int(match[2])


def _check_kernel_times(kt: cm.KernelTimes, spec, attn_hw, ffn_hw, cards) -> None:
    """Kernel times measured for another card or model than the estimate's would mix two machines: refused
    (names in any case; ``cards``: every known card, --hardware-file's included; the FFN side is checked when the
    file has FFN records, else it takes the roofline of its own card). A file that names no known card or model,
    e.g. a CPU smoke run, is taken as it is."""
    hardware = str(kt.hardware or "")
    if hardware.lower() in {n.lower() for n in cards}:
        if hardware.lower() != attn_hw.name.lower():
            raise ValueError(
                f"the kernel times ({kt.source}) were measured on {hardware}, but the attention side is "
                f"{attn_hw.name}: pass --attn-hw {hardware}"
            )
        if kt.ffn_coef is not None and hardware.lower() != ffn_hw.name.lower():
            raise ValueError(
                f"the kernel times ({kt.source}) have FFN records measured on {hardware}, but the FFN side is "
                f"{ffn_hw.name}: pass --ffn-hw {hardware}, or kernel times without FFN records (the FFN roofline)"
            )
    try:
        model = cm.get_model(str(kt.model)).name if kt.model else None
    except ValueError:  # (not a known model)
        model = None
    if model is not None and model != spec.name:
        raise ValueError(f"the kernel times ({kt.source}) are for model {kt.model!r}, not {spec.name!r}")


def main_afd(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m infer.cost afd", description="AFD throughput estimate")
    p.add_argument("--model", default="step3")
    p.add_argument("--context", type=parse_context, default=4096)
    p.add_argument("--deployment", type=_parse_deployment, default=(2, 2), help="M:N as 2A2F")
    p.add_argument("--attn-hw", default="H800")
    p.add_argument("--ffn-hw", default=None, help="default: same as --attn-hw")
    p.add_argument("--hardware-file", type=Path, default=None)
    p.add_argument("--gpus-per-instance", type=int, default=8)
    p.add_argument("--tpot-ms", type=float, default=cm.PAPER_TPOT_S * 1e3)
    p.add_argument("--stages", type=int, default=cm.PAPER_STAGES)
    p.add_argument(
        "--bf16-attention",
        action="store_true",
        help="core attention math at the BF16 FLOP rate instead of FP8 (the KV cache stays FP8; it matters only "
        "where attention is compute-bound)",
    )
    p.add_argument("--batch", type=positive_int, default=None, help="evaluate this total batch instead of searching")
    p.add_argument("--efficiency", choices=("ideal", "calibrated"), default="calibrated")
    p.add_argument("--eff", nargs="*", default=[], metavar="FIELD=VALUE", help="override Efficiency fields")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--kernel-times", type=Path, default=None, help="benchmark JSON with per-layer times")
    src.add_argument("--paper-table9", metavar="CARD", default=None, help="use the paper's Table 9 MFA timings")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    extra = cm.load_hardware(args.hardware_file) if args.hardware_file else None
    pool = cm.select_hardware([args.attn_hw] + ([args.ffn_hw] if args.ffn_hw else []), extra)
    attn_hw = pool[next(n for n in pool if n.lower() == args.attn_hw.lower())]
    ffn_hw = pool[next(n for n in pool if n.lower() == args.ffn_hw.lower())] if args.ffn_hw else attn_hw
    spec = cm.get_model(args.model)
    eff = cm.Efficiency() if args.efficiency == "ideal" else cm.CALIBRATED_EFFICIENCY
    overrides = {}
    for item in args.eff:
        key, _, value = item.partition("=")
        fields = [f.name for f in dataclasses.fields(cm.Efficiency)]
        if key not in fields:
            p.error(f"--eff: unknown efficiency field {key!r}; known: {', '.join(fields)}")
        try:
            overrides[key] = float(value)
        except ValueError:
            p.error(f"--eff {key}: needs a number, as {key}=0.8, got {value!r}")
    eff = dataclasses.replace(eff, **overrides)
    kt = None
    if args.kernel_times:
        kt = cm.load_kernel_times(args.kernel_times)
    elif args.paper_table9:
        kt = cm.paper_table9_kernel_times(args.paper_table9)
    setup = cm.AFDSetup(
        *args.deployment,
        gpus_per_instance=args.gpus_per_instance,
        tpot_s=args.tpot_ms / 1e3,
        stages=args.stages,
        attention_fp8=not args.bf16_attention,
    )
    if kt is not None:
        _check_kernel_times(kt, spec, attn_hw, ffn_hw, {**cm.default_hardware(), **(extra or {})})
    if args.batch is not None:
        est = cm.evaluate_afd(spec, args.context, args.batch, attn_hw, ffn_hw, setup, eff, kt)
    else:
        est = cm.estimate_afd_throughput(spec, args.context, attn_hw, ffn_hw, setup, eff, kt)
    out = {
        "model": spec.name,
        "context": args.context,
        "deployment": setup.label,
        "gpus": setup.total_gpus,
        "attention_hardware": attn_hw.name,
        "ffn_hardware": ffn_hw.name,
        "method": est.method,
        "kernel_times_caveat": kt.caveat if kt is not None else None,
        "efficiency": dataclasses.asdict(eff),
        "feasible": est.feasible,
        "micro_batch": est.micro_batch,
        "total_batch": est.total_batch,
        "tpot_ms": est.tpot_s * 1e3,
        "tokens_per_gpu_s": est.tokens_per_gpu_s,
        "tokens_per_gpu_s_at_target": est.tokens_per_gpu_s_at_target,
        "limit": est.bottleneck,
        "per_layer_us": dataclasses.asdict(est.mean_layer),
        "stage_budget_us": cm.stage_budget_us(spec, setup.tpot_s, setup.stages),
        "attention_card_gb": est.attention_memory_bytes / 1e9,
        "ffn_card_gb": est.ffn_memory_bytes / 1e9,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(
        f"{spec.display_name}, {fmt_ctx(args.context)} context, {setup.label} ({setup.total_gpus} cards: "
        f"attention {attn_hw.name}, FFN {ffn_hw.name}), TPOT target {args.tpot_ms:g} ms, {setup.stages} stages"
    )
    print(f"method: {est.method}; efficiency: {dataclasses.asdict(eff)}")
    if out["kernel_times_caveat"]:
        print(f"note: {out['kernel_times_caveat']}")
    if not est.micro_batch:
        print(
            f"no feasible batch: even one sequence per attention card ({setup.stages} x "
            f"{setup.attention_instances * setup.gpus_per_instance}) is over: {est.bottleneck}; the figures below "
            f"are for that batch"
        )
    else:
        print(f"batch: {est.total_batch} ({setup.stages} x {est.micro_batch:g}); limit: {est.bottleneck}")
    lt = est.mean_layer
    print(
        f"per layer per micro-batch: attention {lt.attention_us:.0f} us, communication {lt.communication_us:.0f} us,"
        f" FFN {lt.ffn_us:.0f} us (budget {out['stage_budget_us']:.0f} us)"
    )
    print(f"memory per card: attention {out['attention_card_gb']:.1f} GB, FFN {out['ffn_card_gb']:.1f} GB")
    at_target = est.tokens_per_gpu_s_at_target
    print(
        f"TPOT {est.tpot_s * 1e3:.1f} ms -> {est.tokens_per_gpu_s:,.0f} tokens/GPU/s"
        + (f" ({at_target:,.0f} if run at exactly the TPOT target)" if at_target is not None else "")
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv and argv[0] == "pareto":
            return main_pareto(argv[1:])
        if argv and argv[0] == "afd":
            return main_afd(argv[1:])
        return main_tables(argv)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
