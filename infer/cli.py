"""Command-line pieces shared by ``python -m infer.generate``, ``python -m infer.afd`` and ``python -m infer.demo``:
the model source (checkpoint folder or preset), the sampling options, and turning them into objects."""

from __future__ import annotations

import argparse
import dataclasses
import math

from infer.sampling import SamplingParams
from step3_jax.config import PRESETS, Step3Config, get_preset
from step3_jax.tokenizer import ByteTokenizer, end_of_generation_ids


def add_model_args(ap: argparse.ArgumentParser, *, preset: str = "tiny", checkpoint: bool = True) -> None:
    """``--checkpoint`` (a Hugging Face folder; optional), ``--preset`` (random weights without a checkpoint),
    ``--dtype`` (parameter dtype)."""
    grp = ap.add_argument_group("model")
    if checkpoint:
        grp.add_argument("--checkpoint", help="Hugging Face checkpoint folder (config.json + safetensors)")
    what = "preset to build with random weights" + (" (without --checkpoint)" if checkpoint else "")
    grp.add_argument("--preset", default=preset, choices=sorted(PRESETS), help=what)
    grp.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="parameter dtype")


def add_sampling_args(
    ap: argparse.ArgumentParser,
    *,
    max_new_tokens: int = 32,
    seed_help: str = "seed for the random weights and for sampling",
) -> None:
    """``--max-new-tokens``, ``--temperature`` (0 = greedy), ``--top-k``, ``--top-p``, ``--seed``."""
    grp = ap.add_argument_group("sampling")
    grp.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    grp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    grp.add_argument("--top-k", type=int, default=0, help="0 = off")
    grp.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    grp.add_argument("--seed", type=int, default=0, help=seed_help)


def sampling_from_args(args: argparse.Namespace, stop_token_ids=()) -> SamplingParams:
    """The :class:`SamplingParams` the sampling options ask for (``ValueError`` naming a bad value)."""
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        stop_token_ids=tuple(stop_token_ids),
    )


def preset_config(args: argparse.Namespace) -> Step3Config:
    """The ``--preset`` config with ``--dtype`` applied."""
    config = get_preset(args.preset)
    return dataclasses.replace(config, param_dtype=args.dtype) if args.dtype else config


def byte_tokenizer_for(config: Step3Config, preset: str) -> ByteTokenizer:
    """The byte tokenizer used with presets; ``ValueError`` if the preset's vocabulary cannot hold its ids."""
    tokenizer = ByteTokenizer()
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"preset {preset!r} has vocab {config.vocab_size}, too small for the byte tokenizer "
            f"({tokenizer.vocab_size}); checkpoint tokenizers come with the checkpoint loader"
        )
    return tokenizer


def load_checkpoint(args: argparse.Namespace, mesh=None):
    """``(model, tokenizer)`` from ``--checkpoint`` (with ``--dtype``; every weight straight into its sharding on
    ``mesh``, if given)."""
    from step3_jax import load_pretrained
    from step3_jax.tokenizer import load_tokenizer

    model = load_pretrained(args.checkpoint, dtype=args.dtype, mesh=mesh, progress=False)
    return model, load_tokenizer(args.checkpoint)


def stop_ids(tokenizer, config: Step3Config) -> tuple[int, ...]:
    """Stop tokens: the tokenizer's end-of-generation ids (its EOS, and a checkpoint's generation_config.json
    list) if it has any, else the config's ``eos_token_id``, within the vocabulary."""
    return tuple(i for i in (end_of_generation_ids(tokenizer) or config.eos_token_ids) if i < config.vocab_size)


