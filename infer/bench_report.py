"""Render the benchmark scripts' JSON results as Markdown tables for ``docs/benchmarks.md``.

    python -m infer.bench_report bench_out/                          # print every table found in the folder
    python -m infer.bench_report bench_out/ --update docs/benchmarks.md

Each benchmark (``pallas_kernels.bench_mfa_decode``, ``pallas_kernels.bench_fp8_gmm``, ``infer.bench_decode``,
``infer.bench_afd_layers``) writes its own JSON; this reads them (JSON only), recognises which benchmark wrote each
from its keys, and renders one section per file headed by what makes a figure citable: date, JAX version, device
and commit. ``--update`` replaces the block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in the
Markdown file for every benchmark present (CPU smoke runs are refused there unless ``--allow-cpu``, so a table of
the docs never quietly shows interpret-mode timings as performance).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _meta(data: dict) -> dict:
    """Date, JAX version, device, commit and whether it was a CPU smoke run, whatever each script calls them."""
    commit = data.get("commit") or data.get("git_commit") or "?"
    device = str(data.get("device", "?"))
    small = bool(data.get("small", False)) or device.lower().startswith("cpu")
    date, jax_version = data.get("date", "?"), data.get("jax", "?")
    return {"date": date, "jax": jax_version, "device": device, "commit": commit, "cpu": small}


def _heading(title: str, meta: dict) -> list[str]:
    lines = [f"### {title}", "", f"{meta['date']} · JAX {meta['jax']} · {meta['device']} · commit `{meta['commit']}`"]
    if meta["cpu"]:
        lines += ["", "*CPU smoke run (small shapes, interpret mode): checks the script runs, not performance.*"]
    return lines + [""]


def render_mfa_decode(data: dict) -> list[str]:
    ceiling = data.get("ceiling_bytes_per_s")
    lines = _heading("MFA decode attention (`pallas_kernels.bench_mfa_decode`)", _meta(data))
    if ceiling:
        lines += [f"Read ceiling measured in the same run (`jnp.sum`): {ceiling / 1e12:.2f} TB/s.", ""]
    rows = []
    for r in data["rows"]:
        rows.append(
            [
                f"{r['batch']} x {r['context']}",
                r["kv"],
                r["impl"],
                _fmt(r.get("time_us"), ".1f"),
                _fmt(r.get("tb_s"), ".2f"),
                "-" if r.get("frac_ceiling") is None else f"{100 * r['frac_ceiling']:.0f}%",
                _fmt(r.get("rel_err"), ".1e"),
                _note(r) or r.get("config", "").replace("|", "/"),  # (our rows: the kernel config timed)
            ]
        )
    header = ["B x context", "KV", "implementation", "time us", "TB/s", "of ceiling", "rel err", "note"]
    return lines + _table(header, rows)


def render_fp8_gmm(data: dict) -> list[str]:
    lines = _heading("FP8 grouped GEMM (`pallas_kernels.bench_fp8_gmm`)", _meta(data))
    ceilings = data.get("ceilings") or {}
    if ceilings:
        lines += ["Ceilings measured in the same run: " + ", ".join(f"{k} {_cell(v)}" for k, v in ceilings.items()), ""]
    rows = [
        [
            r.get("gemm", "-"),  # (a row of a failure before its shape was known has only variant and note)
            str(r.get("tokens", "-")),
            str(r.get("rows", "-")),
            r["variant"],
            _fmt(r.get("time_us"), ".1f"),
            _fmt(r.get("TFLOPs"), ".1f"),
            _fmt(r.get("weight_TBps"), ".2f"),
            _fmt(r.get("rel_err"), ".1e"),
            (r.get("note") or "").replace("|", "/")[:80],
        ]
        for r in data["results"]
    ]
    header = ["GEMM", "tokens", "rows", "variant", "time us", "TFLOP/s", "weight TB/s", "rel err", "note"]
    return lines + _table(header, rows)


def render_decode(data: dict) -> list[str]:
    lines = _heading("Decode step and MFA layer (`infer.bench_decode`)", _meta(data))
    rows = [
        [
            r["kv_dtype"],
            str(r["batch"]),
            str(r["context"]),
            _scaled(r.get("step_seconds"), 1e3, ".2f"),
            _fmt(r.get("tokens_per_second"), ".0f"),
            _scaled(r.get("per_layer_seconds"), 1e6, ".0f"),
            _scaled(r.get("estimated_full_tpot_seconds"), 1e3, ".1f"),
            _note(r),
        ]
        for r in data["decode"]
    ]
    header = ["KV", "batch", "context", "step ms", "tokens/s", "per layer us", "est. 61-layer TPOT ms", "note"]
    lines += _table(header, rows) + [""]
    rows = [
        [
            r["kv_dtype"],
            str(r["batch"]),
            str(r["context"]),
            _scaled(r.get("seconds"), 1e6, ".1f"),
            _fmt(r.get("paper_h800_us"), ".0f"),
            _fmt(r.get("target_h200_us"), ".0f"),
            _note(r),
        ]
        for r in data["attention_layer"]
    ]
    header = ["KV", "batch", "context", "one MFA layer us", "paper (H800) us", "target (H200) us", "note"]
    lines += _table(header, rows)
    if data.get("engine"):
        e = data["engine"]
        row = [e["kv_dtype"], str(e["batch"]), str(e["context"]), str(e["new_tokens"]),
               f"{1e3 * e['engine_step_seconds']:.2f}", f"{1e3 * e['bare_step_seconds']:.2f}",
               f"{100 * e['host_overhead']:+.0f}%"]  # fmt: skip
        header = ["KV", "batch", "prompt", "new tokens", "engine step ms", "bare step ms", "host overhead"]
        lines += [""] + _table(header, [row])
    return lines


def render_generic(data: dict) -> list[str]:
    """Any other benchmark JSON: its metadata and every list of flat records as a table."""
    name = str(data.get("benchmark", "benchmark"))
    lines = _heading(TITLES.get(name, name), _meta(data))
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            cols = list(dict.fromkeys(k for v in value for k in v if not isinstance(v[k], dict | list)))
            rows = [[_cell(v.get(c)) for c in cols] for v in value]
            lines += [f"`{key}`:", ""] + _table(cols, rows) + [""]
    return lines


# Benchmarks rendered by render_generic (their JSON names itself with a "benchmark" field).
TITLES = {"afd_layers": "AFD attention / FFN per-layer step times (`infer.bench_afd_layers`)"}


def _scaled(value, factor: float, spec: str) -> str:
    return "-" if value is None else format(value * factor, spec)


def _note(r: dict) -> str:
    """A row's error (or skip reason), safe inside a table cell."""
    return (r.get("error") or "").replace("|", "/")[:80]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v).replace("|", "/")


