"""Evaluation metrics against NumPy on fixed inputs, and the report's table."""

import numpy as np

from aft_jax.data.groups import Candidate, Group
from aft_jax.method import losses
from aft_jax.stages.evaluate import comparison_table, group_assessment, majority_vote


def test_majority_vote():
    assert majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
    assert majority_vote(["7", "5", "5", "7"]) == "7", "ties go to the answer seen first"
    assert majority_vote([None, None]) is None


def test_group_assessment_matches_numpy_and_the_jax_metric():
    rng = np.random.default_rng(0)
    groups, scores, is_pos, is_neg = [], np.zeros((6, 5), np.float32), np.zeros((6, 5), bool), np.zeros((6, 5), bool)
    for g in range(6):
        n = int(rng.integers(1, 6))
        cands = []
        for k in range(n):
            correct = bool(k == 0 or rng.random() < 0.4)
            score = float(rng.normal(-1, 0.5))
            cands.append(Candidate("", correct, int(correct), k == 0, score * 10, score))
            scores[g, k], is_pos[g, k], is_neg[g, k] = score, correct, not correct
        groups.append(Group(str(g), "", "", tuple(cands)))
    result = group_assessment(groups)

    per_group, right, total = [], 0, 0
    for g in range(6):
        p, n = scores[g][is_pos[g]], scores[g][is_neg[g]]
        if len(p) and len(n):
            wins = (p[:, None] > n[None, :]).sum()
            per_group.append(wins / (len(p) * len(n)))
            right, total = right + wins, total + len(p) * len(n)
    np.testing.assert_allclose([result["assess_macro"], result["assess_micro"]], [np.mean(per_group), right / total])
    macro, micro = losses.assessment_accuracy(scores, is_pos, is_neg)
    np.testing.assert_allclose([result["assess_macro"], result["assess_micro"]], [macro, micro], rtol=1e-6)
    np.testing.assert_allclose(result["ppl_pos"], np.exp(-scores[is_pos].mean()), rtol=1e-6)
    np.testing.assert_allclose(result["ppl_neg"], np.exp(-scores[is_neg].mean()), rtol=1e-6)


def test_comparison_table_holds_the_numbers():
    row = {
        "accuracy": 0.4567,
        "self_consistency": 0.5,
        "assess_macro": 0.7,
        "assess_micro": 0.71,
        "ppl_pos": 1.23,
        "ppl_neg": 4.56,
    }
    table = comparison_table({"vft": row, "aft_bc": row | {"accuracy": 0.5}})
    assert "| vft | 45.7 | 50.0 | 70.0 | 71.0 | 1.23 | 4.56 |" in table
    assert "| aft_bc | 50.0 |" in table


def test_per_task_table_for_the_mix():
    from aft_jax.stages.evaluate import per_task_table

    row = {"per_task": {"gsm8k": {"accuracy": 0.25}, "ecqa": {"accuracy": 0.5}}}
    assert "| vft | 50.0 | 25.0 |" in per_task_table({"vft": row})
    assert per_task_table({"vft": {"per_task": {}}}) == ""
