"""One process of the multi-process checkpoint test (tests/test_checkpoint.py): one fake CPU device per process,
gloo collectives, ``jax.distributed`` on localhost.

    python tests/load_worker.py PROCESS_ID PORT OUT_JSON [--min-skip BYTES] NAME=FOLDER:QUANTIZATION[:AXIS] ...

Two processes load each checkpoint folder with ``load_pretrained`` on an ``AXIS=2`` mesh (``expert``, the default,
or ``tensor``) over both processes' devices (QUANTIZATION: ``auto``, ``fp8`` or ``none``), and again whole onto
this process's own device (``--min-skip``: ``safetensors_io.MIN_SKIP_BYTES`` for the run). Writes
``{NAME: {"read": bytes this process read, "total": bytes of the tensors loaded, "mismatched": [parameter paths
whose shards here differ from the whole load]}}`` to ``OUT_JSON.<process id>``."""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 1)
jax.config.update("jax_cpu_collectives_implementation", "gloo")


class _Reads:
    """Collects the ``load_tensors`` log line (bytes read, bytes loaded)."""

    def __init__(self):
        import logging

        self.lines = []
        handler = logging.Handler()
        handler.emit = lambda record: self.lines.append(record.getMessage())
        logging.getLogger("step3_jax.checkpoint.hf").addHandler(handler)
        logging.getLogger("step3_jax.checkpoint.hf").setLevel(logging.INFO)


def main() -> int:
    import json
    import re

    import numpy as np
    from flax import nnx

    from step3_jax import load_pretrained, make_mesh
    from step3_jax.checkpoint import safetensors_io

    args = sys.argv[4:]
    if args[0] == "--min-skip":  # (runs of bytes closer than this are read as one: 0 reads each run alone)
        safetensors_io.MIN_SKIP_BYTES, args = int(args[1]), args[2:]
    process_id, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id, initialization_timeout=60
    )
    reads, results = _Reads(), {}
    for case in args:
        name, rest = case.split("=", 1)
        axis = "expert"
        if rest.endswith((":expert", ":tensor")):
            rest, axis = rest.rsplit(":", 1)
        folder, quantization = rest.rsplit(":", 1)
        quantization = None if quantization == "none" else quantization
        model = load_pretrained(folder, quantization=quantization, mesh=make_mesh(**{axis: 2}), progress=False)
        read, total = (int(n) for n in re.search(r"read (\d+) of their (\d+) bytes", reads.lines[-1]).groups())
        whole = dict(nnx.to_flat_state(nnx.state(load_pretrained(folder, quantization=quantization, progress=False))))
        mismatched = []
        for path, var in nnx.to_flat_state(nnx.state(model)):
            want = np.asarray(whole[path].get_value())
            for shard in var.get_value().addressable_shards:
                got = np.asarray(shard.data)
                if got.dtype != want.dtype or got.tobytes() != want[shard.index].tobytes():
                    mismatched.append("/".join(map(str, path)))
        results[name] = {"read": read, "total": total, "mismatched": mismatched}
    with open(f"{out}.{process_id}", "w") as fh:
        json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
