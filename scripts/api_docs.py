"""API reference for step3-jax, generated from the docstrings.

    .venv/bin/python scripts/api_docs.py            # write docs/api.md (the committed Markdown index)
    .venv/bin/python scripts/api_docs.py --check    # exit 1 if docs/api.md is stale or a public name lacks a docstring
    .venv/bin/python scripts/api_docs.py --html docs/_build/api   # full HTML reference with pdoc (not committed)

``docs/api.md`` lists every public module, class, function and method (names not starting with ``_``, defined in
that module) with its signature and the first paragraph of its docstring; the HTML reference from pdoc carries the
whole docstrings and source links. The test suite runs ``--check``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"

# The public surface, in reading order: what notebooks and scripts import.
MODULES = [
    "step3_jax.config",
    "step3_jax.model",
    "step3_jax.init_rng",
    "step3_jax.sharding",
    "step3_jax.kv_cache",
    "step3_jax.quant",
    "step3_jax.tokenizer",
    "step3_jax.checkpoint.hf",
    "step3_jax.checkpoint.hf_keys",
    "step3_jax.checkpoint.safetensors_io",
    "step3_jax.cost_model",
    "pallas_kernels.mfa_decode",
    "pallas_kernels.fp8_gmm",
    "pallas_kernels.interpret",
    "infer.engine",
    "infer.sampling",
    "infer.generate",
    "infer.afd",
    "train.data",
    "train.train",
    "train.lora",
]


def _first_paragraph(doc: str | None) -> str:
    if not doc:
        return ""
    para = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in para.splitlines())


def _signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    sig = re.sub(r"<(function|class|built-in function) ([\w.]+)( at 0x[0-9a-f]+)?>", r"\2", sig)  # stable text
    sig = re.sub(r" at 0x[0-9a-f]+", "", sig)
    return sig if len(sig) <= 160 else sig[:157] + "..."


def _own_doc(obj) -> str | None:
    """The object's own docstring (not one inherited from a base class such as ``object`` or a dataclass default)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and doc.startswith(obj.__name__ + "("):
        return None  # the signature dataclasses write when a class has no docstring
    return doc


def public_members(module) -> list[tuple[str, object]]:
    """(name, object) for the public classes and functions defined in ``module`` (not imported into it)."""
    members = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        members.append((name, obj))
    return sorted(members, key=lambda m: _line(m[1]))


def _line(obj) -> int:
    try:
        return inspect.getsourcelines(obj)[1]
    except (OSError, TypeError):
        return 0


def public_methods(cls) -> list[tuple[str, object]]:
    out = []
    for name, obj in cls.__dict__.items():
        if name.startswith("_") and name != "__call__":
            continue
        fn = obj.__func__ if isinstance(obj, classmethod | staticmethod) else obj
        if inspect.isfunction(fn) or isinstance(obj, property):
            out.append((name, obj))
    return out


def build() -> tuple[str, list[str]]:
    """(Markdown text, names of public objects without a docstring)."""
    missing: list[str] = []
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `scripts/api_docs.py` (do not edit by hand; the tests check it is current).",
        "Full docstrings with source: `.venv/bin/python scripts/api_docs.py --html docs/_build/api` (pdoc).",
        "",
    ]
    lines += [f"- [`{m}`](#{m.replace('.', '')})" for m in MODULES] + [""]
    for modname in MODULES:
        module = importlib.import_module(modname)
        lines += [f"## {modname}", ""]
        if not module.__doc__:
            missing.append(modname)
        summary = _first_paragraph(module.__doc__)
        if summary:
            lines += [summary, ""]
        for name, obj in public_members(module):
            qual = f"{modname}.{name}"
            doc = _own_doc(obj)
            if not doc:
                missing.append(qual)
            kind = "class" if inspect.isclass(obj) else "def"
            lines += [f"### `{kind} {name}{_signature(obj)}`", "", _first_paragraph(doc) or "*(no docstring)*", ""]
            if inspect.isclass(obj):
                for mname, m in public_methods(obj):
                    fn = m.fget if isinstance(m, property) else getattr(m, "__func__", m)
                    mdoc = fn.__doc__
                    label = f"{mname}" if isinstance(m, property) else f"{mname}{_signature(fn)}"
                    lines.append(f"- `{label}`" + (f": {_first_paragraph(mdoc)}" if mdoc else ""))
                if public_methods(obj):
                    lines.append("")
    return "\n".join(lines).rstrip() + "\n", missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if docs/api.md is stale or docstrings are missing")
    ap.add_argument("--html", type=Path, default=None, help="also write the pdoc HTML reference into this folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(ROOT))
    text, missing = build()
    if missing:
        print("public names without a docstring:\n  " + "\n  ".join(missing), file=sys.stderr)
    if args.check:
        stale = not OUT.exists() or OUT.read_text() != text
        if stale:
            print(f"{OUT.relative_to(ROOT)} is stale: run `.venv/bin/python scripts/api_docs.py`", file=sys.stderr)
        return 1 if stale or missing else 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)} ({len(text.splitlines())} lines)", file=sys.stderr)
    if args.html:
        import pdoc

        pdoc.render.configure(docformat="markdown", search=True)
        pdoc.pdoc(*sorted({m.split(".")[0] for m in MODULES}), output_directory=args.html)
        print(f"wrote the HTML reference to {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
