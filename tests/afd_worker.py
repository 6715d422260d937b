"""One process of the multi-process AFD tests (tests/test_afd.py): fake CPU devices, gloo collectives,
``jax.distributed`` on localhost.

    python tests/afd_worker.py PROCESS_ID PORT OUT_JSON [--processes 2] [--devices 4] [--splits 4x4,3x2,2x3]
                               [--checkpoint DIR] [--exit-early] [--engine] [--hang-at STEP] [--die-at STEP]
                               [--peer-timeout S] [--attention-processes K] [--instances] [--mismatch]
                               [--logits]

``--processes`` processes with ``--devices`` fake CPU devices each; the first half of the processes (rounded down)
run the attention side, the others the FFN side. For each ``MxN`` of ``--splits`` (default 4x4) the runner takes M
attention and N FFN devices, split evenly over each side's processes, and generates; every attention process
writes ``{"MxN": tokens}`` to ``OUT_JSON.<process id>``. ``--checkpoint`` reads the weights from a checkpoint
folder (``AFDRunner.from_checkpoint``) instead of initialising them on the submeshes; ``--logits`` also saves
each attention process's logits of every step to ``OUT_JSON.<process id>.<MxN>.npy``. With ``--exit-early``
process 1 exits right after joining (a failed peer), and process 0 must then exit with a clear error instead of
hanging. With ``--engine`` process 0 runs the continuous-batching engine over the runner of the first split (the
others ``serve()`` its steps); ``--hang-at K`` makes process 1 hang (alive, heartbeats going) in the K-th step it
serves, and the others must then exit with a clear error within ``--peer-timeout`` seconds (default 45);
``--die-at K`` makes process 1 exit as the K-th step it serves begins. ``--attention-processes K`` gives the
attention side K processes. With ``--instances`` every attention process is an independent attention instance
(``AFDConfig.instances = "per-process"``) with its own engine, running the prompts ``i`` with ``i % K`` = its
process index, each with :func:`instance_params` ``(i)``; it writes ``{"i": tokens}``. ``--mismatch`` gives process
1's engine another max_batch (a clear error on every process, before any step); ``--die-at K`` with
``--instances`` makes process 1 exit as its K-th round begins."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402


def _opt(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def main() -> int:
    import dataclasses
    import json
    import logging

    import numpy as np

    from infer.afd import AFDConfig, AFDRunner
    from step3_jax.config import get_preset

    logging.basicConfig(level=logging.INFO, format=f"[process {sys.argv[1]}] %(message)s")
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=int(_opt("--processes", "2")),
        process_id=process_id,
        initialization_timeout=60,
        # short enough that the dead-peer test ends soon, long enough for a loaded 2-core machine: at 10 s a
        # clean-clone CI run once saw both (live) processes declared dead in the middle of a run
        heartbeat_timeout_seconds=30,
        shutdown_timeout_seconds=10,
    )
    if "--exit-early" in sys.argv and process_id == 1:
        os._exit(0)  # a peer that dies after joining: no goodbye, no shutdown barrier
    # the test's config, prompts and seed (tests/test_afd.py)
    config = dataclasses.replace(get_preset("test"), param_dtype="float32", moe_num_experts=8)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, config.vocab_size, size=n)] for n in (5, 3, 7, 4, 6, 2, 5)]
    checkpoint = _opt("--checkpoint", "")
    tokens = {}
    timeout = float(_opt("--peer-timeout", "45"))
    for split in _opt("--splits", "4x4").split(","):
        m, n = (int(v) for v in split.split("x"))
        afd = AFDConfig(
            attention_devices=m, ffn_devices=n, micro_batches=3, transfer="model", peer_timeout_s=timeout,
            attention_processes=int(_opt("--attention-processes", "0")) or None,
        )  # fmt: skip
        if "--instances" in sys.argv:
            tokens = _instances(config, dataclasses.replace(afd, micro_batches=2, instances="per-process"), prompts)
            break
        if "--engine" in sys.argv:
            tokens[split] = _engine(
                config, dataclasses.replace(afd, micro_batches=2), prompts, int(_opt("--hang-at", "0")),
                int(_opt("--die-at", "0")),
            )  # fmt: skip
            break
        if checkpoint:
            runner = AFDRunner.from_checkpoint(checkpoint, afd)
        else:
            runner = AFDRunner.create(config, afd, seed=3)
        result = runner.generate(prompts, 4, return_logits="--logits" in sys.argv)
        if runner.has_attention:
            tokens[split] = result.tokens
            if result.logits is not None:
                np.save(f"{out}.{process_id}.{split}.npy", np.stack(result.logits))
    tokens = {k: v for k, v in tokens.items() if v is not None}
    if tokens:
        with open(f"{out}.{process_id}", "w") as fh:
            json.dump(tokens, fh)
    return 0


def _engine(config, afd, prompts, hang_at: int, die_at: int):
    """The engine over a multi-process runner: process 0 schedules, the others serve; returns process 0's tokens."""
    import time

    from infer.afd import AFDRunner
    from infer.engine import Engine, EngineConfig
    from infer.sampling import SamplingParams

    runner = AFDRunner.create(config, afd, seed=3)
    if jax.process_index() != 0:
        if (hang_at or die_at) and jax.process_index() == 1:
            serve_step, served = runner._serve_step, [0]

            def failing(*args, **kwargs):
                served[0] += 1
                if served[0] == hang_at:  # a peer that hangs (alive, its heartbeats going) mid-step
                    time.sleep(3600)
                if served[0] == die_at:  # a peer that dies as a step begins
                    os._exit(3)
                return serve_step(*args, **kwargs)

            runner._serve_step = failing
        runner.serve()
        return None
    try:
        engine = Engine(runner, EngineConfig(max_batch=4, max_seq_len=32, page_size=8, prefill_chunk=16))
        return [o.token_ids for o in engine.generate_outputs(prompts, SamplingParams(max_new_tokens=4))]
    finally:
        runner.release()


