"""Train a Step-3-shaped model: optax AdamW, MoE load balancing, sharding, orbax checkpoints, exact resume.

Importable (``Trainer``) and a CLI (``python -m train.train --help``).

- Parameters and AdamW state are float32; the forward runs in ``compute_dtype`` (bfloat16 by default)
  by casting the parameters inside the loss, so gradients land on the float32 master weights.
- Loss = next-token cross-entropy (within documents) + ``aux_loss_coef`` * load-balancing loss
  (E * sum_e f_e * P_e per MoE layer: f_e the fraction of routed slots, P_e the mean router probability)
  + ``z_loss_coef`` * router z-loss (mean logsumexp(router logits)^2).
- A step whose loss or gradients are not finite is skipped (parameters and optimizer state unchanged)
  and counted; ``max_bad_steps`` of them in a row stop the run with an error.
- Checkpoints (orbax, asynchronous, last ``keep`` kept) hold parameters, optimizer state, step, the count of
  skipped steps and the data iterator state, so a resumed run continues the exact loss trajectory. Orbax writes each
  checkpoint to a temporary directory and renames it when complete, so an interrupted save never
  damages the previous one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from step3_jax.config import PRESETS, Step3Config, get_preset
from step3_jax.init_rng import init_key
from step3_jax.model import SCALE_SUFFIX, Step3ForCausalLM, count_params, create_model
from step3_jax.quant import FP8_DTYPE
from step3_jax.sharding import DEFAULT_RULES, ShardingRules, mesh_from_spec
from train import lora as lora_lib
from train.data import (
    BatchIterator,
    PackedDataset,
    embedded_corpus,
    pack_documents,
    read_documents,
    read_utf8,
    split_documents,
)
from train.lora import LoraConfig

log = logging.getLogger(__name__)

# Dense BF16 peak FLOP/s by device kind, for the MFU estimate (vendor datasheets).
PEAK_BF16_FLOPS = {"NVIDIA H200": 989e12, "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H800": 989e12}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters and run settings (sequence length, batch, schedule, checkpointing, logging)."""

    seq_len: int = 256
    batch_size: int = 16  # sequences per optimizer step (all accumulation micro-batches together)
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    compute_dtype: str = "bfloat16"
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    max_bad_steps: int = 5
    log_every: int = 10
    eval_every: int = 0  # with held-out data: evaluate every this many steps (0: only after the last step)

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "keep", "max_bad_steps", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an int >= 1, got {v!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}"
            )
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainConfig.lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}"
            )
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"TrainConfig.compute_dtype must be bfloat16 or float32, got {self.compute_dtype!r}")
        if self.warmup_steps < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ValueError("TrainConfig.warmup_steps, save_every and eval_every must be >= 0")
        if not math.isfinite(self.lr):
            raise ValueError(f"TrainConfig.lr must be finite, got {self.lr}")
        for name in ("b1", "b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "clip_norm", "aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {v}")


# The command line's help for TrainConfig's fields (``--seq-len`` ...).
TRAIN_FLAG_HELP = {
    "seq_len": "tokens per training row",
    "batch_size": "rows per optimizer step (all --grad-accum micro-batches together)",
    "grad_accum": "split each step's batch into this many micro-batches",
    "steps": "optimizer steps of the whole run",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule ends at lr x this",
    "warmup_steps": "linear warm-up steps",
    "weight_decay": "AdamW weight decay (not on norms and biases)",
    "b1": "AdamW beta1",
    "b2": "AdamW beta2",
    "clip_norm": "clip gradients to this global norm (0: no clipping)",
    "aux_loss_coef": "MoE load-balancing loss weight",
    "z_loss_coef": "router z-loss weight",
    "compute_dtype": "bfloat16 or float32 forward",
    "seed": "model init, packing, batch order and --eval-fraction split",
    "save_every": "checkpoint every this many steps (0: only at the end)",
    "keep": "checkpoints kept",
    "max_bad_steps": "stop after this many non-finite steps in a row",
    "log_every": "log line / progress-bar update every this many steps",
    "eval_every": "with held-out data, evaluate every this many steps (0: after the last)",
}


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0 to ``tc.lr`` over ``tc.warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at
    ``tc.steps``: the learning rate of the n-th applied update (counting from 0)."""
    decay_steps = max(tc.steps, tc.warmup_steps + 1)
    end = tc.lr * tc.min_lr_ratio
    return optax.warmup_cosine_decay_schedule(0.0, tc.lr, tc.warmup_steps, decay_steps, end_value=end)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Global-norm gradient clipping + AdamW, as ``tc`` sets them. The learning rate, betas and weight decay live
    in the optimizer state (``optax.inject_hyperparams``; the learning rate starts at ``tc.lr``): the
    :class:`Trainer` writes :func:`lr_schedule` of the update count there before every update, so one compiled
    step serves any learning rate, schedule length or warm-up (changing them in a notebook does not recompile)."""
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask",))
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm) if tc.clip_norm else optax.identity(),
        adamw(learning_rate=tc.lr, b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay, mask=_decay_mask),
    )


