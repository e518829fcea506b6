"""Holm's correction of a study's verdicts (`aft_jax.study.claims.holm`, `verdict`) against adjusted p-values
computed by hand, the verdicts `aggregate` gives after the correction, and `aft-jax restudy`: a study's
statistics, claims, study.md and plots recomputed from its stored evaluations, in-process on hand-made
results (no training)."""

import json
import re

import pytest
from scipy import stats
from test_study import PNG, _result

from aft_jax.cli import main
from aft_jax.errors import UserError
from aft_jax.study.claims import MISALIGNED_BELOW, holm, verdict
from aft_jax.study.report import claims_table, study_markdown
from aft_jax.study.runner import aggregate, restudy


@pytest.mark.parametrize(
    "p_values, adjusted",
    [
        # sorted 0.005, 0.01, 0.03, 0.04 (m = 4): 4 * 0.005, 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.04)
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        # ties (m = 3): 3 * 0.02, max(0.06, 2 * 0.02), 1 * 0.5
        ([0.02, 0.02, 0.5], [0.06, 0.06, 0.5]),
        # ties after the first (m = 3): 3 * 0.01, 2 * 0.03, max(0.06, 1 * 0.03)
        ([0.03, 0.01, 0.03], [0.06, 0.03, 0.06]),
        # ties in the middle (m = 4): 4 * 0.01, 3 * 0.02, max(0.06, 2 * 0.02), max(0.06, 1 * 0.04)
        ([0.04, 0.02, 0.01, 0.02], [0.06, 0.06, 0.04, 0.06]),
        # None is out of the family (m = 2, not 3): 2 * 0.01, max(0.02, 1 * 0.015)
        ([0.01, None, 0.015], [0.02, None, 0.02]),
        # capped at 1: min(1, 2 * 0.6), max(1, 1 * 0.7)
        ([0.6, 0.7], [1.0, 1.0]),
        ([None], [None]),
        ([], []),
    ],
)
def test_holm_against_hand_computed_adjustments(p_values, adjusted):
    got = holm(p_values)
    assert [g is None for g in got] == [a is None for a in adjusted]
    assert [g for g in got if g is not None] == pytest.approx([a for a in adjusted if a is not None])
    for i, p in enumerate(p_values):  # equal p-values, equal adjusted ones (exactly)
        for j, q in enumerate(p_values):
            if p is not None and p == q:
                assert got[i] == got[j]


def test_verdict_from_the_adjusted_p_value_and_the_side_of_the_mean():
    assert verdict(0.1, 0.01, "higher") == "reproduced"
    assert verdict(-0.1, 0.01, "higher") == "contradicted"
    assert verdict(-0.1, 0.01, "lower") == "reproduced"
    assert verdict(0.1, 0.01, "lower") == "contradicted"
    assert verdict(0.1, 0.05, "higher") == "inconclusive"  # not below 0.05
    assert verdict(0.1, 0.2, "lower") == "inconclusive"
    assert verdict(0.1, None, "higher") == "inconclusive"  # no test


def _three_seeds() -> dict:
    """Three seeds of vft, aft_bc and rft (claims 1, 2 and 3, four tests): aft_bc - vft in accuracy is
    +0.10, +0.13, +0.07 (raw p just below 0.05), aft_bc - rft is about -0.30 (contradicted), VFT's AAcc
    0.70 to 0.72 (below 90%), aft_bc - vft in AAcc +0.05, -0.04, 0 (no difference)."""
    results = {}
    for s, (d_acc, d_rft, aacc, d_aacc) in enumerate(
        [(0.10, 0.30, 0.70, 0.05), (0.13, 0.29, 0.71, -0.04), (0.07, 0.31, 0.72, 0.0)]
    ):
        results[s] = {
            "vft": _result(0.5, [True, True, False, False], 0.5, aacc),
            "aft_bc": _result(0.5 + d_acc, [True, True, True, False], 0.5, aacc + d_aacc),
            "rft": _result(0.5 + d_acc + d_rft, [True, True, True, True], 0.5, 0.7),
        }
    return results


def test_holm_turns_a_raw_rejection_inconclusive_and_keeps_a_strong_one():
    results = _three_seeds()
    study = aggregate(results, ["vft", "aft_bc", "rft"], {})
    claims = {(c["claim"], c["method"], c["baseline"], c["metric"]): c for c in study["claims"]}
    assert study["holm_family"] == len(claims) == 4

    def raw_p(a, b, metric):  # the two-sided t-test of the per-seed differences, by SciPy
        return stats.ttest_1samp([results[s][a][metric] - results[s][b][metric] for s in results], 0).pvalue

    p1 = stats.ttest_1samp([results[s]["vft"]["assess_micro"] - MISALIGNED_BELOW for s in results], 0).pvalue
    p_acc, p_rft = raw_p("aft_bc", "vft", "accuracy"), raw_p("aft_bc", "rft", "accuracy")
    p_aacc = raw_p("aft_bc", "vft", "assess_micro")
    assert p_rft < p1 < p_acc < 0.05 < p_aacc  # the order the adjustments below assume
    # Holm by hand over the ranks 1 to 4 (m = 4): the max over the ranks so far of min(1, (m - rank + 1) * p)
    a1 = 4 * p_rft
    a2 = max(a1, 3 * p1)
    a3 = max(a2, 2 * p_acc)
    a4 = min(1, max(a3, 1 * p_aacc))
    expected = {
        (3, "aft_bc", "rft", "accuracy"): (p_rft, a1, "contradicted"),  # the claim says higher
        (1, "vft", "", "assess_micro"): (p1, a2, "reproduced"),
        (2, "aft_bc", "vft", "accuracy"): (p_acc, a3, "inconclusive"),  # raw p < 0.05, adjusted > 0.05
        (2, "aft_bc", "vft", "assess_micro"): (p_aacc, a4, "inconclusive"),
    }
    for key, (p, adjusted, outcome) in expected.items():
        c = claims[key]
        assert (c["p_value"], c["p_holm"], c["verdict"]) == (pytest.approx(p), pytest.approx(adjusted), outcome), key
    flipped = claims[(2, "aft_bc", "vft", "accuracy")]
    assert flipped["low"] > 0 and flipped["p_value"] < 0.05 < flipped["p_holm"], "reproduced before the correction"
    assert claims[(1, "vft", "", "assess_micro")]["test"] == "one-sample t over seeds"
    table = claims_table(study)
    assert table.splitlines()[0] == (
        "| claim | comparison | metric | difference [95% interval] | test | p | p (Holm) | verdict |"
    )
    assert f"| {p_acc:.3f} | {2 * p_acc:.3f} | **inconclusive** |" in table


