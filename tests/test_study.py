"""`aft-jax study` on the tiny preset (2 seeds, VFT and AFT-BC over two rounds): each seed's pipeline runs
every stage and reports, round 2 on groups sampled from round 1's model; study.json holds the statistics
of the per-seed results; study.md the claims table; the plots are PNG files; a study killed in its second
seed's second round (its first seed finished) resumes to the same study.json. The beta sweep, the verdicts
and method names are checked in-process on hand-made results."""

import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import DEVICES_FLAG, REPO, tiny_cli

from aft_jax.config.load import load_config
from aft_jax.method.registry import AlignmentRun, alignment_run
from aft_jax.study.report import claims_table, study_markdown
from aft_jax.study.runner import aggregate, study_plan
from aft_jax.study.stats import paired_t, t_interval

OVERRIDES = ("study.seeds=0,1", "pipeline.methods=aft_bc", "pipeline.rounds=2", "eval.validation_limit=8")
PNG = b"\x89PNG\r\n\x1a\n"


def _env():
    """The pipeline's own process on the plain CPU device: sharding is tested elsewhere, speed matters here.
    XLA optimises these programs: the second seed and the resumed study load them from the session's cache,
    so they compile once and run several times."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICES_FLAG))
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
    return env


def _study(run_dir):
    return tiny_cli("study", run_dir, *OVERRIDES)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("study") / "straight"
    subprocess.run(_study(run_dir), check=True, capture_output=True, env=_env())
    return run_dir


def test_each_seed_runs_every_stage_and_reports(straight_run):
    models = ["vft", "aft_bc", "aft_bc-r2"]
    for seed in (0, 1):
        run_dir = straight_run / f"seed-{seed}"
        manifest = json.loads((run_dir / "manifest.json").read_text())
        stages = ["tokenizer", "vft", "sample_train", "sample_eval", "aft_bc", "sample_aft_bc-r2", "aft_bc-r2", "eval"]
        assert list(manifest["stages"]) == stages and all(manifest["stages"][s]["status"] == "done" for s in stages)
        assert manifest["config"]["seed"] == seed
        vocab = json.loads((run_dir / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
        assert len(vocab) == 320, "model.build_vocab_size: each seed's tokenizer, so each seed's model, the same size"
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert list(metrics) == models
        report = (run_dir / "report.md").read_text()
        for name, row in metrics.items():
            assert f"| {name} | {100 * row['accuracy']:.1f} | {100 * row['self_consistency']:.1f} |" in report
            assert 0 <= row["accuracy"] <= 1 and row["ppl_pos"] > 1 and row["validation_questions"] == 8
            per_question = json.loads((run_dir / "eval" / f"{name}.json").read_text())["per_question"]
            assert len(per_question["ids"]) == len(per_question["correct"]) == row["questions"] == 16
            assert sum(per_question["correct"]) / 16 == row["accuracy"]
            assert sum(per_question["self_consistent"]) / 16 == row["self_consistency"]
        for plot in ("scores.png", "training.png"):
            data = (run_dir / "plots" / plot).read_bytes()
            assert data[:8] == PNG and len(data) > 5000


def test_round_two_samples_from_round_one_model_and_aligns_it_again(straight_run):
    """The manifest names round 2's inputs; its groups are new draws on the same questions; and they were
    scored, so sampled, by round 1's AFT-BC model: rescoring them here with that model gives the stored
    log-probs, which the VFT model (round 1's sampler) does not."""
    import dataclasses

    from aft_jax.build import sampler_and_scorer
    from aft_jax.config.spec import parse_config
    from aft_jax.data.groups import read_groups
    from aft_jax.io.hf import from_pretrained

    run_dir = straight_run / "seed-0"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["sample_aft_bc-r2"]["sampled_from"] == str(run_dir / "aft_bc" / "model")
    assert manifest["stages"]["aft_bc-r2"]["start"] == str(run_dir / "aft_bc" / "model")
    assert manifest["stages"]["aft_bc-r2"]["groups"] == [str(run_dir / "groups" / "aft_bc-r2")]
    first, second = (read_groups(run_dir / "groups" / g) for g in ("train", "aft_bc-r2"))
    assert [g.id for g in first] == [g.id for g in second]
    sampled = [[[c.text for c in g.candidates if not c.reference] for g in groups] for groups in (first, second)]
    assert sum(a != b for a, b in zip(*sampled)) > len(first) // 2, "round 2 drew new candidates"
    assert "| 2 | aft_bc |" in (run_dir / "report.md").read_text(), "report.md tables round 2's groups"

    config = parse_config(manifest["config"])
    unscored = [
        dataclasses.replace(
            g, candidates=tuple(dataclasses.replace(c, logp_sum=None, logp_mean=None) for c in g.candidates)
        )
        for g in second[:4]
    ]
    stored = [c.logp_sum for g in second[:4] for c in g.candidates]
    for name, same in (("aft_bc", True), ("vft", False)):
        model, tokenizer = from_pretrained(run_dir / name / "model")
        rescored = sampler_and_scorer(model, tokenizer, config, 8)[1].score(unscored)
        logps = [c.logp_sum for g in rescored for c in g.candidates]
        assert (logps == pytest.approx(stored, rel=1e-4, abs=1e-3)) == same, name


def test_study_json_holds_the_statistics_of_the_seeds(straight_run):
    study = json.loads((straight_run / "study.json").read_text())
    evals = {
        s: {m: json.loads((straight_run / f"seed-{s}" / "eval" / f"{m}.json").read_text()) for m in study["models"]}
        for s in (0, 1)
    }
    assert study["seeds"] == [0, 1] and study["models"] == ["vft", "aft_bc", "aft_bc-r2"]
    for model in study["models"]:
        for metric in ("accuracy", "assess_micro", "ppl_neg", "validation_accuracy"):
            values = [evals[s][model][metric] for s in (0, 1)]
            row, expected = study["summary"][model][metric], t_interval(values)
            assert row["values"] == values and row["mean"] == pytest.approx(expected.mean)
            assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))
    d = study["paired"]["vft"]["aft_bc"]["accuracy"]
    expected = paired_t(*([evals[s][m]["accuracy"] for s in (0, 1)] for m in ("aft_bc", "vft")))
    assert d["seeds"]["mean"] == pytest.approx(expected.mean) and d["seeds"]["p_value"] == pytest.approx(
        expected.p_value
    )
    both = [np.array([evals[s][m]["per_question"]["correct"] for s in (0, 1)], float) for m in ("aft_bc", "vft")]
    assert d["questions"]["mean"] == pytest.approx((both[0] - both[1]).mean()) and d["questions"]["n"] == 32
    claims = {(c["claim"], c["method"], c["baseline"], c["metric"]) for c in study["claims"]}
    assert {(2, "aft_bc", "vft", "accuracy"), (2, "aft_bc", "vft", "assess_micro")} <= claims
    assert 1 in {c[0] for c in claims} and 3 not in {c[0] for c in claims}, "claims of models the study ran"
    for c in study["claims"]:
        assert c["verdict"] in ("reproduced", "contradicted", "inconclusive")
        assert c["test"] == ("one-sample t over seeds" if c["claim"] == 1 else "t over seeds")
        assert c["p_value"] is not None and c["p_holm"] >= c["p_value"]
        if c["baseline"] in study["paired"]:
            assert c["difference"] == pytest.approx(
                study["paired"][c["baseline"]][c["method"]][c["metric"]]["seeds"]["mean"]
            )
    markdown = (straight_run / "study.md").read_text()
    assert "## The paper's claims" in markdown and "| 2. AFT beats VFT in accuracy" in markdown
    assert study["holm_family"] == len(study["claims"])
    assert f"Holm's correction over the study's {len(study['claims'])} claims" in markdown
    assert claims_table(study) in markdown and len(claims_table(study).splitlines()) == 2 + len(study["claims"])
    rounds = study["rounds"]
    assert rounds["models"] == {"aft_bc": ["aft_bc", "aft_bc-r2"]} and rounds["vs_rft"] == {}
    assert {(8, "aft_bc-r2", "vft", "accuracy"), (8, "aft_bc-r2", "vft", "assess_micro")} <= claims
    assert (10, "aft_bc-r2", "aft_bc", "accuracy") in claims and 9 not in {c[0] for c in claims}
    expected = paired_t(*([evals[s][m]["accuracy"] for s in (0, 1)] for m in ("aft_bc-r2", "aft_bc")))
    assert rounds["vs_round_1"]["aft_bc-r2"]["accuracy"]["seeds"]["mean"] == pytest.approx(expected.mean)
    for model, folder in (("aft_bc", "train"), ("aft_bc-r2", "aft_bc-r2")):
        stats = [
            json.loads((straight_run / f"seed-{s}" / "groups" / folder / "stats.json").read_text()) for s in (0, 1)
        ]
        for key in ("sample_accuracy", "groups_without_signal", "positives_per_group"):
            assert rounds["groups"][model][key]["mean"] == pytest.approx(np.mean([x[key] for x in stats]))
    assert "## Rounds" in markdown and "| aft_bc-r2 | 2 |" in markdown
    for plot in ("metrics.png", "accuracy_vs_aacc.png", "scores.png", "rounds.png"):
        data = (straight_run / "plots" / plot).read_bytes()
        assert data[:8] == PNG and len(data) > 5000


