"""The README's main job: train a tiny Step-3 on the embedded corpus, save it as a Hugging Face checkpoint,
load it back and generate from it, printing the sample and the throughput.

``python -m infer.demo --help`` lists the knobs (steps, preset, prompt, output folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

from infer.cli import add_sampling_args, check_fits_context, sampling_from_args
from infer.engine import Engine, EngineConfig, summarize
from step3_jax import get_preset, load_pretrained, save_pretrained
from step3_jax.config import PRESETS
from step3_jax.tokenizer import ByteTokenizer
from train.data import embedded_corpus, pack_documents
from train.train import TrainConfig, Trainer, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infer.demo", description=__doc__)
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=150, help="training steps (a few minutes on 2 CPU cores)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default="runs/demo", help="where the checkpoint (OUT/model) and metrics.jsonl go")
    ap.add_argument("--prompt", action="append", help="prompt(s) to complete after training")
    add_sampling_args(ap, max_new_tokens=120, seed_help="sampling seed (training has its own)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--no-afd", action="store_true", help="skip the attention-FFN disaggregated generation")
    args = ap.parse_args(argv)
    if not args.no_afd and jax.config.jax_platforms in (None, "", "cpu"):
        try:  # two fake CPU devices for the attention and FFN sides (only possible before JAX starts its backend)
            jax.config.update("jax_num_cpu_devices", max(2, jax.config.jax_num_cpu_devices))
        except RuntimeError:
            pass

    tokenizer = ByteTokenizer()
    prompts = args.prompt or ["The assert statement", "A class definition"]
    out = Path(args.out)
    try:
        config = get_preset(args.preset)
        tc = TrainConfig(
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            steps=args.steps,
            lr=args.lr,
            warmup_steps=min(15, args.steps // 10),
            save_every=0,
            log_every=10,
        )
        params = sampling_from_args(args, stop_token_ids=(tokenizer.eos_id,))
        longest = max(len(tokenizer.encode(p)) for p in prompts)
        check_fits_context(longest, params.max_new_tokens, config)
        out.mkdir(parents=True, exist_ok=True)  # (an unusable --out fails now, not after training)
        if not out.is_dir():
            raise ValueError(f"--out {out} is not a folder")
        data = pack_documents(embedded_corpus(), tokenizer, tc.seq_len, vocab_size=config.vocab_size)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(
        f"1/3 training preset {args.preset!r} for {tc.steps} steps on the embedded corpus "
        f"(Python's language reference, {len(data)} rows of {tc.seq_len} tokens), on {jax.devices()[0].platform}"
    )
    trainer = Trainer(config, tc, data)
    t0 = time.perf_counter()
    history = run(trainer, progress=not args.no_progress, log_path=out / "metrics.jsonl")
    train_s = time.perf_counter() - t0
    tps = float(np.median([h["tokens_per_s"] for h in history[len(history) // 2 :]]))
    print(
        f"    loss {history[0]['loss']:.2f} -> {np.mean([h['loss'] for h in history[-10:]]):.2f} "
        f"in {train_s:.0f} s ({tps:,.0f} training tokens/s)"
    )

    model_dir = out / "model"
    trained = trainer.model
    save_pretrained(trained, model_dir)
    print(f"2/3 saved a Hugging Face checkpoint ({trained.config.param_dtype}) to {model_dir}")

    loaded = load_pretrained(model_dir, progress=False)
    max_seq_len = min(longest + params.max_new_tokens + 1, config.max_position_embedding)
    engine = Engine(loaded, EngineConfig(max_batch=4, max_seq_len=max_seq_len), tokenizer=tokenizer)
    engine.warmup([len(tokenizer.encode(p)) for p in prompts])  # compile first, so the timings are decoding
    print("3/3 generating from the loaded checkpoint with the continuous-batching engine:")
    t0 = time.perf_counter()
    outputs = engine.generate_outputs(prompts, params)
    stats = summarize(outputs, time.perf_counter() - t0)
    for p, o in zip(prompts, outputs, strict=True):
        print(f"\n  {p}{o.text}")
    print(
        f"\n{stats['output_tokens']} tokens in {stats['wall_seconds']:.2f} s: {stats['tokens_per_second']:.1f} "
        f"tokens/s, {stats['mean_time_per_output_token'] * 1e3:.1f} ms per output token"
    )
    if not args.no_afd:
        _afd_generate(model_dir, tokenizer, prompts, params, outputs)
    return 0


def _afd_generate(model_dir, tokenizer, prompts, params, engine_outputs) -> None:
    """The same prompts through the attention-FFN disaggregated runner, its halves read from the saved checkpoint:
    attention on one device, FFN on another, FP8 hidden states between them, two micro-batches in flight."""
    from infer.afd import AFDConfig, AFDRunner

    if len(jax.devices()) < 2:
        print("\n(AFD skipped: it needs two devices)")
        return
    afd = AFDConfig(attention_devices=1, ffn_devices=1, micro_batches=min(2, len(prompts)), transfer="fp8")
    runner = AFDRunner.from_checkpoint(model_dir, afd)
    res = runner.generate([tokenizer.encode(p) for p in prompts], sampling=params)
    print(
        f"\nAFD ({afd.attention_devices} attention + {afd.ffn_devices} FFN device, {afd.micro_batches} micro-batches, "
        f"FP8 transfer): {res.decode_tokens_per_second:.1f} tokens/s"
    )
    same = sum(list(o.token_ids) == t for o, t in zip(engine_outputs, res.tokens, strict=True))
    kind = "greedy" if params.greedy else "sampled (same seed)"
    print(f"    {same}/{len(prompts)} {kind} sequences identical to the colocated engine (FP8 rounding may flip ties)")
    for p, toks in zip(prompts, res.tokens, strict=True):
        print(f"  {p}{tokenizer.decode(toks)}")


if __name__ == "__main__":
    sys.exit(main())
