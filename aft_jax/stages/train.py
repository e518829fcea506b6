"""VFT and AFT training: one pure `train_step(state, batch) -> (state, metrics)` under one `jax.jit`
with explicit shardings and a donated state, and the loop around it (data, logging, checkpoints)."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from aft_jax.parallel import sharding
from aft_jax.data.batches import GroupBatcher, GroupEncoder
from aft_jax.data.groups import Candidate, DataError, Group, read_training_file
from aft_jax.method.objective import finalize_metrics, normalisers, objective
from aft_jax.io.paths import Path
from aft_jax.build import mesh_from_config, model_from_config

log = logging.getLogger(__name__)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict  # nnx.to_pure_dict of the model's parameters
    opt_state: Any
    rng: jax.Array  # uint32 [2], raw key data


def build_optimizer(optim_cfg, total_steps: int):
    """AdamW with linear warmup and cosine decay, after global-norm gradient clipping; no decay on norms."""
    warmup = max(1, int(round(optim_cfg.warmup_ratio * total_steps))) if optim_cfg.warmup_ratio > 0 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree.map_with_path(lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)

    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    return tx, schedule


def make_train_step(graphdef, loss_cfg, tx, schedule, grad_accum: int):
    """The pure step: gradients summed over `grad_accum` micro-batches (each normalised by the global
    batch's totals, so the sum is the full-batch gradient), then one optimizer update."""

    def loss_fn(params, micro, norm):
        return objective(nnx.merge(graphdef, params), micro, norm, loss_cfg)

    def gradients(params, batch, norm):
        """Summed statistics and gradients, accumulated over micro-batches when grad_accum > 1."""
        if grad_accum == 1:
            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, norm)
            return grads, sums
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def accumulate(carry, micro_batch):
            (_, micro_sums), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch, norm)
            return jax.tree.map(jnp.add, carry, (micro_grads, micro_sums)), None

        zero_sums = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), norm)[1])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, zero_sums))
        return jax.lax.scan(accumulate, zeros, micro)[0]

    def train_step(state: TrainState, batch: dict):
        grads, sums = gradients(state.params, batch, normalisers(batch, loss_cfg))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = finalize_metrics(sums) | {"grad_norm": global_norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def init_state(model, tx, seed: int, mesh) -> TrainState:
    """Step 0: the model's parameters, optimizer state sharded like them, step and RNG replicated."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_shardings = sharding.shardings_like_params(jax.eval_shape(tx.init, params), params, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step, rng = jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed))
    step, rng = (sharding.put_global(x, sharding.replicated(mesh)) for x in (step, rng))
    return TrainState(step, params, opt_state, rng)


def compile_step(train_step, state: TrainState, mesh):
    """`jax.jit` with the state's own shardings in and out, the batch over (data, fsdp), state donated."""
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = sharding.batch_sharding(mesh, 1)  # prefix: leading axis of every batch array
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def matmul_params(c) -> int:
    """N: the weights of the matrix products (the output projection once, norms left out)."""
    per_layer = (
        c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads) + 3 * c.hidden_size * c.intermediate_size
    )
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size


def train_flops(model_config, batch: dict) -> float:
    """Approximate FLOPs of one step on the padded batch: 6 N per token plus attention scores."""
    n_seq, length = int(np.prod(batch["input_ids"].shape[:-1])), batch["input_ids"].shape[-1]
    c = model_config
    attention = 12 * c.num_layers * c.num_heads * c.head_dim * length  # per token, forward + backward
    return float(n_seq * length * (6 * matmul_params(c) + attention))


def shard_batch(batch: dict, mesh, global_rows: int | None = None) -> dict:
    """Global arrays split over (data, fsdp) from this process's rows of the batch (`process_rows`); with
    `global_rows=None`, `batch` is the whole batch (one process)."""
    rows = global_rows or len(batch["input_ids"])
    return {k: sharding.put_process_local(v, sharding.batch_sharding(mesh, v.ndim), rows) for k, v in batch.items()}


