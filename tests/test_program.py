"""One training program: what `run_training` compiles is what `aft-jax plan` measures, constraints included."""

import numpy as np
import pytest
from conftest import REPO
from train_helpers import write_arithmetic_groups

from aft_jax.build import Context
from aft_jax.config.load import load_config
from aft_jax.stages.plan import planned_program
from aft_jax.stages.program import batch_spec
from aft_jax.stages.train import TrainSettings, prepare_training, shard_batch


def _prepared(config):
    """The batches and the prepared run of `aft-jax aft` with `config` (its starting model, its groups)."""
    ctx = Context.of(config)
    model = ctx.model()
    batcher = ctx.batcher(config.data.train_file, config.loss.method, model.config)
    return batcher, prepare_training(model, batcher, TrainSettings.of(config), mesh=ctx.mesh)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_training_compiles_the_planned_program(tmp_path, layout):
    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    overrides = [
        f"run_dir={tmp_path}",
        "train.mesh=1,4,2",
        f"data.train_file={groups}",
        "train.max_steps=4",
        f"data.layout={layout}",
        "data.rows_by_cost=false",  # the packed batch's rows, as the plan has them
    ]
    config = load_config(REPO / "configs" / "tiny.py", overrides)
    batcher, run = _prepared(config)
    batch = shard_batch(batcher.next_batch(), run.program.mesh, config.train.batch_size)
    trained = run.program.lower(run.state, batch).as_text()
    if layout == "padded":
        _, planned = planned_program(config, seq_len=batch["input_ids"].shape[-1])
    else:  # packed rows depend on the data: the plan's batch spec of the real batch's rows
        rows, length = batch["input_ids"].shape
        spec = batch_spec(run.program.mesh, config.train.batch_size, config.data.group_size, length, rows=rows)
        _, planned = planned_program(config, batch=spec)
    assert planned.as_text() == trained
    assert "sharding_constraint" in trained, "the model's activation constraints are part of the training step"


def test_packed_and_padded_training_give_the_same_loss_curve(tmp_path):
    """The tiny preset for 3 steps on a 4 x 2 mesh with 2 micro-batches: the same losses from either layout."""
    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    curves = {}
    for layout in ("packed", "padded"):
        overrides = [f"run_dir={tmp_path}", "train.mesh=1,4,2", f"data.train_file={groups}", "train.max_steps=3"]
        overrides += [f"data.layout={layout}", "train.grad_accum=2", "data.tokens_per_row=160", "data.rows_by_cost=false"]
        config = load_config(REPO / "configs" / "tiny.py", overrides)
        batcher, run = _prepared(config)
        state, curves[layout] = run.state, []
        for _ in range(3):
            batch = shard_batch(batcher.next_batch(), run.program.mesh, config.train.batch_size)
            state, metrics = run.program(state, batch)
            curves[layout].append([float(metrics[k]) for k in ("loss", "vft_loss", "align_loss", "grad_norm")])
        if layout == "packed":
            assert batch["input_ids"].ndim == 2 and batch["input_ids"].shape[1] <= 160
    np.testing.assert_allclose(curves["packed"], curves["padded"], rtol=1e-5, atol=1e-6)