def test_killed_study_resumes_to_the_same_study_json(straight_run, tmp_path):
    run_dir = tmp_path / "killed"
    shutil.copytree(straight_run / "seed-0", run_dir / "seed-0")  # as the study would have left it: deterministic
    proc = subprocess.Popen(_study(run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    round_2 = run_dir / "seed-1" / "groups" / "aft_bc-r2"
    deadline = time.time() + 300
    while time.time() < deadline and not list(round_2.glob("shard-00000.jsonl")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # in the middle of the second seed's second round of sampling
    proc.wait()
    manifest = json.loads((run_dir / "seed-1" / "manifest.json").read_text())
    assert manifest["stages"]["sample_aft_bc-r2"]["status"] == "running" and "aft_bc-r2" not in manifest["stages"]
    result = subprocess.run(_study(run_dir), check=True, capture_output=True, text=True, env=_env())
    assert "aft_bc: complete, skipped" in result.stdout and "sample_aft_bc-r2: running" in result.stdout
    assert (run_dir / "study.json").read_text() == (straight_run / "study.json").read_text()
    for shard in sorted((straight_run / "seed-1" / "groups" / "aft_bc-r2").glob("shard-*.jsonl")):
        assert (round_2 / shard.name).read_text() == shard.read_text()


@pytest.mark.parametrize(
    "override, message",
    [
        ("study.seeds=0,0", "distinct"),
        ("study.seeds=0.5", "integers"),
        ("study.betas=0.1,x", "study.betas"),
        ("study.betas=0.1,0.1", "distinct"),
        ("study.betas=-1", "positive"),
        ("pipeline.methods=aft_xx", "aft_xx"),
        ("pipeline.methods=aft_bc-betax", "not a number"),
        ("pipeline.methods=aft_bc-lr", "not a number"),
        ("pipeline.methods=aft_bc-epochs3", "unknown suffix '-epochs3'"),
        ("study.lrs=0", "learning rate must be positive"),
    ],
)
def test_study_plan_rejects_bad_settings(override, message):
    with pytest.raises(ValueError, match=message):  # pipeline.methods is checked at load, the rest by the plan
        study_plan(load_config(REPO / "configs" / "tiny.py", [override]))
    swept = load_config(REPO / "configs" / "tiny.py", ["study.betas=0.1,0.5", "study.lrs=3e-3,1e-4"])
    _, runs, sweeps = study_plan(swept)
    assert runs == [
        alignment_run("aft_bc"),
        alignment_run("rft"),
        AlignmentRun("aft_bc-beta0.5", {"method": "aft", "constraint": "boundary", "beta": 0.5}),
        AlignmentRun("aft_bc-lr0.0001", {"method": "aft", "constraint": "boundary"}, lr=1e-4),
    ]
    assert sweeps == {"beta": {0.1: "aft_bc", 0.5: "aft_bc-beta0.5"}, "lr": {3e-3: "aft_bc", 1e-4: "aft_bc-lr0.0001"}}


def _result(accuracy: float, correct: list[bool], validation: float, aacc: float) -> dict:
    return {
        "accuracy": accuracy,
        "self_consistency": accuracy,
        "assess_macro": aacc,
        "assess_micro": aacc,
        "ppl_pos": 1.5,
        "ppl_neg": 1.7,
        "validation_accuracy": validation,
        "per_question": {"ids": ["a", "b", "c", "d"], "correct": correct, "self_consistent": correct},
    }


def test_aggregate_verdicts_and_the_beta_chosen_on_validation():
    """Hand-made results of three seeds: aft_bc is 0.25 above vft in every seed (reproduced), the
    0.5-beta model 0.25 below (claim 7 compares the best and the worst beta on validation accuracy,
    whatever the test says), rft equal to vft on average (inconclusive)."""
    results = {}
    for s in range(3):
        results[s] = {
            "vft": _result(0.5, [True, True, False, False], 0.5, 0.70 + 0.01 * s),
            "aft_bc": _result(0.75, [True, True, True, False], 0.4, 0.80 + 0.01 * s),
            "aft_bc-beta0.5": _result(0.25, [True, False, False, False], 0.6, 0.75),
            "rft": _result([0.25, 0.75, 0.5][s], [True, False, False, False], 0.5, 0.72),
            "aft_bc-lr0.0001": _result(0.5, [True, True, False, False], 0.3, 0.7),
        }
    models = ["vft", "aft_bc", "aft_bc-beta0.5", "rft", "aft_bc-lr0.0001"]
    sweeps = {"beta": {0.1: "aft_bc", 0.5: "aft_bc-beta0.5"}, "lr": {1e-3: "aft_bc", 1e-4: "aft_bc-lr0.0001"}}
    study = aggregate(results, models, sweeps)
    assert study["beta_sweep"]["best_worst_on_validation"] == ("aft_bc-beta0.5", "aft_bc")
    assert study["lr_sweep"] == {
        "models": {"0.0001": "aft_bc-lr0.0001", "0.001": "aft_bc"},
        "best_worst_on_validation": ("aft_bc", "aft_bc-lr0.0001"),
    }
    protocol = dict(seeds=[0, 1, 2], task="synthetic", init_from="vft", vft_epochs=1, align_epochs=1, align_lr=1e-3)
    markdown = study_markdown(
        {**study, "protocol": {**protocol, "beta": 0.1, "test_questions": 4, "validation_questions": 4}}, {}
    )
    assert "| 0.0001 | aft_bc-lr0.0001 | 30.0 ± 0.0 | 50.0 ± 0.0 | +0.0 [+0.0, +0.0], p=1.000 |" in markdown
    assert "Chosen on validation accuracy: best aft_bc, worst aft_bc-lr0.0001." in markdown
    verdicts = {(c["claim"], c["method"], c["baseline"], c["metric"]): c for c in study["claims"]}
    assert verdicts[(2, "aft_bc", "vft", "accuracy")]["verdict"] == "reproduced"
    assert verdicts[(2, "aft_bc", "vft", "accuracy")]["difference"] == pytest.approx(0.25)
    assert verdicts[(2, "aft_bc", "vft", "assess_micro")]["verdict"] == "reproduced"
    assert verdicts[(3, "aft_bc", "rft", "accuracy")]["verdict"] == "inconclusive"
    assert verdicts[(7, "aft_bc-beta0.5", "aft_bc", "accuracy")]["verdict"] == "contradicted"
    assert verdicts[(1, "vft", "", "assess_micro")]["verdict"] == "reproduced"  # 0.70-0.72, well below 0.90
    bootstrap = study["paired"]["vft"]["aft_bc"]["accuracy"]["questions"]
    assert bootstrap["mean"] == pytest.approx(0.25) and bootstrap["n"] == 12


def test_method_names():
    assert alignment_run("aft_bc") == AlignmentRun("aft_bc", {"method": "aft", "constraint": "boundary"})
    assert alignment_run("aft_bc-beta0.3").loss == {"method": "aft", "constraint": "boundary", "beta": 0.3}
    assert alignment_run("rrhf_rank").loss == {"method": "rrhf", "constraint": "none", "use_levels": True}
    assert alignment_run("dpo_bc").loss == {"method": "dpo", "constraint": "boundary"}
    assert alignment_run("aft_dc-lr1e-05-beta0.2") == AlignmentRun(
        "aft_dc-lr1e-05-beta0.2", {"method": "aft", "constraint": "detach", "beta": 0.2}, lr=1e-5
    )
    varied = alignment_run("aft_dc").varied(lr=1e-5).varied(beta=0.2)  # the study's runs, made as data
    assert alignment_run(varied.name) == varied


def test_one_seed_uses_the_bootstrap_and_a_lower_claim_can_be_contradicted():
    results = {
        0: {
            "vft": _result(0.25, [True, False, False, False] * 25, 0.5, 0.7),
            "aft_bc": _result(0.5, [True, True, False, False] * 25, 0.5, 0.8),
            "aft_none": _result(0.75, [True, True, True, False] * 25, 0.5, 0.8),
        }
    }
    for r in results[0].values():
        r["per_question"]["ids"] = [str(i) for i in range(100)]
    study = aggregate(results, ["vft", "aft_bc", "aft_none"], {"beta": {}})
    claims = {(c["method"], c["baseline"], c["metric"]): c for c in study["claims"]}
    acc = claims[("aft_bc", "vft", "accuracy")]
    assert acc["test"] == "bootstrap over questions" and acc["verdict"] == "reproduced"
    assert acc["low"] > 0.1 and acc["high"] < 0.4 and acc["p_value"] < 0.01
    assert claims[("aft_none", "vft", "accuracy")]["verdict"] == "contradicted"  # the claim says lower
    assert claims[("aft_bc", "vft", "assess_micro")]["verdict"] == "inconclusive"  # no test with one seed
    assert all(claims[k]["p_holm"] is None for k in [("aft_bc", "vft", "assess_micro"), ("vft", "", "assess_micro")])
    assert study["holm_family"] == 3, "the bootstrap tests of accuracy only: no p-value for AAcc and ppl with one seed"
    assert study["summary"]["vft"]["accuracy"]["low"] is None
