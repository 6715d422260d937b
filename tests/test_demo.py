"""The README's main command end to end, at a few steps: train -> save HF checkpoint -> load -> engine generate."""

from infer.demo import main


def test_demo_trains_saves_loads_and_generates(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--preset", "test", "--steps", "3", "--seq-len", "32", "--batch-size", "4", "--out", str(out)]
    assert main([*args, "--max-new-tokens", "5", "--no-progress", "--prompt", "The"]) == 0
    text = capsys.readouterr().out
    assert "1/3 training" in text and "2/3 saved" in text and "3/3 generating" in text
    assert "tokens/s" in text and "ms per output token" in text
    assert "AFD (1 attention + 1 FFN device" in text and "greedy sequences identical" in text
    assert (out / "model" / "config.json").exists() and list((out / "model").glob("*.safetensors"))
    assert (out / "metrics.jsonl").read_text().count("\n") == 3  # one record per training step
    assert main([*args, "--steps", "0"]) == 2  # bad input: a clear error, no crash
    assert "steps" in capsys.readouterr().err
    # what cannot work fails before training: a generation longer than the context, an --out that is a file
    assert main([*args, "--max-new-tokens", "600"]) == 2
    assert "exceeds the model's context of 512 tokens" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main([*args, "--out", str(tmp_path / "file")]) == 2
    assert "error:" in capsys.readouterr().err and "1/3 training" not in capsys.readouterr().out
