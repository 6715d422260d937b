"""The research notebooks in examples/ run top to bottom, headless, and are committed without outputs.

Each notebook is executed with nbclient in a fresh ``python3`` kernel (the venv's ipykernel), in a temporary
working directory, with ``JAX_PLATFORMS=cpu`` and ``STEP3_EXAMPLE_SIZE=tiny`` in the kernel's environment, so
the suite never touches an accelerator. A failing cell fails the test with that cell's traceback; the notebooks'
own ``assert``s (split == colocated, loaded == saved, ...) make a wrong result fail too.

Kernels share this test process's persistent compilation cache (``tests/conftest.py`` makes one per session),
so programs common to several notebooks (the tiny model's initialiser, for one) compile once per session.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
CELL_TIMEOUT_S = 300  # a generous bound per cell: the slowest (a short training run) takes well under a minute


def kernel_env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["STEP3_EXAMPLE_SIZE"] = "tiny"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["TMPDIR"] = str(workdir)  # temporary files and folders of the notebooks (checkpoints, traces) land here
    cache = jax.config.jax_compilation_cache_dir
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = cache
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(jax.config.jax_persistent_cache_min_compile_time_secs)
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = str(jax.config.jax_persistent_cache_min_entry_size_bytes)
    return env


def test_examples_exist():
    assert [p.name for p in NOTEBOOKS][:6] == [
        "01_quickstart.ipynb",
        "02_inside_mfa.ipynb",
        "03_moe.ipynb",
        "04_afd.ipynb",
        "05_cost_model.ipynb",
        "06_chat_finetuning.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_valid_and_stripped(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; run `python scripts/strip_notebooks.py {path}`"
    assert nb.cells and nb.cells[0].cell_type == "markdown", f"{path.name} should open with a markdown intro"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, capsys):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working directory
    )
    t0 = time.perf_counter()
    with client.setup_kernel(env=kernel_env(tmp_path)):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                client.execute_cell(cell, index)  # raises CellExecutionError with the cell's traceback
    with capsys.disabled():
        print(f"\n{path.name}: {time.perf_counter() - t0:.1f} s", end="")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
