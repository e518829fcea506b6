"""VFT and AFT training: the loop around the training program (`program.py`): batches, logging, checkpoints,
resumption and the export of the final model.

A run receives what it trains (the model and its tokenizer), what it trains on (a `GroupBatcher`, made by
`make_batcher` from candidate groups or, for VFT, `reference_groups`) and its `TrainSettings`; nothing here
reads the run config or loads a model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import TYPE_CHECKING, NamedTuple

import jax
import numpy as np
from tqdm import tqdm

from aft_jax.data.batches import GroupBatcher, GroupEncoder
from aft_jax.data.groups import Candidate, DataError, Group
from aft_jax.data.layout_cost import LayoutCost
from aft_jax.data.tasks import Example, Task
from aft_jax.io.paths import Path
from aft_jax.io.wandb_log import WandbSettings
from aft_jax.method.registry import get_method
from aft_jax.parallel import sharding
from aft_jax.stages.program import TrainProgram, TrainState, build_train_program, check_batch

if TYPE_CHECKING:
    from aft_jax.config.spec import CheckpointSection, DataSection, LossSection, OptimSection, TrainSection

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What one training run needs of the run config: the `loss`, `optim`, `train` and `checkpoint`
    sections, the seed of its state's random key, and where its metrics also go (W&B, `log.wandb`)."""

    loss: LossSection
    optim: OptimSection
    train: TrainSection
    checkpoint: CheckpointSection
    seed: int = 0
    wandb: WandbSettings | None = None

    @classmethod
    def of(cls, config) -> TrainSettings:
        """The settings of a run config (`aft_jax.config.spec.RunConfig`)."""
        return cls(config.loss, config.optim, config.train, config.checkpoint, config.seed, WandbSettings.of(config))

    def total_steps(self, batcher: GroupBatcher) -> int:
        """`train.max_steps` when positive, else `train.num_epochs` epochs of `batcher`."""
        t = self.train
        return t.max_steps if t.max_steps > 0 else t.num_epochs * batcher.steps_per_epoch


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
    program: TrainProgram
    state: TrainState  # step 0
    frozen: dict  # the weights the program does not train (the step's `frozen`)
    total_steps: int


def prepare_training(model, batcher: GroupBatcher, settings: TrainSettings, *, mesh) -> PreparedRun:
    """The training program for `model` on `mesh` and its state at step 0 (the model's weights placed in
    the program's shardings: the first step donates them, so `model` is not to be used afterwards) and
    the weights it does not train."""
    t = settings.train
    total_steps = settings.total_steps(batcher)
    program = build_train_program(
        model.config, mesh, settings.loss, settings.optim, total_steps=total_steps, grad_accum=t.grad_accum
    )
    return PreparedRun(program, program.init_state(model, settings.seed), program.frozen(model), total_steps)