def _decay_mask(params):
    # No weight decay on norm weights (vectors).
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def forward_with_router(model: Step3ForCausalLM, input_ids, positions, segment_ids):
    """Logits and, per MoE layer, (router logits [B, T, E], expert ids [B, T, C]). Runs the same layer
    halves (attention, then FFN on the routed tokens) as the model's own forward."""
    x = model.embed(input_ids)
    router = []
    for layer in model.layers:
        h, normed, _ = layer.attention(x, positions, segment_ids=segment_ids)
        routing = None
        if layer.is_moe:
            logits = layer.moe.router_logits(normed)
            routing = layer.moe.route_from_logits(logits)
            router.append((logits, routing[1]))
        x = h + layer.ffn(normed, routing)
    return model.logits(x), router


def balance_losses(router, num_experts: int):
    """(load-balancing loss, router z-loss, expert load [L_moe, E]) averaged over MoE layers."""
    if not router:
        zero = jnp.zeros((), jnp.float32)
        return zero, zero, jnp.zeros((0, num_experts), jnp.float32)
    aux, z, loads = [], [], []
    for logits, ids in router:
        logits = logits.reshape(-1, num_experts)
        probs = jax.nn.softmax(logits, axis=-1)
        load = jnp.bincount(ids.reshape(-1), length=num_experts) / ids.size  # fraction of routed slots
        aux.append(num_experts * jnp.sum(load * probs.mean(axis=0)))
        z.append(jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2))
        loads.append(load)
    return jnp.mean(jnp.stack(aux)), jnp.mean(jnp.stack(z)), jnp.stack(loads)


def _full_params(trainable, frozen):
    return trainable


def _to_compute_dtype(params, compute):
    """Float parameters in ``compute`` dtype; block-FP8 weights and their float32 scales stay as they are (the
    model runs its FP8 matmuls on them, as at inference)."""

    def one(keypath, p):
        names = lora_lib._path(keypath)  # (an nnx.State path ends in the Variable's ``.value``: skip to its name)
        name = str(names[-1]) if names else ""
        if not jnp.issubdtype(p.dtype, jnp.floating) or p.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX):
            return p
        return p.astype(compute)

    return jax.tree_util.tree_map_with_path(one, params)


def _to_float32(params):
    """Float parameters as float32 (sharding kept); anything else as it is."""
    return jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)


