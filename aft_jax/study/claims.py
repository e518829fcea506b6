"""The paper's claims (AFT_METHOD sections 4 and 7) as comparisons between a study's models, and the
verdict rule (ours).

A claim compares `method` with `baseline` on one metric in one direction ("higher" or "lower"). Its
difference is paired within each seed (the models of a seed share the VFT model, the groups and the test
questions). With two or more seeds the interval is the 95% t-interval of the per-seed differences (it
carries training randomness as well as the questions, since each seed draws its own); with one seed it
is the paired bootstrap over that seed's questions (accuracy metrics only).

Verdict: **reproduced** when the whole interval lies on the claimed side of zero, **contradicted** when
the whole interval lies on the other side, **inconclusive** otherwise. Claim 1 compares VFT's assessment
accuracy with `MISALIGNED_BELOW` (ours: "well below 100%" read as below 90%) the same way.
"""

from __future__ import annotations

import dataclasses
import math

MISALIGNED_BELOW = 0.90


@dataclasses.dataclass(frozen=True)
class Comparison:
    claim: int
    text: str
    method: str
    baseline: str  # a model name, or "" for a comparison with a fixed number (claim 1)
    metric: str
    direction: str  # "higher" | "lower": what the claim says of method against baseline


def paper_claims(models: list[str], beta_pair: tuple[str, str] | None = None) -> list[Comparison]:
    """Every comparison whose models are in `models`; claim 7 compares the beta-sweep models `beta_pair`
    (best, worst), chosen on validation accuracy."""
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
    return out


def verdict(low: float | None, high: float | None, direction: str) -> str:
    """The rule of the module docstring on an interval of `method - baseline` (or `value - threshold`)."""
    if low is None or high is None or math.isnan(low) or math.isnan(high):
        return "inconclusive"
    above, below = low > 0, high < 0
    if direction == "lower":
        above, below = below, above
    return "reproduced" if above else "contradicted" if below else "inconclusive"