def instance_params(i: int):
    """The sampling of prompt ``i`` in the ``--instances`` run (tests/test_afd.py runs the same colocated): the
    even prompts greedy and short, the odd ones sampled and longer, so one instance closes while the other runs."""
    from infer.sampling import SamplingParams

    if i % 2 == 0:
        return SamplingParams(max_new_tokens=3)
    return SamplingParams(temperature=0.8, top_k=20, seed=100 + i, max_new_tokens=9)


def _instances(config, afd, prompts):
    """Per-process attention instances: each attention process's own engine over its share of the prompts, then
    ``close()``; the FFN processes serve every instance's steps. Returns this instance's tokens by prompt index."""
    from infer.afd import AFDRunner
    from infer.engine import Engine, EngineConfig

    runner = AFDRunner.create(config, afd, seed=3)
    if not runner.has_attention:
        runner.serve()
        return {}
    k, count = jax.process_index(), runner.attention_processes
    die_at = int(_opt("--die-at", "0"))
    if die_at and k == 1:
        agree, rounds = runner.agree_round, [0]

        def dying(**kwargs):  # an instance that dies between two rounds
            rounds[0] += 1
            if rounds[0] == die_at:
                os._exit(3)
            return agree(**kwargs)

        runner.agree_round = dying
    max_batch = 8 if "--mismatch" in sys.argv and k == 1 else 4
    engine = Engine(runner, EngineConfig(max_batch=max_batch, max_seq_len=32, page_size=8, prefill_chunk=16))
    mine = [i for i in range(len(prompts)) if i % count == k]
    outs = engine.generate_outputs([prompts[i] for i in mine], [instance_params(i) for i in mine])
    engine.close()
    return {str(i): o.token_ids for i, o in zip(mine, outs, strict=True)}


if __name__ == "__main__":  # (set up here, so that the tests can import instance_params)
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_num_cpu_devices", int(_opt("--devices", "4")))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sys.exit(main())
