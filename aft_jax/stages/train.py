"""VFT and AFT training: the loop around the training program (`program.py`): data, logging, checkpoints,
resumption and the export of the final model."""

from __future__ import annotations

import logging
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from aft_jax.build import load_examples, model_from_config
from aft_jax.config.spec import check_command
from aft_jax.data.batches import GroupBatcher, GroupEncoder
from aft_jax.data.groups import Candidate, DataError, Group, read_training_file
from aft_jax.data.tasks import Task
from aft_jax.io.paths import Path
from aft_jax.method.registry import get_method
from aft_jax.parallel import sharding
from aft_jax.stages.program import TrainProgram, TrainState, build_train_program, check_batch

log = logging.getLogger(__name__)


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


def shard_batch(batch: dict, mesh, global_groups: int | None = None) -> dict:
    """Global arrays split over (data, fsdp) from this process's share of each array of the batch (its
    `process_rows` of the `global_groups` groups, and as large a share of packed rows); with
    `global_groups=None`, `batch` is the whole batch (one process)."""
    share = (global_groups or len(batch["valid"])) // len(batch["valid"])
    return {
        k: sharding.put_process_local(v, sharding.batch_sharding(mesh, v.ndim), share * len(v))
        for k, v in batch.items()
    }


class PreparedRun(NamedTuple):
    mesh: Any
    model_config: Any
    tokenizer: Any
    batcher: GroupBatcher
    total_steps: int
    program: TrainProgram
    state: TrainState  # step 0


def prepare_training(config, *, mesh, task: Task | None = None) -> PreparedRun:
    """The starting model, the batches and the training program of `config` on `mesh` (the caller's, of
    `train.mesh`), before any step. `task` is needed only by VFT without `data.train_file`."""
    check_batch(config.train.batch_size, config.train.grad_accum, mesh)
    model, tokenizer = model_from_config(config.model, mesh, seed=config.seed)
    batcher = make_batcher(config, tokenizer, mesh, task)
    total_steps = (
        config.train.max_steps if config.train.max_steps > 0 else config.train.num_epochs * batcher.steps_per_epoch
    )
    program = build_train_program(
        model.config, mesh, config.loss, config.optim, total_steps=total_steps, grad_accum=config.train.grad_accum
    )
    return PreparedRun(
        mesh, model.config, tokenizer, batcher, total_steps, program, program.init_state(model, config.seed)
    )


def run_training(config, *, mesh, task: Task | None = None) -> Path:
    """Trains as `config` (this run's own config, written to `<run_dir>/config.json`) says, on `mesh`;
    resumes from the run directory's latest checkpoint. `task` is needed only by VFT without
    `data.train_file` (it trains on the task's training split). Returns the folder of the exported final
    model (config.json, tokenizer, Orbax params)."""
    from aft_jax.io.checkpoint import TrainCheckpointer
    from aft_jax.io.metrics import MetricsWriter

    run_dir = Path(config.run_dir)
    main = sharding.is_main_process()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json(indent=2) + "\n")
    run = prepare_training(config, mesh=mesh, task=task)
    program, state, batcher, total_steps = run.program, run.state, run.batcher, run.total_steps
    model_config = run.model_config
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
            state, metrics = program(state, batch)
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
    return export_final(state, program.graphdef, run.tokenizer, run_dir, config)


def training_groups(config, task: Task | None, tokenizer) -> list[Group]:
    """`data.train_file` if set; for VFT without one, `task`'s training split as (prompt, reference)."""
    if config.data.train_file:
        return read_training_file(config.data.train_file)
    check_command(config, "aft")  # only VFT trains without a groups file
    if task is None:
        raise ValueError(
            f"loss.method={config.loss.method!r} without data.train_file trains on the task's training split: "
            "pass the task"
        )
    return [
        Group(
            e.id,
            task.prompt(e, config.task.template, tokenizer),
            e.answer,
            (Candidate(e.target, correct=True, level=1, reference=True),),
        )
        for e in load_examples(task, config.task, config.task.train_split)
    ]


def make_batcher(config, tokenizer, mesh, task: Task | None = None) -> GroupBatcher:
    groups = training_groups(config, task, tokenizer)
    method = get_method(config.loss.method)
    if method.needs_reference_logps:
        missing = [g.id for g in groups for c in g.candidates if c.logp_sum is None]
        if missing:
            raise DataError(
                f"{config.data.train_file}: loss.method={method.name} needs each candidate's reference log-prob "
                "(logp_sum); "
                f"missing in groups {missing[:5]}"
            )
    only_reference = not method.needs_groups
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
        layout=config.data.layout,
        tokens_per_row=config.data.tokens_per_row,
        shards=mesh.shape["data"] * mesh.shape["fsdp"],
        micro_batches=config.train.grad_accum,
    )
    counts = encoder.counts_array()
    counts = dict(zip(encoder.COUNTS, sharding.sum_over_processes(counts).tolist()))
    if config.data.layout == "packed":
        counts["groups_split_over_rows"] = batcher.split_groups
    log.info("data: %d of %d groups kept (%s layout); %s", len(batcher.usable), len(groups), config.data.layout, counts)
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