def _write_study_dir(run_dir, results, models, sweeps) -> dict:
    """A study's files as `aft-jax study` leaves them: each seed's eval/<model>.json and manifest.json, and
    study.json (here with a stale verdict and no Holm fields, as an older version wrote it)."""
    for s, by_model in results.items():
        (run_dir / f"seed-{s}" / "eval").mkdir(parents=True)
        for m, r in by_model.items():
            (run_dir / f"seed-{s}" / "eval" / f"{m}.json").write_text(json.dumps(r))
        stages = {"vft": {"status": "done", "seconds": 60.0 * (s + 1)}, "eval": {"status": "done", "seconds": 6.0}}
        (run_dir / f"seed-{s}" / "manifest.json").write_text(json.dumps({"stages": stages}))
    protocol = dict(seeds=list(results), task="synthetic", init_from="vft", vft_epochs=1, align_epochs=1)
    protocol.update(align_lr=1e-3, beta=0.1, test_questions=4, validation_questions=4)
    old = {**aggregate(results, models, sweeps), "protocol": protocol}
    del old["holm_family"]
    for c in old["claims"]:
        c["verdict"] = "stale"
        del c["p_holm"]
    (run_dir / "study.json").write_text(json.dumps(old, indent=1))
    return protocol


def test_restudy_recomputes_the_study_from_the_stored_evaluations(tmp_path):
    results = _three_seeds()
    for s, by_model in results.items():
        results[s]["aft_bc-beta0.5"] = _result(0.45, [True, False, False, False], 0.6, 0.75)
        for i, r in enumerate(by_model.values()):
            r.update(pos_scores=[-1.0 + 0.1 * i, -1.2], neg_scores=[-1.5, -1.3 - 0.1 * s], questions=4)
    models, sweeps = ["vft", "aft_bc", "rft", "aft_bc-beta0.5"], {"beta": {0.1: "aft_bc", 0.5: "aft_bc-beta0.5"}}
    protocol = _write_study_dir(tmp_path, results, models, sweeps)
    study = restudy(tmp_path)
    expected = json.loads(json.dumps({**aggregate(results, models, sweeps), "protocol": protocol}))
    assert json.loads(json.dumps(study)) == expected == json.loads((tmp_path / "study.json").read_text())
    assert (tmp_path / "study.json").read_text() == json.dumps(study, indent=1) + "\n"
    assert "stale" not in {c["verdict"] for c in study["claims"]} and study["holm_family"] == 5
    assert study["beta_sweep"]["best_worst_on_validation"] == ("aft_bc-beta0.5", "aft_bc")
    markdown = (tmp_path / "study.md").read_text()
    assert markdown == study_markdown(study, {0: 66.0, 1: 126.0, 2: 186.0})
    assert "Run time: 6.3 min (seed 0: 1.1, seed 1: 2.1, seed 2: 3.1)" in markdown
    assert "Holm's correction over the study's 5 claims" in markdown and claims_table(study) in markdown
    for link in re.findall(r"\]\((plots/[^)]+)\)", markdown):
        data = (tmp_path / link).read_bytes()
        assert data[:8] == PNG and len(data) > 5000


def test_restudy_names_a_missing_file_and_questions_that_differ(tmp_path, capsys):
    results = _three_seeds()
    for by_model in results.values():
        for r in by_model.values():
            r.update(pos_scores=[-1.0], neg_scores=[-1.5])
    _write_study_dir(tmp_path, results, ["vft", "aft_bc", "rft"], {})
    missing = tmp_path / "seed-1" / "eval" / "rft.json"
    missing.unlink()
    stored = (tmp_path / "study.json").read_text()
    with pytest.raises(UserError, match=re.escape(str(missing))):
        restudy(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["restudy", str(tmp_path)])
    assert exit_.value.code == 2 and f"aft-jax restudy: {missing}: no such file" in capsys.readouterr().err
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "elsewhere" / "study.json"))):
        restudy(tmp_path / "elsewhere")

    other = dict(results[1]["rft"], per_question={**results[1]["rft"]["per_question"], "ids": list("abce")})
    missing.write_text(json.dumps(other))
    with pytest.raises(UserError, match="seed 1: rft was evaluated on other test questions than vft"):
        restudy(tmp_path)
    assert (tmp_path / "study.json").read_text() == stored and not (tmp_path / "study.md").exists()
