import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from infer.generate import bucket, generate_ids, main
from infer.sampling import SamplingParams, sample
from step3_jax import create_model
from step3_jax.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model(test_config):
    return create_model(test_config, seed=1)


def greedy_by_full_forward(model, prompt, n):
    """Reference: re-run the whole sequence each step (no cache) and take the argmax. The sequence is padded
    on the right to a fixed width (causal: padding cannot change earlier logits) so this compiles once."""
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
    seq, width = list(prompt), max(32, len(prompt) + n)
    for _ in range(n):
        padded = np.zeros((1, width), np.int32)
        padded[0, : len(seq)] = seq
        seq.append(int(jnp.argmax(f(state, jnp.asarray(padded))[0, len(seq) - 1])))
    return seq[len(prompt) :]


def test_greedy_generation_matches_full_forward_and_batching(model):
    prompts = [[1, 40, 41, 42], [1, 50, 60, 70, 80, 90, 100, 7, 8], [1, 9]]
    params = SamplingParams(max_new_tokens=6)
    batched = generate_ids(model, prompts, params).tokens
    for prompt, toks in zip(prompts, batched, strict=True):
        assert toks == greedy_by_full_forward(model, prompt, 6)
        assert generate_ids(model, [prompt], params).tokens[0] == toks


def test_stop_tokens_end_a_sequence(model):
    prompt = [1, 40, 41, 42]
    free = generate_ids(model, [prompt], SamplingParams(max_new_tokens=6)).tokens[0]
    stop = free[2]
    stopped = generate_ids(model, [prompt], SamplingParams(max_new_tokens=6, stop_token_ids=(stop,))).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    prompt = [[1, 33, 34]]
    a = generate_ids(model, prompt, SamplingParams(temperature=1.0, seed=3, max_new_tokens=8)).tokens
    b = generate_ids(model, prompt, SamplingParams(temperature=1.0, seed=3, max_new_tokens=8)).tokens
    c = generate_ids(model, prompt, SamplingParams(temperature=1.0, seed=4, max_new_tokens=8)).tokens
    assert a == b and a != c
    greedy = generate_ids(model, prompt, SamplingParams(max_new_tokens=8)).tokens
    assert generate_ids(model, prompt, SamplingParams(temperature=2.0, top_k=1, max_new_tokens=8)).tokens == greedy
    assert generate_ids(model, prompt, SamplingParams(temperature=2.0, top_p=1e-6, max_new_tokens=8)).tokens == greedy


