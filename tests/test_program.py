"""One training program: what `run_training` compiles is what `aft-jax plan` measures, constraints included."""

from conftest import REPO
from train_helpers import write_arithmetic_groups

from aft_jax.build import with_built_tokenizer
from aft_jax.config.load import load_config
from aft_jax.stages.plan import planned_program
from aft_jax.stages.train import prepare_training, shard_batch


def test_training_compiles_the_planned_program(tmp_path):
    groups = tmp_path / "groups.jsonl"
    write_arithmetic_groups(groups)
    overrides = [f"run_dir={tmp_path}", "train.mesh=1,4,2", f"data.train_file={groups}", "train.max_steps=4"]
    config = with_built_tokenizer(load_config(REPO / "configs" / "tiny.py", overrides))
    run = prepare_training(config)
    batch = shard_batch(run.batcher.next_batch(), run.mesh, config.train.batch_size)
    trained = run.program.lower(run.state, batch).as_text()
    _, planned = planned_program(config, seq_len=batch["input_ids"].shape[-1])
    assert planned.as_text() == trained
    assert "sharding_constraint" in trained, "the model's activation constraints are part of the training step"
