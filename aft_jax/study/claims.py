"""The paper's claims (AFT_METHOD sections 4 and 7) as comparisons between a study's models, and the
verdict rule (ours).

A claim compares `method` with `baseline` on one metric in one direction ("higher" or "lower"). Its
difference is paired within each seed (the models of a seed share the VFT model, the groups and the test
questions). With two or more seeds the test is the two-sided paired t-test of the per-seed differences,
with their 95% t-interval (both carry training randomness as well as the questions, since each seed
draws its own); with one seed it is the paired bootstrap over that seed's questions (accuracy metrics
only). Claim 1 compares VFT's assessment accuracy with `MISALIGNED_BELOW` (ours: "well below 100%" read
as below 90%) by the one-sample t-test of the per-seed values minus that threshold.

Verdict: the p-values of one study's claims form one family, corrected by Holm's step-down method (`holm`;
a claim with no test, as AAcc with one seed, is left out of it). A claim is **reproduced** when its
Holm-adjusted p-value is below 0.05 and the mean difference lies on the claimed side of zero,
**contradicted** when the adjusted p-value is below 0.05 and the mean lies on the other side, and
**inconclusive** otherwise (no test included). The tests stay two-sided although the claims are
directional: a two-sided test at 0.05 is the pair of one-sided tests at 0.025 each, one for "reproduced"
and one for "contradicted", so either verdict can be reached and the family-wise error rate of all the
verdicts together is at most 5% after Holm. The 95% intervals and raw p-values shown are unadjusted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

MISALIGNED_BELOW = 0.90
ALPHA = 0.05  # family-wise error rate of one study's verdicts


@dataclasses.dataclass(frozen=True)
class Comparison:
    claim: int
    text: str
    method: str
    baseline: str  # a model name, or "" for a comparison with a fixed number (claim 1)
    metric: str
    direction: str  # "higher" | "lower": what the claim says of method against baseline


ITERATED_BASELINES = ("rft", "rrhf", "pro", "dpo", "rrhf_bc", "pro_bc", "dpo_bc")


def paper_claims(
    models: list[str],
    beta_pair: tuple[str, str] | None = None,
    rounds: int = 1,
    last_round: dict[str, str] | None = None,
) -> list[Comparison]:
    """Every comparison whose models are in `models`; claim 7 compares the beta-sweep models `beta_pair`
    (best, worst), chosen on validation accuracy. With several rounds (`rounds` = R > 1), `last_round`
    maps each alignment run to its model of round R, and claims 8 to 10 (ours, not the paper's:
    the question iterating leaves open) compare those models, fixed before the study: AFT after R rounds
    against VFT, against R rounds of each baseline, and against its own first round."""
    have = set(models)
    out = []

    def add(claim, text, method, baseline, metric, direction="higher"):
        if method in have and (baseline in have or not baseline):
            out.append(Comparison(claim, text, method, baseline, metric, direction))

    add(
        1,
        f"VFT is misaligned: AAcc below {100 * MISALIGNED_BELOW:.0f}% (paper: ~70%)",
        "vft",
        "",
        "assess_micro",
        "lower",
    )
    for m in ("aft_dc", "aft_bc"):
        add(2, "AFT beats VFT in accuracy (paper: +1.9 to +2.6 points)", m, "vft", "accuracy")
        add(2, "AFT beats VFT in AAcc (paper: +5.7 to +9.2 points)", m, "vft", "assess_micro")
    for m in ("aft_dc", "aft_bc"):
        for b in ("rft", "rrhf", "pro", "dpo"):
            add(3, "AFT beats the baselines in accuracy", m, b, "accuracy")
    add(4, "no constraint degrades: accuracy falls", "aft_none", "vft", "accuracy", "lower")
    add(4, "no constraint degrades: perplexity of positives rises", "aft_none", "vft", "ppl_pos", "higher")
    add(4, "no constraint degrades: below the boundary constraint", "aft_none", "aft_bc", "accuracy", "lower")
    for b in ("rrhf", "pro", "dpo"):
        add(5, "a constraint improves the baseline's accuracy", f"{b}_bc", b, "accuracy")
    for m in ("aft_bc_rank", "aft_dc_rank"):
        add(6, "with ranking feedback, AFT beats RRHF in accuracy", m, "rrhf_rank", "accuracy")
    if beta_pair:
        add(7, "accuracy depends on beta (best vs worst on validation)", *beta_pair, "accuracy")
    last = last_round if rounds > 1 and last_round else {}
    for m in ("aft_dc", "aft_bc"):
        if m not in last:
            continue
        add(8, f"AFT after {rounds} rounds beats VFT in accuracy (ours)", last[m], "vft", "accuracy")
        add(8, f"AFT after {rounds} rounds beats VFT in AAcc (ours)", last[m], "vft", "assess_micro")
        for b in ITERATED_BASELINES:
            if b in last:
                add(
                    9,
                    f"AFT beats the baselines in accuracy after {rounds} rounds each (ours)",
                    last[m],
                    last[b],
                    "accuracy",
                )
        add(10, f"iterating raises AFT's accuracy: round {rounds} above round 1 (ours)", last[m], m, "accuracy")
    return out


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's adjusted p-values, in the order given: over the m p-values that are not None (nor NaN),
    sorted ascending, p_adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); None stays None (out of the
    family). Tied p-values get equal adjusted values."""
    family = sorted((p, i) for i, p in enumerate(p_values) if p is not None and not math.isnan(p))
    m = len(family)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for j, (p, i) in enumerate(family):
        running = max(running, min(1.0, (m - j) * p))
        adjusted[i] = running
    return adjusted


def verdict(mean: float | None, p_adjusted: float | None, direction: str, alpha: float = ALPHA) -> str:
    """The rule of the module docstring on the mean of `method - baseline` (or `value - threshold`) and
    its Holm-adjusted two-sided p-value."""
    if p_adjusted is None or mean is None or math.isnan(mean) or not p_adjusted < alpha or mean == 0:
        return "inconclusive"
    return "reproduced" if (mean > 0) == (direction == "higher") else "contradicted"