def test_sampler_distribution_and_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    n = logits.shape[0]

    def draw(t, k, p):
        return np.asarray(
            sample(logits, jax.random.key(0), jnp.full((n,), t), jnp.full((n,), k, jnp.int32), jnp.full((n,), p))
        )

    freq = np.bincount(draw(1.0, 0, 1.0), minlength=4) / n
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert set(draw(1.0, 2, 1.0)) == {0, 1}  # top-k keeps the two most likely
    assert set(draw(1.0, 0, 0.7)) == {0, 1}  # 0.5 < 0.7 <= 0.8: the nucleus is the first two
    assert set(draw(0.0, 0, 1.0)) == {0}  # temperature 0 is greedy
    hot = np.bincount(draw(100.0, 0, 1.0), minlength=4) / n
    assert hot.min() > 0.2  # high temperature flattens the distribution


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ],
)
def test_invalid_sampling_parameters(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_clear_errors(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        generate_ids(model, [[1] * 500], SamplingParams(max_new_tokens=20))
    with pytest.raises(ValueError, match="at least one token"):
        generate_ids(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"outside \[0, 263\)"):
        generate_ids(model, [[1, 999]])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "MFA décode ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert bucket(1) == 16 and bucket(17) == 32 and bucket(64) == 64


def test_demo_cli_prints_tokens_per_second(capsys):
    assert main(["--preset", "test", "--max-new-tokens", "5", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and "prompt: 'hi'" in out
    assert main(["--preset", "test", "--max-new-tokens", "1", "--prompt", "hi"]) == 0
    out = capsys.readouterr().out  # one token has no time per output token: said as "-"
    assert "mean time per output token -," in out and "nan" not in out
    assert main(["--preset", "test", "--top-p", "2"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_cli_refuses_what_it_would_ignore_or_fail_on_after_the_work(tmp_path, capsys):
    """Before any model is built: a prompt file without prompts (not the built-in demo prompt instead), a
    --json-out whose folder does not exist (not a traceback after the run), AFD-only flags without --afd, and
    impossible device or micro-batch counts."""
    (tmp_path / "empty.txt").write_text("\n  \n")
    assert main(["--preset", "test", "--prompts-file", str(tmp_path / "empty.txt")]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    for args, message in [
        (["--json-out", str(tmp_path / "no" / "out.json")], r"--json-out .*: the folder .*no does not exist"),
        (["--micro-batches", "3", "--transfer", "bf16"], "--micro-batches and --transfer set how --afd runs"),
        (["--cpu-devices", "0"], "--cpu-devices must be at least 1"),
        (["--afd", "1x1", "--micro-batches", "0"], "--micro-batches must be at least 1"),
    ]:
        with pytest.raises(SystemExit):
            main(["--preset", "test", "--prompt", "hi", *args])
        assert re.search(message, capsys.readouterr().err), args


def test_generate_ids_within_a_context_that_is_not_a_power_of_two(test_config):
    """A prompt that fits a 96-token context, but whose power-of-two bucket (128) does not, is generated."""
    model = create_model(dataclasses.replace(test_config, max_position_embedding=96), seed=0)
    prompt = [1] + [5 + i for i in range(69)]  # 70 tokens + 10 new = 80 <= 96
    out = generate_ids(model, [prompt], SamplingParams(max_new_tokens=10)).tokens[0]
    assert out == greedy_by_full_forward(model, prompt, 10)


def test_cli_chat_prompts_go_through_the_checkpoint_chat_template(model, tmp_path, capsys):
    """``--chat`` (``--system``): each prompt becomes a user turn in the checkpoint tokenizer's chat template, and
    the engine gets exactly the template's token ids (special tokens as their ids, no BOS added); a tokenizer
    without a template is a clear error (exit status 2), and ``--system`` without ``--chat`` is refused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from step3_jax import save_pretrained
    from step3_jax.tokenizer import encode_chat, load_tokenizer

    folder = save_pretrained(model, tmp_path / "ckpt")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=263, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(["hello world"] * 10, trainer)  # (within the test preset's 263-token vocabulary)
    tok.save(str(folder / "tokenizer.json"))
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}[assistant]"
    tc = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    args = ["--checkpoint", str(folder), "--max-new-tokens", "2", "--no-warmup", "--prompt", "hello"]
    assert main([*args, "--chat", "--system", "be brief", "--json-out", str(tmp_path / "out.json")]) == 0
    (request,) = json.loads((tmp_path / "out.json").read_text())["requests"]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    want = encode_chat(load_tokenizer(folder), chat)
    assert request["prompt_ids"] == want and want[0] == tok.token_to_id("<s>") and want.count(want[0]) == 1
    assert request["prompt"] == "hello" and len(request["token_ids"]) == 2
    capsys.readouterr()
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert main([*args, "--chat"]) == 2
    assert "has no chat template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main([*args, "--system", "be brief"])
    assert err.value.code == 2 and "--system is for --chat" in capsys.readouterr().err


def test_cli_afd_serves_the_colocated_tokens(tmp_path, capsys):
    """``python -m infer.generate --afd``: the same engine over attention-FFN disaggregation gives every prompt the
    colocated run's tokens (FP8 KV pages), in one process (2 attention + 1 FFN devices, 2 micro-batches, exact
    transfer) and in
    three (``--coordinator``: the attention side spans processes 0 and 1, one device each, process 0 runs the
    engine and process 1 follows its steps on its own pages; process 2 holds the 2 FFN devices and serves the
    steps until it is done), and again in three with ``--instances per-process`` (processes 0 and 1 each an
    independent attention instance with its own engine over its share of the prompts, sharing process 2's FFN
    side). A malformed split, a batch the micro-batches cannot split and several processes without --afd are
    refused with the reason."""
    import json
    import sys

    from processes import free_port, run_processes

    base = ["--preset", "test", "--dtype", "float32", "--max-new-tokens", "4", "--max-batch", "4", "--no-warmup"]
    base += ["--prompt", "Step-3 decodes", "--prompt", "x", "--prompt", "attention and FFN apart"]
    base += ["--kv-dtype", "float8_e4m3fn", "--page-size", "8"]  # FP8 pages: their dtype reaches every process
    afd = ["--micro-batches", "2", "--transfer", "model"]
    assert main([*base, "--json-out", str(tmp_path / "one.json")]) == 0
    assert main([*base, "--afd", "2x1", *afd, "--json-out", str(tmp_path / "afd.json")]) == 0
    assert "disaggregated: 2 attention + 1 FFN devices" in capsys.readouterr().out

    cli = [sys.executable, "-m", "infer.generate", *base, "--afd", "2x2", *afd, "--cpu-devices", "2"]
    cli += ["--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "3", "--attention-processes", "2"]
    cli += ["--peer-timeout", "60", "--json-out", str(tmp_path / "three.json")]
    runs = run_processes(lambda i: [*cli, "--process-id", str(i)], 240, "the three-process --afd run", 3)
    outs = [out for _, out in runs]
    assert [rc for rc, _ in runs] == [0, 0, 0], "".join(out[-2000:] for out in outs)
    served = [re.search(r"process (\d) \((\w+) side\): served (\d+) steps", out) for out in outs[1:]]
    assert [(m[1], m[2]) for m in served] == [("1", "attention"), ("2", "FFN")], outs[1:]
    assert served[0][3] == served[1][3] != "0"  # both followed every step of process 0's engine

    tokens = {n: [r["token_ids"] for r in json.loads((tmp_path / f"{n}.json").read_text())["requests"]]
              for n in ("one", "afd", "three")}  # fmt: skip
    assert tokens["afd"] == tokens["one"] and tokens["three"] == tokens["one"]
    logprobs = {n: [r["logprobs"] for r in json.loads((tmp_path / f"{n}.json").read_text())["requests"]]
                for n in ("one", "three")}  # fmt: skip
    np.testing.assert_allclose(sum(logprobs["three"], []), sum(logprobs["one"], []), atol=1e-3)
    assert all(len(t) == 4 for t in tokens["one"])

    cli = [*cli[:-1], str(tmp_path / "instance.json"), "--coordinator", f"127.0.0.1:{free_port()}"]
    runs = run_processes(lambda i: [*cli, "--instances", "per-process", "--process-id", str(i)], 240,
                         "the three-process --afd run with per-process instances", 3)  # fmt: skip
    outs = [out for _, out in runs]
    assert [rc for rc, _ in runs] == [0, 0, 0], "".join(out[-2000:] for out in outs)
    for k, mine in ((0, [0, 2]), (1, [1])):
        assert f"attention instance {k} of 2: prompts {mine} of 3" in outs[k], outs[k][-3000:]
        got = [r["token_ids"] for r in json.loads((tmp_path / f"instance.json.{k}").read_text())["requests"]]
        assert got == [tokens["one"][i] for i in mine], k
    assert re.search(r"process 2 \(FFN side\): served [1-9]\d* steps; the attention processes print", outs[2])
    assert "all 2 attention instances: 3 requests (0 failed), 12 tokens in" in outs[0], outs[0][-2000:]

    with pytest.raises(SystemExit):
        main([*base, "--afd", "2by1"])
    assert "expected MxN (attention x FFN devices, e.g. 2x2), got '2by1'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--coordinator", "127.0.0.1:1", "--process-id", "0"])
    assert "--coordinator (several processes) needs --afd" in capsys.readouterr().err
    assert main([*base, "--afd", "2x1", "--micro-batches", "4"]) == 2
    assert "which the AFD runner's 4 micro-batches must divide" in capsys.readouterr().err