def run_training(config) -> Path:
    """Trains as `config` says; resumes from the run directory's latest checkpoint. Returns the folder
    of the exported final model (config.json, tokenizer, Orbax params)."""
    from aft_jax.io.checkpoint import TrainCheckpointer
    from aft_jax.io.metrics import MetricsWriter

    run_dir = Path(config.run_dir)
    main = sharding.is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    mesh = mesh_from_config(config.train.mesh)
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.train.batch_size % (config.train.grad_accum * data_ways):
        raise ValueError(
            f"train.batch_size={config.train.batch_size} must be a multiple of grad_accum x data x fsdp "
            f"= {config.train.grad_accum} x {data_ways}"
        )
    model, tokenizer = model_from_config(config.model, mesh, seed=config.seed)
    graphdef, model_config = nnx.graphdef(model), model.config
    batcher = make_batcher(config, tokenizer, mesh)
    total_steps = (
        config.train.max_steps if config.train.max_steps > 0 else config.train.num_epochs * batcher.steps_per_epoch
    )
    tx, schedule = build_optimizer(config.optim, total_steps)
    state = init_state(model, tx, config.seed, mesh)
    del model
    checkpointer = TrainCheckpointer(
        run_dir / "checkpoints",
        save_every=config.checkpoint.save_every,
        keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
    )
    start = checkpointer.latest_step() or 0
    if start:
        restored, data_state = checkpointer.restore(start, state)
        state = TrainState(*restored)
        batcher.restore(data_state)
        log.info("resumed from step %d", start)
    step_fn = compile_step(make_train_step(graphdef, config.loss, tx, schedule, config.train.grad_accum), state, mesh)
    writer = MetricsWriter(run_dir, resume_step=start, tensorboard=config.train.tensorboard, enabled=main)
    devices = mesh.devices.size
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=f"{config.loss.method} ({sharding.describe(mesh)})",
        unit="step",
        disable=not main,
    )
    try:
        for step in range(start + 1, total_steps + 1):
            batch = shard_batch(batcher.next_batch(), mesh, config.train.batch_size)
            began = time.perf_counter()
            state, metrics = step_fn(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - began
            metrics |= {
                "tokens_per_s": batcher.global_tokens / seconds,
                "step_s": seconds,
                "tflops_per_device": train_flops(model_config, batch) / seconds / devices / 1e12,
                "epoch": batcher.epoch,
            }
            checkpointer.save(step, state, batcher.state(), force=step == total_steps)
            if step % config.train.log_every == 0 or step == total_steps:
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return export_final(state, graphdef, tokenizer, run_dir, config)


def training_groups(config, tokenizer) -> list[Group]:
    """`data.train_file` if set; for VFT without one, the task's training split as (prompt, reference)."""
    if config.data.train_file:
        return read_training_file(config.data.train_file)
    if config.loss.method != "vft":
        raise ValueError(
            f"loss.method={config.loss.method!r} trains on candidate groups: set data.train_file to the "
            "output of `aft-jax sample`"
        )
    from aft_jax.stages.sample import load_examples, task_from_config

    task = task_from_config(config)
    return [
        Group(
            e.id,
            task.prompt(e, config.task.template, tokenizer),
            e.answer,
            (Candidate(e.target, correct=True, level=1, reference=True),),
        )
        for e in load_examples(config, config.task.train_split)
    ]


def make_batcher(config, tokenizer, mesh) -> GroupBatcher:
    groups = training_groups(config, tokenizer)
    if config.loss.method == "dpo":
        missing = [g.id for g in groups for c in g.candidates if c.logp_sum is None]
        if missing:
            raise DataError(
                f"{config.data.train_file}: DPO needs each candidate's reference log-prob (logp_sum); "
                f"missing in groups {missing[:5]}"
            )
    only_reference = config.loss.method == "vft"
    group_size = 1 if only_reference else config.data.group_size
    encoder = GroupEncoder(tokenizer, config.data.max_length, group_size, config.data.truncation, only_reference)
    batcher = GroupBatcher(
        groups,
        encoder,
        batch_size=config.train.batch_size,
        group_size=group_size,
        max_length=config.data.max_length,
        pad_id=tokenizer.pad_token_id or 0,
        seed=config.seed,
        pad_multiple=config.data.pad_multiple,
        shuffle=config.data.shuffle,
        rows=sharding.process_rows(mesh, config.train.batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        combine=sharding.sum_over_processes,
    )
    counts = encoder.counts_array()
    counts = dict(zip(encoder.COUNTS, sharding.sum_over_processes(counts).tolist()))
    log.info("data: %d of %d groups kept; %s", len(batcher.usable), len(groups), counts)
    return batcher


def export_final(state: TrainState, graphdef, tokenizer, run_dir: Path, config) -> Path:
    """The params-only model for the next step: `run_dir/model` (and `run_dir/model_hf` if asked)."""
    from aft_jax.io.checkpoint import save_model_folder
    from aft_jax.io.hf import save_pretrained

    model = nnx.merge(graphdef, state.params)
    out = run_dir / "model"
    sharding.sync("export")  # every process decides alike whether the export is still to do
    if not (out / "params").exists():
        save_model_folder(model, tokenizer, out)
    if config.checkpoint.export_hf and sharding.is_main_process():
        save_pretrained(model, tokenizer, run_dir / "model_hf")
    return out