RENDERERS: dict[str, tuple[Callable[[dict], bool], Callable[[dict], list[str]]]] = {
    "mfa_decode": (lambda d: "rows" in d and "ceiling_bytes_per_s" in d, render_mfa_decode),
    "fp8_gmm": (lambda d: "results" in d and "ceilings" in d, render_fp8_gmm),
    "decode": (lambda d: "decode" in d and "attention_layer" in d, render_decode),
}


def identify(data: dict) -> str:
    """Which benchmark wrote ``data`` (its ``benchmark`` field, else recognised from its keys; "generic" if none)."""
    if isinstance(data.get("benchmark"), str):
        return data["benchmark"]
    for name, (matches, _) in RENDERERS.items():
        if matches(data):
            return name
    return "generic"


def render(data: dict) -> tuple[str, str]:
    """(benchmark name, Markdown section) for one benchmark JSON."""
    name = identify(data)
    fn = RENDERERS[name][1] if name in RENDERERS else render_generic
    return name, "\n".join(fn(data)) + "\n"


def load_results(paths: list[Path]) -> list[tuple[Path, dict]]:
    """Every ``*.json`` under the given files/folders, parsed; a file that is not a JSON object names itself."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(p.glob("*.json"))
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no benchmark result at {str(p)!r}")
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{str(f)!r} is not a benchmark JSON file: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{str(f)!r}: a benchmark JSON file holds an object, got {type(data).__name__}")
        out.append((f, data))
    return out


def update_markdown(text: str, sections: dict[str, str]) -> str:
    """Replace each ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` block by its new section."""
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- bench:{re.escape(name)} -->\n).*?(<!-- /bench:{re.escape(name)} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"no '<!-- bench:{name} -->' ... '<!-- /bench:{name} -->' block to update")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="benchmark JSON files or folders of them")
    ap.add_argument("--update", type=Path, default=None, help="Markdown file whose bench blocks to replace")
    ap.add_argument("--allow-cpu", action="store_true", help="let --update write CPU smoke-run tables")
    args = ap.parse_args(argv)
    try:
        results = load_results(args.paths)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no benchmark JSON file in {', '.join(map(str, args.paths))}", file=sys.stderr)
        return 2
    sections: dict[str, str] = {}
    sources: dict[str, Path] = {}
    broken = []  # (the others are still rendered and written: one bad file loses no other table)
    for path, data in results:
        try:
            name, body = render(data)
        except (KeyError, TypeError, ValueError) as e:
            print(f"error: {path} is not a complete benchmark result ({type(e).__name__}: {e})", file=sys.stderr)
            broken.append(path)
            continue
        print(f"<!-- from {path} -->\n{body}")
        if args.update and _meta(data)["cpu"] and not args.allow_cpu:
            print(f"error: {path} is a CPU smoke run; not writing it into {args.update}", file=sys.stderr)
            return 2
        if args.update and name in sources:
            print(f"error: {sources[name]} and {path} are both {name} results; --update takes one of each",
                  file=sys.stderr)  # fmt: skip
            return 2
        sections[name], sources[name] = body, path
    if args.update and sections:
        try:
            args.update.write_text(update_markdown(args.update.read_text(), sections))
        except (OSError, ValueError) as e:
            print(f"error: {args.update}: {e}", file=sys.stderr)
            return 2
        print(f"updated {', '.join(sections)} in {args.update}", file=sys.stderr)
    return 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
