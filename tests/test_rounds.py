"""`pipeline.rounds`: which model each round starts from, which groups it trains on, where its groups come
from, and the seeds it samples with. The end-to-end run of two rounds (and a kill in the second) is in
test_study.py; these check the plan of every round in-process, without a model."""

import json

import pytest
from conftest import REPO

from aft_jax.config.load import load_config
from aft_jax.data.groups import Candidate, Group
from aft_jax.method.registry import alignment_run
from aft_jax.pipeline import PipelineContext, alignment_inputs, pipeline_models, round_name, round_seed

TINY = REPO / "configs" / "tiny.py"


def _ctx(tmp_path, *overrides):
    return PipelineContext.of(load_config(TINY, [f"run_dir={tmp_path}", "pipeline.rounds=3", *overrides]))


def test_models_are_listed_round_by_round():
    runs = [alignment_run("aft_bc"), alignment_run("rft")]
    assert pipeline_models(runs, 1) == ["vft", "aft_bc", "rft"]
    assert pipeline_models(runs, 3) == ["vft", "aft_bc", "rft", "aft_bc-r2", "rft-r2", "aft_bc-r3", "rft-r3"]
    assert round_name("aft_bc-beta0.3", 2) == "aft_bc-beta0.3-r2"


@pytest.mark.parametrize("init_from", ["base", "vft"])
def test_previous_continues_the_last_round_on_its_own_groups(tmp_path, init_from):
    ctx = _ctx(tmp_path, f"pipeline.init_from={init_from}")
    run = alignment_run("aft_bc")
    start_1 = "" if init_from == "base" else str(tmp_path / "vft" / "model")
    assert alignment_inputs(ctx, run, 1) == (start_1, (str(tmp_path / "groups" / "train"),))
    assert alignment_inputs(ctx, run, 2) == (
        str(tmp_path / "aft_bc" / "model"),
        (str(tmp_path / "groups" / "aft_bc-r2"),),
    )
    assert alignment_inputs(ctx, run, 3) == (
        str(tmp_path / "aft_bc-r2" / "model"),
        (str(tmp_path / "groups" / "aft_bc-r3"),),
    )


def test_start_restarts_from_round_one_start_on_every_round_groups(tmp_path):
    ctx = _ctx(tmp_path, "pipeline.round_init=start", "pipeline.init_from=vft")
    start, groups = alignment_inputs(ctx, alignment_run("rft"), 3)
    assert start == str(tmp_path / "vft" / "model")
    assert groups == tuple(str(tmp_path / "groups" / g) for g in ("train", "rft-r2", "rft-r3"))


def test_start_trains_on_the_groups_of_every_round_one_after_the_other(tmp_path):
    """`Context.training_groups` of several folders: every group of each, in order (a question of two rounds
    is trained on twice per epoch, once with each round's candidates)."""
    ctx = _ctx(tmp_path)
    folders = []
    for r in (1, 2):
        candidates = (Candidate("ref", True, 1, reference=True), Candidate(f"round {r}", False, 0))
        path = tmp_path / f"round-{r}.jsonl"
        path.write_text("".join(Group(f"q{i}", "prompt", "1", candidates).to_json() + "\n" for i in range(3)))
        folders.append(str(path))
    read = ctx.training_groups(tuple(folders), "aft")
    assert [(g.id, g.candidates[1].text) for g in read] == [(f"q{i}", f"round {r}") for r in (1, 2) for i in range(3)]


def test_every_round_samples_with_its_own_seed():
    """Round 1 keeps the run's seed (a run with one round samples as before); later rounds never reuse the
    draws of another round, nor of another seed of a study."""
    assert round_seed(7, 1) == 7
    seeds = {round_seed(s, r) for s in range(100) for r in range(1, 6)}
    assert len(seeds) == 500


def test_a_two_round_manifest_names_what_each_round_read(tmp_path):
    """The stages of round 2 record the model that sampled their groups and the start and groups of the
    alignment run, so a reader of manifest.json can trace every model back to its data."""
    from aft_jax.pipeline import Manifest, Stage

    ctx = _ctx(tmp_path)
    run = alignment_run("aft_bc")
    start, groups = alignment_inputs(ctx, run, 2)
    manifest = Manifest(tmp_path, ctx.config)
    manifest.run(Stage("aft_bc-r2", lambda: True, lambda: None, {"start": start, "groups": list(groups)}))
    entry = json.loads((tmp_path / "manifest.json").read_text())["stages"]["aft_bc-r2"]
    assert entry == {
        "start": str(tmp_path / "aft_bc" / "model"),
        "groups": [str(tmp_path / "groups" / "aft_bc-r2")],
        "status": "done",
    }