def check_fits_context(longest: int, max_new_tokens: int, config: Step3Config) -> None:
    """ValueError unless a prompt of ``longest`` tokens plus ``--max-new-tokens`` fits the model's context (a CLI
    checks this before any work)."""
    if longest + max_new_tokens > config.max_position_embedding:
        raise ValueError(
            f"a prompt of {longest} tokens + --max-new-tokens {max_new_tokens} exceeds the model's context of "
            f"{config.max_position_embedding} tokens"
        )


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (a count that 0 would not mean "the default" for)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_pipeline_args(group, *, micro_batches: int, prefix: str = "") -> None:
    """``--micro-batches``, ``--transfer`` and ``--cpu-devices`` of an AFD run, in argument group ``group``
    (``prefix`` starts each help text, e.g. "with --afd: ")."""
    from infer.afd import TRANSFERS

    group.add_argument("--micro-batches", type=int, default=micro_batches, help=f"{prefix}micro-batches per step")
    group.add_argument("--transfer", default="fp8", choices=TRANSFERS, help=f"{prefix}A->F hidden-state format")
    group.add_argument("--cpu-devices", type=int, default=None, help="fake this many CPU devices (CPU only)")


def check_pipeline_args(ap: argparse.ArgumentParser, args: argparse.Namespace, *, afd: bool = True) -> None:
    """Refuse (``ap.error``) pipeline arguments that cannot be right, or (``afd=False``: a run without
    disaggregation) that would be ignored."""
    if args.cpu_devices is not None and args.cpu_devices < 1:
        ap.error(f"--cpu-devices must be at least 1, got {args.cpu_devices}")
    if args.micro_batches < 1:
        ap.error(f"--micro-batches must be at least 1, got {args.micro_batches}")
    if not afd:
        ignored = [
            f"--{n.replace('_', '-')}" for n in ("micro_batches", "transfer") if getattr(args, n) != ap.get_default(n)
        ]
        if ignored:
            ap.error(f"{' and '.join(ignored)} set how --afd runs; without --afd they would be ignored")


def add_process_args(ap: argparse.ArgumentParser, roles: str, *, attention_processes: bool = False) -> None:
    """``--coordinator``, ``--process-id``, ``--num-processes``, ``--peer-timeout`` (and ``--attention-processes``)
    for a multi-process (``jax.distributed``) run; ``roles`` says what the processes do."""
    mp = ap.add_argument_group(
        f"multi-process (jax.distributed): {roles}; start every process with the same arguments but --process-id"
    )
    mp.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator; runs this as one of the processes")
    mp.add_argument("--process-id", type=int, help="this process's index, 0 .. --num-processes - 1")
    mp.add_argument("--num-processes", type=int, default=None, help="processes in the job (default 2)")
    if attention_processes:
        mp.add_argument("--attention-processes", type=int, default=None,
                        help="K: processes 0 .. K-1 run the attention side (default: half, rounded down)")  # fmt: skip
    mp.add_argument("--peer-timeout", type=float, default=120.0,
                    help="seconds to wait for the other processes to join, and for a peer that stops")  # fmt: skip


def check_process_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``ap.error``) a multi-process request that cannot be right; fills in ``--num-processes``."""
    if (args.coordinator is None) != (args.process_id is None):
        ap.error("--coordinator and --process-id go together (one per process, the same coordinator for all)")
    if args.coordinator is None and (
        args.num_processes is not None or getattr(args, "attention_processes", None) is not None
    ):
        ap.error("--num-processes and --attention-processes are for multi-process runs (with --coordinator)")
    if args.coordinator is not None:
        args.num_processes = 2 if args.num_processes is None else args.num_processes
        if args.num_processes < 2:
            ap.error(f"--num-processes must be at least 2 (one per side), got {args.num_processes}")
        if not 0 <= args.process_id < args.num_processes:
            ap.error(f"--process-id must be in 0 .. {args.num_processes - 1} (--num-processes), got {args.process_id}")


def join_processes(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` as ``--process-id`` of ``--num-processes`` at ``--coordinator`` (gloo
    collectives for CPU devices), waiting at most ``--peer-timeout`` seconds for the others."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process collectives on CPU devices
    wait = max(1, math.ceil(args.peer_timeout))
    print(
        f"joining the {args.num_processes}-process job at {args.coordinator} as process {args.process_id} "
        f"(waiting up to {wait} s for the other processes; if they never come, JAX ends this one with "
        "DEADLINE_EXCEEDED)",
        flush=True,
    )
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=wait,
    )