def loss_fn(
    trainable,
    frozen,
    graphdef,
    batch,
    tc: TrainConfig,
    num_experts: int,
    combine=_full_params,
    coefs=None,
    targets: jax.Array | None = None,
    parts: int = 1,
):
    """``combine(trainable, frozen)`` gives the model's parameters (identity for full training, base + adapters
    for LoRA); only ``trainable`` is differentiated. ``coefs``: (load-balancing, z-loss) coefficients as arrays
    (the train step passes them so they are not compiled in), by default ``tc``'s.

    The cross-entropy is summed over the batch's target tokens and divided by ``targets`` (default: their count
    here): a micro-batch of ``parts`` passes the whole batch's count, and its router losses count 1 / ``parts``,
    so the micro-batches' losses add up to the whole batch's, however the targets fall among them (conversations
    train only their answers, so micro-batches can hold very different numbers of targets)."""
    params = combine(trainable, frozen)
    model = nnx.merge(graphdef, _to_compute_dtype(params, jnp.dtype(tc.compute_dtype)))
    logits, router = forward_with_router(model, batch["input_ids"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    mask = batch["loss_mask"]
    count = jnp.sum(mask) if targets is None else targets
    ce = jnp.sum(ce * mask) / jnp.maximum(count, 1.0)
    aux, z, load = balance_losses(router, num_experts)
    aux_coef, z_coef = (tc.aux_loss_coef, tc.z_loss_coef) if coefs is None else coefs
    total = ce + (aux_coef * aux + z_coef * z) / parts
    return total, {"loss": ce, "aux_loss": aux, "z_loss": z, "expert_load": load}


def eval_sums(trainable, frozen, graphdef, batch, tc: TrainConfig, combine=_full_params):
    """(sum of the target tokens' cross-entropy, number of target tokens) of one batch: the model in ``tc``'s
    compute dtype, as the training loss sees it, without the router losses."""
    params = combine(trainable, frozen)
    model = nnx.merge(graphdef, _to_compute_dtype(params, jnp.dtype(tc.compute_dtype)))
    logits, _ = forward_with_router(model, batch["input_ids"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    return jnp.sum(ce * batch["loss_mask"]), jnp.sum(batch["loss_mask"])


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(graphdef, tx, tc: TrainConfig, num_experts: int, combine=_full_params):
    """The step ``(params, opt_state, frozen, batch, coefs) -> (params, opt_state, metrics)``: gradient
    accumulation, the update applied only when loss and gradients are finite; ``coefs`` = (load-balancing, z-loss)
    coefficients as float32 scalars."""

    def step(params, opt_state, frozen, batch, coefs):
        def grad_fn(params, frozen, batch, targets=None):
            loss = jax.value_and_grad(loss_fn, has_aux=True)
            return loss(params, frozen, graphdef, batch, tc, num_experts, combine, coefs, targets, tc.grad_accum)

        if tc.grad_accum == 1:
            (_, metrics), grads = grad_fn(params, frozen, batch)
        else:
            # every micro-batch's cross-entropy is divided by the whole batch's target count: the summed gradients
            # are then the whole batch's (router losses: the mean over micro-batches)
            targets = jnp.sum(batch["loss_mask"])
            micro = jax.tree.map(lambda x: x.reshape(tc.grad_accum, -1, *x.shape[1:]), batch)

            def body(acc, mb):
                (_, m), g = grad_fn(params, frozen, mb, targets)
                return jax.tree.map(jnp.add, acc, (g, m)), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            first = jax.tree.map(lambda x: x[0], micro)
            m0 = jax.eval_shape(lambda: grad_fn(params, frozen, first, targets)[0][1])
            init = (zeros, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0))
            (grads, metrics), _ = jax.lax.scan(body, init, micro)
            # ("loss" is already the sum of token-weighted parts; the router metrics are averaged)
            metrics = {k: v if k == "loss" else v / tc.grad_accum for k, v in metrics.items()}
        finite = jnp.isfinite(metrics["loss"]) & _all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), finite=finite)
        return keep(new_params, params), keep(new_opt, opt_state), metrics

    return step


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, incompatible resume, unsupported setup), with the reason."""


def init_opt_state(tx: optax.GradientTransformation, params, mesh=None):
    """``tx.init(params)`` with every parameter-shaped part of the state (Adam's moments) sharded like its
    parameter and the rest (step counts) replicated over ``mesh``. Left to ``jit``, the moments come out
    replicated on every device (a full copy of the optimizer state per device) and the train step recompiles
    at its second call, when they come back sharded."""
    if mesh is None:
        return jax.jit(tx.init)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        jax.tree.map(lambda p: p.sharding, params),
        transform_non_params=lambda _: replicated,
    )
    return jax.jit(tx.init, out_shardings=shardings)(params)


class Trainer:
    """Owns model parameters, optimizer state, data iterator and checkpoints of one run."""

    def __init__(
        self,
        model_config: Step3Config,
        train_config: TrainConfig,
        data: PackedDataset,
        *,
        mesh=None,
        rules: ShardingRules = DEFAULT_RULES,
        workdir: str | Path | None = None,
        base_model: Step3ForCausalLM | None = None,
        lora: LoraConfig | None = None,
        eval_data: PackedDataset | None = None,
    ):
        """Train ``model_config`` from scratch, or from ``base_model``'s weights (e.g. ``load_pretrained``);
        with ``lora``, only LoRA adapters on ``base_model`` (or a fresh model) are trained. A block-FP8 model
        (``quantization="fp8"``) trains LoRA adapters only; its FP8 targets are dequantised on the fly.
        ``eval_data``: held-out rows that :meth:`evaluate` (and :func:`run`, every ``eval_every`` steps) scores."""
        for what, rows in (("data", data), ("eval_data", eval_data)):
            if rows is not None and rows.seq_len != train_config.seq_len:
                raise ValueError(
                    f"{what} rows have seq_len {rows.seq_len}, the train config says {train_config.seq_len}"
                )
        if train_config.seq_len > model_config.max_position_embedding:
            raise ValueError(
                f"seq_len {train_config.seq_len} exceeds the model's max_position_embedding "
                f"{model_config.max_position_embedding}"
            )
        if lora is None and model_config.quantization == "fp8":
            raise ValueError(
                "full training needs float weights, but this model's are block-FP8 (quantization='fp8'): train LoRA "
                "adapters on it (lora=LoraConfig(...)), or train a float copy (load_pretrained(..., quantization=None))"
            )
        self.tc, self.data, self.mesh, self.rules, self.lora = train_config, data, mesh, rules, lora
        self._base = None  # where the base weights came from (run.json), and a fingerprint of them
        self._base_weights = None
        if base_model is not None:
            from step3_jax.checkpoint import checkpoint_folder

            folder = checkpoint_folder(base_model)
            self._base = str(folder.resolve()) if folder is not None else "(a model without a checkpoint folder)"
            self._base_weights = checkpoint_fingerprint(folder) if folder is not None else None
        self.eval_data = eval_data
        self.workdir = Path(workdir) if workdir is not None else None
        if base_model is not None:
            if base_model.config != model_config:
                diff = [
                    f"{f.name} ({getattr(base_model.config, f.name)!r} vs {getattr(model_config, f.name)!r})"
                    for f in dataclasses.fields(model_config)
                    if getattr(base_model.config, f.name) != getattr(model_config, f.name)
                ]
                raise ValueError(
                    f"base_model.config differs from model_config in {', '.join(diff)}: pass base_model.config"
                )
            self.model_config = model_config
            model = base_model
            if lora is None and model_config.param_dtype != "float32":
                # Full finetuning keeps float32 master weights (and AdamW moments) whatever the loaded dtype: in
                # BF16, small updates would round away. The caller's model is left as it is.
                self.model_config = dataclasses.replace(model_config, param_dtype="float32")
                graphdef, state = nnx.split(base_model)
                model = nnx.merge(graphdef, _to_float32(state))
                model.config = self.model_config
        else:
            # Full training keeps float32 master weights; LoRA leaves the base in its own dtype.
            dtype = "float32" if lora is None else model_config.param_dtype
            self.model_config = dataclasses.replace(model_config, param_dtype=dtype)
            model = create_model(self.model_config, seed=train_config.seed, mesh=mesh, rules=rules)
        self.graphdef, state = nnx.split(model)
        if lora is None:
            self.params, self.frozen, combine = state, None, _full_params
        else:
            self.frozen = state
            self.params = lora_lib.init_lora(state, lora, init_key(train_config.seed + 1))
            if mesh is not None:  # (the adapters are small: a copy on every device of the mesh)
                self.params = jax.device_put(self.params, NamedSharding(mesh, PartitionSpec()))

            def combine(adapters, base):
                return lora_lib.apply_lora(base, adapters, lora)

        self._combine = combine
        self.tx = make_optimizer(train_config)
        self._schedule = lr_schedule(train_config)
        self.opt_state = init_opt_state(self.tx, self.params, mesh)
        if mesh is None:
            # Committed to one device, as restored checkpoints are: a resumed run then compiles the same step
            # program as a fresh one (a hit in JAX's persistent compilation cache, when that is on).
            device = next(iter(jax.tree.leaves(self.params)[0].devices()))
            state = (self.params, self.opt_state, self.frozen)
            self.params, self.opt_state, self.frozen = jax.device_put(state, device)
        self.step = 0
        self.bad_in_row = 0
        self.skipped = 0
        self.iterator = BatchIterator(data, train_config.batch_size, seed=train_config.seed)
        self._step_fn = jax.jit(
            make_train_step(self.graphdef, self.tx, train_config, self.model_config.moe_num_experts, combine),
            donate_argnums=(0, 1),
        )
        self._eval_fn = jax.jit(lambda p, f, b: eval_sums(p, f, self.graphdef, b, train_config, combine))
        self.manager = None
        if self.workdir is not None:
            self.manager = ocp.CheckpointManager(
                (self.workdir / "checkpoints").resolve(),
                options=ocp.CheckpointManagerOptions(max_to_keep=train_config.keep, create=True),
            )
            self._check_run_metadata()

    # ------------------------------------------------------------------ checkpoints
    def _run_metadata(self) -> dict[str, Any]:
        """What a resumed run must share with the one in the workdir to continue it exactly: the model, the base
        weights (a fingerprint of them; their folder is kept to find them again), the LoRA setting, the packed
        training rows and how they are drawn. Not the accumulation count: it splits the same batch differently."""
        lora = dataclasses.asdict(self.lora) if self.lora else None
        return {
            "model": self.model_config.to_hf_config(),
            "seq_len": self.tc.seq_len,
            "lora": lora,
            "base": self._base,
            "base_weights": self._base_weights,
            "data": self.data.fingerprint(),
            "batch_size": self.tc.batch_size,
            "seed": self.tc.seed,
        }

    def _check_run_metadata(self) -> None:
        meta_path = self.workdir / "run.json"
        now = json.loads(json.dumps(self._run_metadata()))
        if meta_path.exists() and self.manager.latest_step() is not None:
            saved = json.loads(meta_path.read_text())
            # Compared: every key the saved run has (one from an older version that it lacks is not), the base by
            # its weights where both runs have their fingerprint (the same weights in another folder are the same
            # base), else by its folder.
            by_weights = saved.get("base_weights") is not None and now["base_weights"] is not None
            skip = {"model", "base"} if by_weights else {"model", "base_weights"}
            diff = [k for k in now if k not in skip and k in saved and saved[k] != now[k]]
            old_model, new_model = saved.get("model") or {}, now["model"]
            diff += sorted(
                f"model.{k}" for k in set(old_model) | set(new_model) if old_model.get(k) != new_model.get(k)
            )
            if diff:
                started = "from scratch (--preset)" if saved.get("base") is None else f"from {saved['base']}"
                named = {
                    "data": "data (the packed rows: other files or file order, another --chat-template or tokenizer, "
                    "--seed or --eval-fraction)",
                    "base": f"base (the run started {started})",
                    "base_weights": f"base (the run started {started}; these are other weights)",
                }
                raise ValueError(
                    f"{self.workdir} holds another run (differs in: {', '.join(named.get(k, k) for k in diff)}): "
                    f"resume it as it was started, or use another --workdir (to go on with other data or settings, "
                    f"start a new run from an --export of this one); nothing was overwritten"
                )
            if saved.get("base") != now["base"]:  # the same base weights, moved: found here from now on
                log.info("the base checkpoint of %s is now %s (was %s)", self.workdir, now["base"], saved.get("base"))
            if saved.get("base") != now["base"] or saved.get("base_weights") != now["base_weights"]:
                # (also a run.json of an older version, upgraded with the fingerprint once its folder matched)
                meta_path.write_text(json.dumps(now, indent=1))
        else:  # a new run, or one that stopped before its first checkpoint (nothing to resume: it starts afresh)
            self.workdir.mkdir(parents=True, exist_ok=True)
            meta_path.write_text(json.dumps(now, indent=1))

    def _state(self):
        return {"params": self.params, "opt_state": self.opt_state}

    def save(self, *, wait: bool = False) -> None:
        if self.manager is None:
            return
        self.manager.save(
            self.step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(self._state()),
                progress=ocp.args.JsonSave(
                    {
                        "step": self.step,
                        "data": self.iterator.get_state(),
                        "skipped": self.skipped,
                        "bad_in_row": self.bad_in_row,
                    }
                ),
            ),
        )
        if wait:
            self.manager.wait_until_finished()

    def restore(self) -> bool:
        """Restore the latest checkpoint in the workdir; False if there is none."""
        if self.manager is None or self.manager.latest_step() is None:
            return False
        step = self.manager.latest_step()
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self._state())
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), progress=ocp.args.JsonRestore()),
        )
        self.params = restored.state["params"]
        self.opt_state = restored.state["opt_state"]
        progress = restored.progress
        self.step, self.skipped = progress["step"], progress["skipped"]
        self.bad_in_row = progress.get("bad_in_row", 0)
        self.iterator.set_state(progress["data"])
        log.info("resumed from step %d", step)
        return True

    # ------------------------------------------------------------------ training
    def _device_batch(self, batch: dict[str, np.ndarray]):
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}
        return {
            k: jax.device_put(v, self.rules.sharding(self.mesh, ("act_batch", None), v.shape)) for k, v in batch.items()
        }

    def train_step(self, *, save: bool = True) -> dict[str, Any]:
        """One optimizer step on the next batch; its metrics. With ``save`` (the default) it then writes the
        checkpoint when ``save_every`` says so (:func:`run` saves itself, after the step's metrics are logged)."""
        batch = self._device_batch(next(self.iterator))
        # the learning rate of this update (skipped updates do not advance the schedule), where the last one was
        hyper = self.opt_state[1].hyperparams
        lr = self._schedule(self.step - self.skipped)
        hyper["learning_rate"] = jax.device_put(np.float32(lr), hyper["learning_rate"].sharding)
        coefs = (np.float32(self.tc.aux_loss_coef), np.float32(self.tc.z_loss_coef))
        self.params, self.opt_state, metrics = self._step_fn(self.params, self.opt_state, self.frozen, batch, coefs)
        metrics = dict(jax.device_get(metrics), lr=float(lr))
        self.step += 1
        if not bool(metrics["finite"]):
            self.skipped += 1
            self.bad_in_row += 1
            log.warning("step %d: non-finite loss or gradients, update skipped", self.step)
            if self.bad_in_row >= self.tc.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_in_row} steps in a row had non-finite loss or gradients (last at step {self.step}); "
                    "stopping. The last good checkpoint is intact."
                )
        else:
            self.bad_in_row = 0
        if save:
            self.save_if_due()
        return metrics

    def save_if_due(self) -> None:
        """Write a checkpoint if this step is one of every ``save_every`` (and there is a workdir)."""
        if self.manager is not None and self.tc.save_every and self.step % self.tc.save_every == 0:
            self.save()

    def evaluate(self, data: PackedDataset | None = None) -> dict[str, float]:
        """Mean cross-entropy per target token over every row of ``data`` (default: the trainer's ``eval_data``),
        and its perplexity, with the current parameters. Rows go through in micro-batches of the training step's
        size; the last is filled up with masked rows, so every row counts exactly once."""
        data = self.eval_data if data is None else data
        if data is None:
            raise ValueError("no evaluation data: pass eval_data to the Trainer, or data to evaluate()")
        rows = self.tc.batch_size // self.tc.grad_accum
        total, count = 0.0, 0.0
        for start in range(0, len(data), rows):
            index = np.arange(start, start + rows)
            batch = data.batch(np.minimum(index, len(data) - 1))
            batch["loss_mask"] = batch["loss_mask"] * (index < len(data))[:, None]
            s, n = jax.device_get(self._eval_fn(self.params, self.frozen, self._device_batch(batch)))
            total, count = total + float(s), count + float(n)
        loss = total / max(count, 1.0)
        return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 80.0))), "eval_tokens": int(count)}

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()

    @property
    def model(self) -> Step3ForCausalLM:
        """The trained model (for LoRA: adapters merged into the base weights; FP8 weights stay FP8)."""
        if self.lora is None:
            return nnx.merge(self.graphdef, self.params)
        return nnx.merge(self.graphdef, lora_lib.merge_params(self.frozen, self.params, self.lora))

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x activated non-embedding parameters + causal attention scores."""
        c = self.model_config
        counts = count_params(c)
        dense = counts["active"] - counts["embeddings"] + c.vocab_size * c.hidden_size  # lm_head is a matmul
        attn = 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * self.tc.seq_len  # 12 * L*H*K*T / 2
        return 6.0 * dense + attn


def run(trainer: Trainer, *, progress: bool = True, log_path: Path | None = None, on_metrics=None) -> list[dict]:
    """Train until ``trainer.tc.steps``; returns the per-step metrics (JSON-able)."""
    from tqdm import tqdm

    tc = trainer.tc
    history = []
    peak = PEAK_BF16_FLOPS.get(jax.devices()[0].device_kind)
    fpt = trainer.flops_per_token()
    n_dev = len(jax.devices()) if trainer.mesh is None else trainer.mesh.size
    if log_path is not None:
        _drop_records_after(log_path, trainer.step)
    log_file = log_path.open("a") if log_path else None
    bar = tqdm(total=tc.steps, initial=trainer.step, disable=not progress, desc="train", dynamic_ncols=True)
    last_eval = None
    try:
        while trainer.step < tc.steps:
            t0 = time.perf_counter()
            m = trainer.train_step(save=False)
            dt = time.perf_counter() - t0
            tokens = tc.batch_size * tc.seq_len
            record = {
                "step": trainer.step,
                "loss": float(m["loss"]),
                "aux_loss": float(m["aux_loss"]),
                "z_loss": float(m["z_loss"]),
                "grad_norm": float(m["grad_norm"]),
                "lr": m["lr"],
                "skipped": not bool(m["finite"]),
                "tokens_per_s": tokens / dt,
                "mfu": (fpt * tokens / dt / (peak * n_dev)) if peak else None,
                "expert_load": np.round(np.asarray(m["expert_load"]), 4).tolist(),
            }
            if trainer.eval_data is not None and (
                trainer.step == tc.steps or (tc.eval_every and trainer.step % tc.eval_every == 0)
            ):
                record.update(trainer.evaluate())
                if not progress:
                    log.info("step %d/%d: eval loss %.4f (perplexity %.4g)", trainer.step, tc.steps,
                             record["eval_loss"], record["eval_ppl"])  # fmt: skip
            history.append(record)
            if log_file:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            # the checkpoint of a step comes after its record (evaluation included): a run killed in between
            # resumes from the checkpoint before, and the log is cut back to it, so no step's record is lost
            trainer.save_if_due()
            if on_metrics:
                on_metrics(record)
            bar.update(1)
            if "eval_loss" in record:
                last_eval = record["eval_loss"]
            if trainer.step % tc.log_every == 0 or trainer.step == tc.steps:
                shown = {} if last_eval is None else {"eval": f"{last_eval:.3f}"}
                bar.set_postfix(loss=f"{record['loss']:.3f}", **shown, tok_s=f"{record['tokens_per_s']:.0f}")
                if not progress:
                    log.info(
                        "step %d/%d: loss %.4f, grad norm %.3g, lr %.3g, %.0f tokens/s", trainer.step, tc.steps,
                        record["loss"], record["grad_norm"], record["lr"], record["tokens_per_s"],
                    )  # fmt: skip
    finally:
        bar.close()
        if log_file:
            log_file.close()
    return history


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a run's ``metrics.jsonl`` (as :func:`run` writes them), in order; a line cut short by a
    crash is left out, and a missing file is an empty list."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if _record_step(line) is not None]


def checkpoint_fingerprint(folder: str | Path) -> str:
    """A fingerprint of a checkpoint folder's weights that stays the same when the folder moves: a SHA-256 over
    ``config.json``, and for each ``*.safetensors`` file its name, size, header (tensor names, dtypes, shapes,
    offsets) and three 4 KiB samples of every tensor (its start, middle and end), so tens of KiB per tensor are
    read, not the whole file. Two checkpoints with one tensor changed throughout (a finetune, a merged LoRA
    update) differ; one changed only between the samples would not."""
    import hashlib

    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    chunk = 1 << 12
    for path in sorted(folder.glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as fh:
            head = fh.read(8)
            header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = fh.read(min(header_len, max(0, size - 8)))
            h.update(head + header)
            try:
                entries = json.loads(header)
                spans = [tuple(e["data_offsets"]) for k, e in entries.items() if k != "__metadata__"]
            except (ValueError, TypeError, KeyError, AttributeError):  # (a damaged header: its bytes are hashed)
                spans = [(0, max(0, size - 8 - header_len))]
            for begin, end in sorted(spans):
                for at in sorted({begin, max(begin, (begin + end - chunk) // 2), max(begin, end - chunk)}):
                    fh.seek(8 + header_len + at)
                    h.update(fh.read(max(0, min(chunk, end - at))))
    return h.hexdigest()


def _saved_base(workdir: Path) -> str | None:
    """The checkpoint folder the run in ``workdir`` started from (its run.json), if any."""
    try:
        base = json.loads((workdir / "run.json").read_text()).get("base")
    except (OSError, ValueError):
        return None
    if base is not None and not Path(base).is_dir():
        raise ValueError(
            f"the run in {workdir} started from {base}, which is not a checkpoint folder now: pass --init-from with "
            f"that checkpoint where it is now (its weights are checked against the run's)"
        )
    if base is not None:
        print(f"resuming on the base the run started from: {base}")
    return base


def _drop_records_after(path: Path, step: int) -> None:
    """Cut a metrics log back to the records of steps <= ``step`` (a resumed run redoes the steps after its
    checkpoint; their old records would stand beside the new ones) and drop a line cut short by a crash. Replaced
    atomically; a missing file is fine."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (n := _record_step(line)) is not None and n <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def _record_step(line: str) -> int | None:
    """The step of one metrics line; None for a line cut short by a crash (or not a record)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record.get("step") if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def plot_loss(history: list[dict], path: Path | None = None):
    """The loss curve of ``history`` (the logged metrics) as a matplotlib ``Figure`` (made without pyplot, so it
    leaves a notebook's plotting backend alone), saved as PNG at ``path`` if given."""
    from matplotlib.figure import Figure

    steps = [h["step"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(steps, [h["loss"] for h in history], label="cross-entropy")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# Files of a checkpoint folder besides its weights and config.json that belong with a finetuned copy of it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """``python -m train.train``: train a Step-3-shaped model from scratch, or finetune a checkpoint (every weight,
    or LoRA adapters) and export it as a Hugging Face checkpoint."""
    ap = argparse.ArgumentParser(prog="python -m train.train", description="Train or finetune a Step-3-shaped model.")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model to train from scratch")
    ap.add_argument("--init-from", metavar="DIR",
                    help="finetune this Hugging Face checkpoint folder instead (its tokenizer.json too, if it has "
                    "one); with --lora-rank 0 its FP8 weights are dequantised")  # fmt: skip
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (0: every weight)")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA scale alpha (the update is alpha/rank A B)")
    ap.add_argument("--lora-experts", action="store_true", help="LoRA adapters on the routed experts too")
    ap.add_argument("--lora-shared-expert", action="store_true",
                    help="LoRA adapters on the shared expert and dense MLPs too")  # fmt: skip
    ap.add_argument("--export", metavar="DIR",
                    help="at the end, write the trained model (LoRA: merged into the base) to DIR as a Hugging Face "
                    "checkpoint, with --init-from's tokenizer files")  # fmt: skip
    ap.add_argument("--data", nargs="+", action="extend", default=None, metavar="FILE",
                    help='text or .jsonl files, one {"text": ...} or {"messages": [...]} (a conversation: only '
                    "its assistant turns are trained) per line (default: the embedded corpus)")  # fmt: skip
    ap.add_argument("--eval-data", nargs="+", action="extend", default=None, metavar="FILE",
                    help="held-out text / .jsonl files, scored every --eval-every steps "
                    "(0: after the last)")  # fmt: skip
    ap.add_argument("--eval-fraction", type=float, default=0.0,
                    help="hold out this fraction of the --data documents (chosen by --seed) for evaluation "
                    "instead")  # fmt: skip
    ap.add_argument("--chat-template", metavar="FILE",
                    help="render conversations with this Jinja chat template (default: the tokenizer's own); "
                    "--export writes it as chat_template.jinja")  # fmt: skip
    ap.add_argument("--workdir", default="runs/tiny", help="checkpoints, metrics.jsonl, loss.png")
    ap.add_argument("--mesh", default="", help="mesh axes, e.g. data=2,expert=4 (default: one device)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --workdir")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar: a log line every --log-every steps")
    for f in dataclasses.fields(TrainConfig):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                        help=f"{TRAIN_FLAG_HELP.get(f.name, '')} (default {f.default})".strip())  # fmt: skip
    args = ap.parse_args(argv)
    if args.lora_rank < 0:
        ap.error(f"--lora-rank must be >= 0 (0: train every weight), got {args.lora_rank}")
    if not args.lora_rank and (args.lora_experts or args.lora_shared_expert):
        ap.error("--lora-experts and --lora-shared-expert need --lora-rank")
    if not 0 <= args.eval_fraction < 1:
        ap.error(f"--eval-fraction must be in [0, 1), got {args.eval_fraction}")
    if args.eval_fraction and args.eval_data:
        ap.error("give --eval-data or --eval-fraction, not both")
    try:
        tc = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
        lora = None
        if args.lora_rank:
            lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, experts=args.lora_experts,
                              shared_expert=args.lora_shared_expert)  # fmt: skip
        workdir, export = Path(args.workdir), Path(args.export) if args.export else None
        if not args.resume and (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
            raise ValueError(f"{workdir} already has checkpoints: pass --resume to continue, or another --workdir")
        if export is not None and (export / "config.json").exists():
            raise ValueError(f"--export {export} already holds a checkpoint; choose another folder")
        if export is not None and export.exists() and not export.is_dir():
            raise ValueError(f"--export {export} is a file, not a folder")
        if args.resume and not args.init_from:  # (a run started from a checkpoint resumes on the same base)
            args.init_from = _saved_base(workdir)
        mesh = mesh_from_spec(args.mesh) if args.mesh else None
        docs = read_documents(args.data) if args.data else embedded_corpus()
        eval_docs = read_documents(args.eval_data) if args.eval_data else None
        if args.eval_fraction:
            docs, eval_docs = split_documents(docs, args.eval_fraction, seed=tc.seed)
        base, what = None, f"preset {args.preset!r}"
        if args.init_from:
            from step3_jax.checkpoint import load_pretrained
            from step3_jax.tokenizer import load_tokenizer

            # full finetuning needs float weights: an FP8 checkpoint is dequantised (LoRA keeps it FP8)
            quantization = {} if lora else {"quantization": None}
            base = load_pretrained(args.init_from, mesh=mesh, progress=not args.no_progress, **quantization)
            config, tokenizer, what = base.config, load_tokenizer(args.init_from), f"checkpoint {args.init_from}"
        else:
            from step3_jax.tokenizer import ByteTokenizer

            config, tokenizer = get_preset(args.preset), ByteTokenizer()
        if args.chat_template:
            tokenizer.chat_template = read_utf8(args.chat_template, "--chat-template")
        data = pack_documents(docs, tokenizer, tc.seq_len, seed=tc.seed, vocab_size=config.vocab_size)
        eval_data = None
        if eval_docs is not None:
            try:
                eval_data = pack_documents(eval_docs, tokenizer, tc.seq_len, seed=tc.seed, vocab_size=config.vocab_size)
            except ValueError as e:
                raise ValueError(f"evaluation data: {e}") from None
        trainer = Trainer(config, tc, data, mesh=mesh, workdir=workdir, base_model=base, lora=lora, eval_data=eval_data)
        if args.resume and not trainer.restore():
            print(f"no checkpoint in {workdir}; starting from the start", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    how = f"LoRA rank {lora.rank} adapters of" if lora else "every weight of"
    held_out = f", {len(eval_data)} held-out rows" if eval_data is not None else ""
    print(
        f"training {how} {what}: {count_params(config)['total'] / 1e6:.1f}M parameters, "
        f"{len(data)} rows of {tc.seq_len} tokens{held_out}, batch {tc.batch_size}, {tc.steps} steps"
    )
    if trainer.step >= tc.steps:
        print(f"the run in {workdir} is already at step {trainer.step} of {tc.steps}: nothing to train (more: --steps)")
    try:
        run(trainer, progress=not args.no_progress, log_path=workdir / "metrics.jsonl")
        trainer.save(wait=True)
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    history = read_metrics(workdir / "metrics.jsonl")  # (the whole run, the steps before a resume included)
    if history:
        plot_loss(history, workdir / "loss.png")
        last = history[-1]
        mean_tps = float(np.mean([h["tokens_per_s"] for h in history[len(history) // 2 :]]))
        evals = [h for h in history if "eval_loss" in h]
        if evals:
            print(f"eval loss {evals[-1]['eval_loss']:.3f} (perplexity {evals[-1]['eval_ppl']:.4g}) on "
                  f"{evals[-1]['eval_tokens']} held-out tokens")  # fmt: skip
        print(
            f"final loss {last['loss']:.3f} (first {history[0]['loss']:.3f}); {mean_tps:.0f} tokens/s; "
            f"{trainer.skipped} steps skipped; checkpoints in {workdir / 'checkpoints'}; curve {workdir / 'loss.png'}"
        )
    if export is not None:
        dtype = base.config.param_dtype if base is not None else None
        _export(trainer, export, args.init_from, dtype, tokenizer.chat_template if args.chat_template else None)
    return 0


def _export(
    trainer: Trainer, folder: Path, source: str | None, dtype: str | None, chat_template: str | None = None
) -> None:
    """The trained model as a Hugging Face checkpoint in ``folder`` (float weights in ``dtype``, default as
    trained), with the tokenizer files of ``source`` (the checkpoint it was finetuned from), if any, and
    ``chat_template`` (the one it was trained with) as chat_template.jinja."""
    import shutil

    from step3_jax.checkpoint import save_pretrained

    save_pretrained(trainer.model, folder, dtype=dtype)
    copied = []
    src = None if source is None else (Path(source) if Path(source).is_dir() else Path(source).parent)
    for name in TOKENIZER_FILES if src else ():
        if (src / name).is_file():
            shutil.copyfile(src / name, folder / name)
            copied.append(name)
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        copied = [n for n in copied if n != "chat_template.jinja"] + ["chat_template.jinja (--chat-template)"]
    also = f" (and {', '.join(copied)})" if copied else ""
    print(f"exported the trained model to {folder}{also}")


def log_to_stderr() -> None:
    """The command line's log lines on stderr: the project's at INFO and up (progress without a bar, "resumed from
    step N", evaluations), every other library's (orbax's checkpointing chatter through absl) at WARNING and up.
    ``force``: importing orbax has already given the root logger a handler, through absl."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    for name in ("__main__", "train", "step3_jax", "infer", "pallas_kernels"):
        logging.getLogger(name).setLevel(logging.INFO)


if __name__ == "__main__":
    log_to_stderr()
    sys.exit(main())
