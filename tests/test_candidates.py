"""Step 2: candidate groups are labelled and scored, and an interrupted run writes the same groups file."""

import json

import numpy as np
import pytest
from conftest import REPO

from aft_jax.build import Context, sampler_and_scorer
from aft_jax.config.load import load_config
from aft_jax.data.groups import read_groups
from aft_jax.data.tasks import get_task
from aft_jax.parallel import sharding
from aft_jax.stages.sample import label_group, sample_candidates


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    config = load_config(
        REPO / "configs" / "tiny.py",
        [
            f"run_dir={tmp_path_factory.mktemp('tiny')}",
            "task.name=synthetic",
            "task.limit=5",
            "task.template=plain",
            "sample.k=3",
            "sample.max_new_tokens=6",
            "sample.shard_size=2",
            "sample.batch_size=8",
            "data.max_length=96",
        ],
    )
    ctx = Context.of(config)
    return config, ctx.model(mesh=sharding.make_mesh("fsdp")), ctx.tokenizer


def sample(config, model, tokenizer, out_dir=None, **options):
    """`sample_candidates` as `aft-jax sample` calls it (`out_dir` by default `sample.out_dir`)."""
    ctx = Context.of(config)
    return sample_candidates(
        *sampler_and_scorer(model, tokenizer, config, config.sample.batch_size),
        ctx.task,
        ctx.examples(config.task.train_split),
        out_dir or config.sample.out_dir,
        settings=config.sample,
        template=config.task.template,
        seed=config.seed,
        **options,
    )


def _files(directory):
    return {p.name: p.read_text() for p in sorted(directory.glob("shard-*.jsonl"))}


def test_interrupted_sampling_gives_the_same_groups(tmp_path, tiny_setup):
    config, model, tokenizer = tiny_setup
    config = config.replace(sample={"out_dir": str(tmp_path / "straight")})
    straight = sample(config, model, tokenizer)
    config = config.replace(sample={"out_dir": str(tmp_path / "interrupted")})
    sample(config, model, tokenizer, stop_after_shards=1)
    assert len(_files(tmp_path / "interrupted")) == 1 and not (tmp_path / "interrupted" / "stats.json").exists()
    (tmp_path / "interrupted" / "shard-00001.jsonl.tmp").write_text("half a line")  # as a kill mid-write leaves
    resumed = sample(config, model, tokenizer)
    assert _files(resumed) == _files(straight) and len(_files(straight)) == 3

    groups = read_groups(straight)
    assert [g.id for g in groups] == [f"synthetic-train-{i}" for i in range(5)]
    for group in groups:
        reference = group.candidates[0]
        assert reference.reference and reference.correct
        assert 1 <= len(group.candidates) <= 4
        texts = [" ".join(c.text.split()) for c in group.candidates]
        assert len(set(texts)) == len(texts), "no duplicates within a group"
        for c in group.candidates:
            assert c.logp_sum <= 0 and c.logp_mean <= 0 and np.isfinite(c.logp_sum)
    stats = json.loads((straight / "stats.json").read_text())
    assert stats["groups"] == 5 and 0 <= stats["duplicate_rate"] <= 1 and stats["generated_tokens_per_s"] > 0


def test_scores_in_groups_match_sequence_scores(tmp_path, tiny_setup):
    import aft_jax

    config, model, tokenizer = tiny_setup
    config = config.replace(sample={"out_dir": str(tmp_path / "g")})
    group = read_groups(sample(config, model, tokenizer))[0]
    cand = group.candidates[0]
    prompt = tokenizer(group.prompt)["input_ids"]
    tokens = prompt + tokenizer(cand.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = np.array([tokens], np.int32)
    completion = np.zeros_like(ids)
    completion[0, len(prompt) :] = 1
    mean, total = aft_jax.sequence_scores(model, ids, np.ones_like(ids), completion)
    np.testing.assert_allclose([cand.logp_mean, cand.logp_sum], [float(mean[0]), float(total[0])], rtol=1e-4)


def test_packed_scores_of_groups_equal_padded(tmp_path, tiny_setup):
    """`score_groups` from packed rows (small enough that groups split and share rows) equals the padded
    sequences', for every candidate (what sampling stores and evaluation rescores)."""
    from aft_jax.stages.score import score_groups

    config, model, tokenizer = tiny_setup
    groups = read_groups(sample(config, model, tokenizer, out_dir=tmp_path / "g"))
    options = dict(max_length=config.data.max_length, batch_size=4)
    padded = score_groups(model, tokenizer, groups, layout="padded", **options)
    packed = score_groups(model, tokenizer, groups, layout="packed", tokens_per_row=config.data.max_length, **options)
    want = [(c.logp_sum, c.logp_mean) for g in padded for c in g.candidates]
    got = [(c.logp_sum, c.logp_mean) for g in packed for c in g.candidates]
    assert len(want) > len(groups) and all(total < 0 for total, _ in want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_labelling_dedupes_and_keeps_the_reference():
    task = get_task("synthetic")
    example = task.load("train", limit=1)[0]
    samples = [example.target, "1 + 1 = 2\n#### 2", " 1 +  1 = 2\n####   2", f"#### {example.answer}"]
    group, duplicates = label_group(task, example, "prompt", samples)
    assert duplicates == 2
    assert [c.reference for c in group.candidates] == [True, False, False]
    assert [c.correct for c in group.candidates] == [True, example.answer == "2", True]


def test_the_groups_file_does_not_depend_on_the_batch_size(tmp_path, tiny_setup):
    """Each (question, sample) draws with its own keys: the candidates are the same at three batch sizes
    and layouts of the rows (3 rows for one question's 3 samples; 8 rows of one per prompt; 16 rows of two
    per prompt); the scores, computed in batches of that size, agree."""
    config, model, tokenizer = tiny_setup
    runs = []
    for batch_size, rows_per_prompt in [(3, 0), (8, 1), (16, 2)]:
        out_dir = str(tmp_path / str(batch_size))
        run = config.replace(sample={"out_dir": out_dir, "batch_size": batch_size, "rows_per_prompt": rows_per_prompt})
        runs.append(read_groups(sample(run, model, tokenizer)))
    for groups in runs[1:]:
        for a, b in zip(runs[0], groups):
            assert [(c.text, c.correct, c.level) for c in b.candidates] == [
                (c.text, c.correct, c.level) for c in a.candidates
            ]
            np.testing.assert_allclose(
                [c.logp_sum for c in b.candidates], [c.logp_sum for c in a.candidates], rtol=1e-5
            )
    assert sum(len(g.candidates) for g in runs[0]) > 2 * len(runs[0]), "the samples differ from each other"
