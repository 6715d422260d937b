"""Strip outputs from notebooks before committing them: ``python scripts/strip_notebooks.py [--check] [PATH ...]``.

Clears every code cell's outputs and execution count and the per-cell run metadata front ends add
(``execution``, ``collapsed``, ``scrolled``), and keeps only the kernel spec and language name in the notebook
metadata. Without paths it processes ``examples/*.ipynb``. ``--check`` changes nothing and exits with status 1
if a notebook would change (what ``tests/test_notebooks.py`` requires).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
CELL_METADATA_DROPPED = ("execution", "collapsed", "scrolled", "ExecuteTime")


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in CELL_METADATA_DROPPED:
            cell.metadata.pop(key, None)
    kernelspec = nb.metadata.get("kernelspec")
    nb.metadata = {"language_info": {"name": nb.metadata.get("language_info", {}).get("name", "python")}}
    if kernelspec:
        nb.metadata["kernelspec"] = kernelspec
    return nb


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: examples/*.ipynb)")
    ap.add_argument("--check", action="store_true", help="report notebooks that would change; write nothing")
    args = ap.parse_args(argv)
    paths = args.paths or sorted((ROOT / "examples").glob("*.ipynb"))
    changed = []
    for path in paths:
        before = path.read_text(encoding="utf-8")
        nb = strip(nbformat.reads(before, as_version=nbformat.NO_CONVERT))
        nbformat.validate(nb)
        after = nbformat.writes(nb) + "\n"
        if after != before:
            changed.append(path)
            if not args.check:
                path.write_text(after, encoding="utf-8")
    for path in changed:
        print(f"{'would strip' if args.check else 'stripped'} {path}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
