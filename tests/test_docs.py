"""The documentation stays true to the code: the API reference is current, links resolve, benchmark tables render."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from infer import bench_report

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_current_and_every_public_name_has_a_docstring():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "api_docs.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr


def _markdown_files():
    top = [ROOT / "README.md", ROOT / "DEVELOPERS.md", ROOT / "examples" / "README.md"]
    return [*top, *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_relative_links_in_docs_resolve(path):
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        file = target.split("#")[0]
        if file and not (path.parent / file).exists():
            broken.append(target)
    assert not broken, f"{path.name}: links to missing files {broken}"


MFA = {
    "date": "2026-01-01T00:00:00+00:00",
    "jax": "0.11.2",
    "device": "cuda:0 NVIDIA H200",
    "backend": "gpu",
    "commit": "abc1234",
    "small": False,
    "ceiling_bytes_per_s": 3.5e12,
    "rows": [
        {"batch": 128, "context": 4096, "kv": "bf16", "impl": "ours (paged)", "time_us": 100.0, "tb_s": 2.9,
         "frac_ceiling": 0.83, "rel_err": 2e-3},
        {"batch": 128, "context": 4096, "kv": "bf16", "impl": "cuDNN", "error": "RuntimeError: a | b"},
    ],
}  # fmt: skip


def test_bench_report_renders_a_table_with_its_provenance():
    name, text = bench_report.render(MFA)
    assert name == "mfa_decode"
    assert "2026-01-01" in text and "JAX 0.11.2" in text and "abc1234" in text and "NVIDIA H200" in text
    row = next(line for line in text.splitlines() if "ours (paged)" in line)
    assert "2.90" in row and "83%" in row
    err_row = next(line for line in text.splitlines() if "cuDNN" in line)
    header = next(line for line in text.splitlines() if line.startswith("| B x context"))
    assert err_row.count("|") == header.count("|")  # the error's own '|' cannot break the table
    assert "CPU smoke run" not in text


def test_bench_report_update_replaces_only_its_block_and_refuses_cpu_runs(tmp_path):
    doc = tmp_path / "bench.md"
    blocks = ["<!-- bench:mfa_decode -->", "old", "<!-- /bench:mfa_decode -->"]
    blocks += ["<!-- bench:x -->", "keep", "<!-- /bench:x -->"]
    doc.write_text("intro\n" + "\n".join(blocks) + "\n")
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "mfa.json").write_text(json.dumps(MFA))
    assert bench_report.main([str(tmp_path / "res"), "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "old" not in text and "ours (paged)" in text and "keep" in text and text.startswith("intro")

    cpu = dict(MFA, small=True, device="cpu:0")
    (tmp_path / "res" / "mfa.json").write_text(json.dumps(cpu))
    assert bench_report.main([str(tmp_path / "res"), "--update", str(doc)]) == 2
    assert doc.read_text() == text  # nothing written


def test_bench_report_names_a_bad_file(tmp_path, capsys):
    (tmp_path / "broken.json").write_text("{not json")
    assert bench_report.main([str(tmp_path)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert bench_report.main([str(tmp_path / "missing.json")]) == 2
    (tmp_path / "broken.json").unlink()
    assert bench_report.main([str(tmp_path)]) == 2  # nothing to report is not a success
    assert "no benchmark JSON file in" in capsys.readouterr().err
    (tmp_path / "partial.json").write_text(json.dumps(dict(MFA, rows=[{"batch": 1}])))
    assert bench_report.main([str(tmp_path)]) == 2
    assert "partial.json is not a complete benchmark result (KeyError: 'context')" in capsys.readouterr().err
    (tmp_path / "partial.json").unlink()
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- bench:mfa_decode -->\nold\n<!-- /bench:mfa_decode -->\n")
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(json.dumps(MFA))
    assert bench_report.main([str(tmp_path), "--update", str(doc)]) == 2  # two results for one block
    assert "are both mfa_decode results" in capsys.readouterr().err and "old" in doc.read_text()


def test_bench_report_renders_failed_and_skipped_rows_and_keeps_the_good_files(tmp_path, capsys):
    """What a GPU run can write when something fails: a ceiling that could not be measured (its error as a
    string), a row of a failure before its shape was known, decode rows skipped past the time budget. They render
    as notes in their tables; and a broken file beside good ones fails the run without losing the good tables."""
    gpu = {"date": "2026-01-01T00:00:00+00:00", "jax": "0.11.2", "commit": "abc1234", "small": False}
    ceilings = {"fp8_tflops": 1200.5, "bf16_tflops_error": "XlaRuntimeError"}
    gmm = dict(gpu, device="gpu: NVIDIA H200", ceilings=ceilings,
               results=[{"gemm": "gate_up", "tokens": 64, "rows": 192, "variant": "fp8_gmm", "time_us": 50.0},
                        {"gemm": "ffn", "variant": "ffn_fp8", "note": "RESOURCE_EXHAUSTED: no memory"}])  # fmt: skip
    name, text = bench_report.render(gmm)
    assert name == "fp8_gmm" and "bf16_tflops_error XlaRuntimeError" in text and "RESOURCE_EXHAUSTED" in text
    decode = dict(gpu, device="NVIDIA H200 (gpu)", attention_layer=[
        {"kv_dtype": "bfloat16", "batch": 64, "context": 8192, "seconds": 2e-4, "paper_h800_us": 281.0},
        {"kv_dtype": "float8_e4m3fn", "batch": 64, "context": 8192, "error": "ValueError: bad | thing"}],
        decode=[{"kv_dtype": "bfloat16", "batch": 1, "context": 4096, "error": "skipped: over budget"}])  # fmt: skip
    name, text = bench_report.render(decode)
    lines = text.splitlines()
    assert name == "decode" and "200.0" in next(line for line in lines if line.startswith("| bfloat16 | 64"))
    assert "bad / thing" in next(line for line in lines if line.startswith("| float8_e4m3fn | 64"))
    assert "skipped: over budget" in text
    (tmp_path / "gmm.json").write_text(json.dumps(gmm))
    (tmp_path / "mfa.json").write_text(json.dumps(dict(MFA, rows=[{"batch": 1}])))
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- bench:fp8_gmm -->\nold\n<!-- /bench:fp8_gmm -->\n")
    assert bench_report.main([str(tmp_path), "--update", str(doc)]) == 2
    assert "mfa.json is not a complete benchmark result" in capsys.readouterr().err
    assert "old" not in doc.read_text() and "ffn_fp8" in doc.read_text()


def test_benchmarks_page_has_a_block_for_every_benchmark_in_the_gpu_script():
    script = (ROOT / "scripts" / "bench_gpu").read_text()
    names = re.findall(r"^bench (\w+) ", script, re.M)
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert names and all(f"<!-- bench:{n} -->" in page for n in names)
    for n in names:  # the JSON each writes must be recognised as that benchmark (or carry its name)
        assert n in bench_report.RENDERERS or n in bench_report.TITLES


def _resolve(dotted: str) -> bool:
    """Whether ``pkg.module.attr...`` names something that exists (longest importable module prefix, then attrs)."""
    import importlib

    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("path", _markdown_files(), ids=lambda p: p.name)
def test_code_names_in_docs_exist(path):
    """Every `step3_jax.x.y`-style name and every `path/file.py::name` quoted in the docs exists in the code."""
    text = path.read_text()
    stale = []
    for dotted in set(re.findall(r"`((?:step3_jax|infer|train|pallas_kernels)(?:\.\w+)+)", text)):
        if not _resolve(dotted):
            stale.append(dotted)
    for file, name in set(re.findall(r"`((?:step3_jax|infer|train|pallas_kernels)/[\w/]+\.py)::(\w+)", text)):
        module = file[: -len(".py")].replace("/", ".")
        if not (ROOT / file).exists() or not _resolve(f"{module}.{name}"):
            stale.append(f"{file}::{name}")
    assert not stale, f"{path.name} names things the code does not have: {sorted(stale)}"
