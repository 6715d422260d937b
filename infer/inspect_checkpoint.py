"""Inspect a Hugging Face Step-3 checkpoint folder without loading its weights.

``python -m infer.inspect_checkpoint PATH [--json]`` prints the config summary, parameter counts (in the
files and of the model the config describes), a dtype breakdown, and every missing, unexpected, mis-shaped or
mis-typed key, from config.json and the safetensors headers alone. Exit status 0 when ``load_pretrained``
would load the checkpoint, 1 when it would not.
"""

from __future__ import annotations

import argparse
import json
import sys

from step3_jax.checkpoint.hf import CheckpointReport, inspect_checkpoint


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def summary(report: CheckpointReport) -> dict:
    c = report.config
    files = sorted({t.file.name for t in report.tensors.values()})
    return {
        "folder": str(report.folder),
        "files": files,
        "bytes": sum(t.nbytes for t in report.tensors.values()),
        "config": c.to_hf_config() | {"param_dtype": c.param_dtype, "quantization": c.quantization},
        "parameters": report.parameter_counts(),
        "dtypes": {k: {"tensors": v[0], "elements": v[1], "bytes": v[2]} for k, v in report.dtype_breakdown.items()},
        "vision_skipped": len(report.vision),
        "tensors_to_load": len(report.loads),
        "missing": report.missing,
        "unexpected": report.unexpected,
        "wrong_shape": report.wrong_shape,
        "wrong_dtype": report.wrong_dtype,
        "ok": report.ok,
    }


def print_report(report: CheckpointReport, hf_model_type: str | None) -> None:
    c = report.config
    s = summary(report)
    print(f"checkpoint: {s['folder']}  ({len(s['files'])} file(s), {_size(s['bytes'])})")
    print(f"model_type: {hf_model_type}")
    dense = [i for i in range(c.num_hidden_layers) if not c.is_moe_layer(i)]
    print(
        f"  hidden_size {c.hidden_size}, layers {c.num_hidden_layers} (dense {dense}, MoE {len(c.moe_layers_enum)}), "
        f"vocab {c.vocab_size}\n"
        f"  attention: {c.num_attention_heads} heads x {c.head_dim}, {c.num_attention_groups} KV head(s), "
        f"q rank {c.share_q_dim}\n"
        f"  FFN: dense {c.intermediate_size}; {c.moe_num_experts} experts top-{c.moe_top_k} of "
        f"{c.moe_intermediate_size}, shared expert {c.share_expert_dim}\n"
        f"  param_dtype: {c.param_dtype}, quantization: {c.quantization or 'none'}"
    )
    p = s["parameters"]
    print(
        f"parameters: in the files {_count(p['checkpoint_text'])} text"
        + (f" (+ {_count(p['checkpoint_fp8_scales'])} FP8 block scales)" if p["checkpoint_fp8_scales"] else "")
        + (f", {_count(p['checkpoint_vision'])} vision" if p["checkpoint_vision"] else "")
        + f"; the model of this config: {_count(p['model_total'])} total, {_count(p['model_active'])} active per token"
    )
    print("dtypes:")
    for name, row in s["dtypes"].items():
        print(
            f"  {name:8s} {row['tensors']:6d} tensors  {_count(row['elements']):>12s} elements  {_size(row['bytes'])}"
        )
    if report.vision:
        print(f"{len(report.vision)} vision tensors skipped (the text model does not use them)")
    if report.ok:
        print(f"no problems: load_pretrained would load {len(report.loads)} weights")
    else:
        print("problems (load_pretrained would refuse this checkpoint):")
        for block in report.problems():
            print("  " + block.replace("\n", "\n  "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infer.inspect_checkpoint", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="checkpoint folder (config.json + safetensors), or a .safetensors / index file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--dtype", default=None, help="parameter dtype to check against (default: torch_dtype)")
    parser.add_argument(
        "--quantization", default="auto", choices=("auto", "fp8", "none"), help="model quantization to check against"
    )
    args = parser.parse_args(argv)
    quantization = None if args.quantization == "none" else args.quantization
    try:
        report = inspect_checkpoint(args.path, dtype=args.dtype, quantization=quantization)
    except (OSError, ValueError) as e:
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary(report), indent=2))
    else:
        from step3_jax.checkpoint.hf import read_hf_config

        hf = read_hf_config(report.folder)
        text_type = hf.get("text_config", {}).get("model_type") if "text_config" in hf else None
        print_report(report, hf.get("model_type") + (f" (text: {text_type})" if text_type else ""))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
