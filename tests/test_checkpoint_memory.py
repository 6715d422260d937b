"""Peak host memory of load_pretrained on a checkpoint of a few hundred MB, measured in a fresh process.

On CPU the "devices" are host memory too, so the loaded model itself is resident afterwards; what the loader
adds on top (its transient buffers) must stay near one tensor, and the peak must stay well under the
checkpoint size when loading a float32 checkpoint as bfloat16 (a loader that read the checkpoint whole would
need at least the checkpoint's size again).
"""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
from safetensors.numpy import save_file

from step3_jax import Step3Config
from step3_jax.checkpoint import hf_shapes
from step3_jax.model import abstract_model

CONFIG = Step3Config(
    hidden_size=1024,
    num_hidden_layers=4,
    vocab_size=4096,
    num_attention_heads=8,
    num_attention_groups=1,
    head_dim=128,
    share_q_dim=512,
    intermediate_size=4096,
    moe_num_experts=8,
    moe_top_k=2,
    moe_intermediate_size=512,
    share_expert_dim=512,
    moe_layers_enum=(1, 2, 3),
    param_dtype="float32",
)

MEASURE = textwrap.dedent(
    """
    import json, os, resource, sys
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    from step3_jax import load_pretrained

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    jax.numpy.zeros(1).block_until_ready()  # start the backend before measuring
    try:  # reset the peak so that it covers the load only (Linux >= 4.0); otherwise the lifetime peak counts
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base = rss()
    model = load_pretrained(sys.argv[1], dtype="bfloat16", progress=False)
    leaves = jax.tree.leaves(jax.tree.map(lambda v: v.get_value(), model, is_leaf=lambda v: hasattr(v, "get_value")))
    jax.block_until_ready(leaves)
    model_bytes = sum(x.nbytes for x in leaves if hasattr(x, "nbytes"))
    print(json.dumps({"base": base, "peak": peak(), "after": rss(), "model_bytes": model_bytes}))
    """
)


def write_random_checkpoint(folder, config, num_files=4):
    """float32 tensors of the HF shapes, a few files, written one file at a time."""
    shapes = hf_shapes(abstract_model(config))
    keys = list(shapes)
    rng = np.random.default_rng(0)
    weight_map, largest = {}, 0
    for i in range(num_files):
        name = f"model-{i + 1:05d}-of-{num_files:05d}.safetensors"
        part = {k: rng.standard_normal(shapes[k], dtype=np.float32) * 0.02 for k in keys[i::num_files]}
        largest = max(largest, *(v.nbytes for v in part.values()))
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        del part
    total = sum(math.prod(s) * 4 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config.to_hf_config()))
    return total, largest


def test_peak_host_memory_stays_well_under_checkpoint_size(tmp_path):
    size, largest = write_random_checkpoint(tmp_path, CONFIG)
    assert 250e6 < size < 400e6
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    growth, resident, transient = m["peak"] - m["base"], m["after"] - m["base"], m["peak"] - m["after"]
    mb = {k: f"{v / 1e6:.0f} MB" for k, v in dict(growth=growth, resident=resident, transient=transient).items()}
    print(
        f"checkpoint {size / 1e6:.0f} MB (largest tensor {largest / 1e6:.1f} MB), bf16 model "
        f"{m['model_bytes'] / 1e6:.0f} MB: peak growth {mb['growth']}, resident after {mb['resident']}, "
        f"transient {mb['transient']}"
    )
    assert m["model_bytes"] == size // 2
    assert growth < 0.75 * size  # the model (half the checkpoint) plus a few tensors, never the checkpoint
    assert transient < 0.15 * size  # what the loader holds beyond the model: about one tensor in flight