def run_training(
    model, tokenizer, batcher: GroupBatcher, settings: TrainSettings, run_dir, *, mesh, base_name: str = ""
) -> Path:
    """Trains `model` (its trained weights are donated to the first step) on `batcher`'s batches as
    `settings` say, on `mesh`, in `run_dir` (checkpoints, metrics, `settings.json`); resumes from the run
    directory's latest checkpoint. Returns the folder of the exported final model (`export_final`;
    `base_name` names a LoRA model's base in its adapter config)."""
    from aft_jax.io.checkpoint import TrainCheckpointer
    from aft_jax.io.metrics import MetricsWriter

    run_dir = Path(run_dir)
    main = sharding.is_main_process()
    settings_dict = dataclasses.asdict(dataclasses.replace(settings, wandb=None))
    del settings_dict["wandb"]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.json").write_text(json.dumps(settings_dict, indent=2) + "\n")
    model_config = model.config
    program, state, frozen, total_steps = prepare_training(model, batcher, settings, mesh=mesh)
    del model
    c = settings.checkpoint
    checkpointer = TrainCheckpointer(
        run_dir / "checkpoints", save_every=c.save_every, keep=c.keep, async_save=c.async_save
    )
    start = checkpointer.latest_step() or 0
    if start:
        restored, data_state = checkpointer.restore(start, state)
        state = TrainState(*restored)
        batcher.restore(data_state)
        log.info("resumed from step %d", start)
    t = settings.train
    writer = MetricsWriter(
        run_dir, resume_step=start, tensorboard=t.tensorboard, enabled=main, wandb=settings.wandb,
        wandb_config=settings_dict,
    )  # fmt: skip
    devices = mesh.devices.size
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=f"{settings.loss.method} ({sharding.describe(mesh)})",
        unit="step",
        disable=not main,
    )
    try:
        for step in range(start + 1, total_steps + 1):
            batch = shard_batch(batcher.next_batch(), mesh, t.batch_size)
            began = time.perf_counter()
            state, metrics = program(state, batch, frozen)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            seconds = time.perf_counter() - began
            metrics |= {
                "tokens_per_s": batcher.global_tokens / seconds,
                "step_s": seconds,
                "tflops_per_device": train_flops(model_config, batch) / seconds / devices / 1e12,
                "epoch": batcher.epoch,
            }
            checkpointer.save(step, state, batcher.state(), force=step == total_steps)
            if step % t.log_every == 0 or step == total_steps:
                writer.write(step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
            bar.update(1)
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return export_final(program.model(state, frozen), tokenizer, run_dir, export_hf=c.export_hf, base_name=base_name)


def reference_groups(task: Task, examples: list[Example], template: str, tokenizer) -> list[Group]:
    """VFT's training data: each question of `task` with its reference chain of thought as its one
    candidate, the prompt in `template` (formatted with `tokenizer` where the template needs one)."""
    return [
        Group(
            e.id,
            task.prompt(e, template, tokenizer),
            e.answer,
            (Candidate(e.target, correct=True, level=1, reference=True),),
        )
        for e in examples
    ]


def make_batcher(
    groups: list[Group],
    tokenizer,
    mesh,
    *,
    data: DataSection,
    method: str,
    batch_size: int,
    grad_accum: int,
    seed: int,
    source: str = "the training groups",
    cost: LayoutCost | None = None,
) -> GroupBatcher:
    """The `GroupBatcher` of `groups` for `method` (`loss.method`) on `mesh`: tokenised with `tokenizer` as
    the `data` section says, `batch_size` groups per step in `grad_accum` micro-batches, shuffled with
    `seed`, packed rows planned by `cost` when `data.rows_by_cost` is set. `source` names the groups in
    errors (a file)."""
    check_batch(batch_size, grad_accum, mesh)
    m = get_method(method)
    if m.needs_reference_logps:
        missing = list(dict.fromkeys(g.id for g in groups for c in g.candidates if c.logp_sum is None))
        if missing:
            raise DataError(
                f"{source}: loss.method={m.name} needs each candidate's reference log-prob (logp_sum); "
                f"missing in groups {missing[:5]}"
            )
    only_reference = not m.needs_groups
    group_size = 1 if only_reference else data.group_size
    encoder = GroupEncoder(tokenizer, data.max_length, group_size, data.truncation, only_reference)
    batcher = GroupBatcher(
        groups,
        encoder,
        batch_size=batch_size,
        group_size=group_size,
        max_length=data.max_length,
        pad_id=tokenizer.pad_token_id or 0,
        seed=seed,
        pad_multiple=data.pad_multiple,
        shuffle=data.shuffle,
        rows=sharding.process_rows(mesh, batch_size),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        combine=sharding.sum_over_processes,
        layout=data.layout,
        tokens_per_row=data.tokens_per_row,
        shards=mesh.shape["data"] * mesh.shape["fsdp"],
        micro_batches=grad_accum,
        source=source,
        cost=cost if data.rows_by_cost else None,
    )
    counts = encoder.counts_array()
    counts = dict(zip(encoder.COUNTS, sharding.sum_over_processes(counts).tolist()))
    if data.layout == "packed":
        counts["groups_split_over_rows"] = batcher.split_groups
    log.info("data: %d of %d groups kept (%s layout); %s", len(batcher.usable), len(groups), data.layout, counts)
    return batcher


def export_final(model, tokenizer, run_dir: Path, *, export_hf: bool = False, base_name: str = "") -> Path:
    """The model for the next step: `run_dir/model`, an aft_jax model folder, or for a model with adapters
    a PEFT adapter folder (its base named `base_name`); with `export_hf` also the merged HF model in
    `run_dir/model_hf`."""
    from aft_jax.io.checkpoint import save_model_folder
    from aft_jax.io.hf import save_pretrained
    from aft_jax.io.peft import WEIGHTS_FILE, save_adapter

    out = run_dir / "model"
    sharding.sync("export")  # every process decides alike whether the export is still to do
    if model.config.lora is not None:
        if not (out / WEIGHTS_FILE).exists():  # every process: the adapters are gathered, then written by one
            save_adapter(model, out, base_name=base_name, tokenizer=tokenizer)
    elif not (out / "params").exists():
        save_model_folder(model, tokenizer, out)
    if export_hf and sharding.is_main_process():
        save_pretrained(model, tokenizer, run_dir / "model_hf")
    return out
