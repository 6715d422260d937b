"""The AFD per-layer benchmark (infer/bench_afd_layers.py) end to end on the CPU with --small: its JSON is a
kernel-times file the cost model reads, with both sides' records at the requested shapes, and the cost model's
AFD throughput follows the measured FFN time."""

import dataclasses
import json
import math

import pytest

from infer import bench_afd_layers as bench
from infer import cost as cost_cli
from step3_jax import cost_model as cm

ATTENTION_POINTS = [(2, 32), (4, 32), (2, 64)]
FFN_TOKENS = [2, 4]


@pytest.fixture(scope="module")
def report_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "afd_layers.json"
    points = ",".join(f"{b}x{c}" for b, c in ATTENTION_POINTS)
    argv = ["--small", "--out", str(path), "--attention-points", points, "--ffn-tokens", "2,4"]
    # BF16 KV is optional: the tiny --budget-s has run out before it starts, so it is skipped (no compile)
    argv += ["--kv-dtypes", "float8_e4m3fn,bfloat16", "--budget-s", "0.001", "--iters", "1", "--repeats", "1"]
    assert bench.main(argv) == 0
    return path


def test_paper_2a2f_per_gpu_shapes():
    p = bench.paper_point()
    # paper 7.3: 6,144 = 3 micro-batches of 2,048; 2 attention + 2 FFN instances of 8 GPUs; 48 experts, top-3
    assert p.sequences_per_attention_gpu == 128
    assert p.experts_per_ffn_gpu == 3 and p.routed_rows_per_ffn_gpu == 384 and p.tokens_per_ffn_gpu == 128
    assert p.ffn_record_tokens(p.tokens_per_ffn_gpu) == 1024  # KernelTimes.ffn_us: micro-batch per FFN instance
    layers = cm.afd_layer_times(cm.step3_spec(), 4096, p.micro_batch, *[cm.default_hardware()["H200"]] * 2, p.setup)
    assert len(layers) == 61  # the same setup the cost model evaluates


def test_json_is_a_kernel_times_file(report_path):
    data = json.loads(report_path.read_text())
    attention = [r for r in data["records"] if r["component"] == "attention"]
    ffn = [r for r in data["records"] if r["component"] == "ffn"]
    assert [(r["tokens_per_gpu"], r["context"]) for r in attention] == ATTENTION_POINTS
    assert [r["tokens"] for r in ffn] == [8 * n for n in FFN_TOKENS]
    assert all(r["time_us"] > 0 and math.isfinite(r["time_us"]) for r in data["records"])
    assert data["ffn_group_sizes"] == {"2": [2, 2, 2], "4": [4, 4, 4]}  # top-3 of the FFN GPU's 3 experts
    assert data["shapes"]["paper_2a2f"]["routed_rows_per_ffn_gpu"] == 384
    assert list(data["attention_by_kv_dtype"]) == ["float8_e4m3fn"] and data["benchmark"] == "afd_layers"
    wire = data["wire_bytes"]  # hidden 256: FP8 x + 2 scales (f32) + 3 weights (f32) + 3 ids (int32); BF16 back
    assert (wire["a2f_bytes_per_token"], wire["f2a_bytes_per_token"]) == (256 + 4 * (2 + 3 + 3), 512)

    kt = cm.load_kernel_times(report_path)
    assert kt.ffn_coef is not None
    for r in attention:  # three points, three coefficients: the fit goes through them
        assert kt.attention_us(r["tokens_per_gpu"], r["context"]) == pytest.approx(r["time_us"], rel=1e-6)

    # Within the measured sizes (<= 4 sequences per attention GPU) the throughput is finite and positive, and a
    # slower FFN lowers it: adding D to every FFN record shifts the FFN fit by D, which then sets the stage time.
    # One un-repeated CPU call per record is noise (a loaded 2-core machine once timed 4 sequences 9x slower than
    # 2, so the exact fit fell below zero at 1): the file's records, each side at its smallest measured time, fit
    # flat, which keeps this a property of the records' format and the cost model, not of the machine's load.
    spec, h200 = cm.step3_spec(), cm.default_hardware()["H200"]
    slow = 10 * max(r["time_us"] for r in data["records"])
    setup = cm.AFDSetup(2, 2, tpot_s=2 * slow * 1e-6 * 3 * spec.num_layers)

    def flat(records):
        return [dict(r, time_us=min(r["time_us"] for r in records)) for r in records]

    def throughput(records):
        kt = cm.kernel_times_from_records(records)
        est = cm.estimate_afd_throughput(spec, 32, h200, h200, setup, kernel_times=kt, max_tokens_per_gpu=4)
        return est.tokens_per_gpu_s

    attention, ffn = flat(attention), flat(ffn)
    base = throughput(attention + ffn)
    slower = throughput(attention + [dict(r, time_us=r["time_us"] + slow) for r in ffn])
    assert math.isfinite(base) and base > 0 and 0 < slower < base


def test_cost_cli_reads_the_file(report_path, capsys):
    # At a batch and context the CPU run measured (2 sequences per attention GPU per micro-batch at context 32;
    # 16 tokens per FFN instance): CPU times of one un-repeated call are noise, so a fit extrapolated far past them
    # may rightly be refused (a time falling with the context), which is no property of reading the file.
    argv = ["afd", "--attn-hw", "H200", "--kernel-times", str(report_path), "--context", "32", "--batch", "96"]
    assert cost_cli.main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == f"measured ({report_path})" and out["deployment"] == "2A2F"
    assert out["micro_batch"] == 32 and out["total_batch"] == 96 and out["per_layer_us"]["attention_us"] > 0


def test_impossible_request_fails_clearly(capsys):
    assert bench.main(["--small", "--ffn-tokens", "4"]) == 2
    assert ">= 2 FFN token counts" in capsys.readouterr().err
    assert bench.main(["--small", "--hardware", "XYZ"]) == 2  # before any measurement
    assert "--hardware: unknown accelerator 'XYZ'" in capsys.readouterr().err
    for arg in ("--iters", "--repeats", "--page-size"):
        with pytest.raises(SystemExit):
            bench.main(["--small", arg, "0"])
        assert f"{arg}: must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="50 experts do not split evenly over 16 FFN GPUs"):
        bench.ffn_gpu_config(bench.layer_config(True, True), dataclasses.replace(bench.paper_point(), num_experts=50))
