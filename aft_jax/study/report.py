"""`study.md` and the study's plots, from the aggregate of `aft_jax.study.runner` (no computation of its own)."""

from __future__ import annotations

from aft_jax.io.paths import Path
from aft_jax.stages.evaluate import plot_scores
from aft_jax.study.claims import MISALIGNED_BELOW
from aft_jax.study.claims import __doc__ as VERDICT_RULE

PERCENT = ("accuracy", "self_consistency", "assess_macro", "assess_micro", "validation_accuracy")
TITLES = {
    "accuracy": "accuracy",
    "self_consistency": "self-consistency",
    "assess_micro": "AAcc micro",
    "assess_macro": "AAcc macro",
    "ppl_pos": "ppl pos",
    "ppl_neg": "ppl neg",
    "validation_accuracy": "validation accuracy",
}


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT else 1.0


def _cell(s: dict | None, metric: str) -> str:
    """`mean ± half-width` of the 95% interval (`mean` alone with one seed)."""
    if s is None:
        return ""
    k, digits = _scale(metric), 1 if metric in PERCENT else 3
    if s["low"] is None:
        return f"{k * s['mean']:.{digits}f}"
    return f"{k * s['mean']:.{digits}f} ± {k * (s['high'] - s['low']) / 2:.{digits}f}"


def _difference(d: dict | None, metric: str) -> str:
    if d is None:
        return ""
    k, digits = _scale(metric), 1 if metric in PERCENT else 3
    low, high = ("?" if d[x] is None else f"{k * d[x]:+.{digits}f}" for x in ("low", "high"))
    p = "" if d.get("p_value") is None else f", p={d['p_value']:.3f}"
    return f"{k * d['mean']:+.{digits}f} [{low}, {high}]{p}"


def study_markdown(study: dict, seconds: dict) -> str:
    p = study["protocol"]
    lines = [
        f"# Study: {p['task']}, {len(p['seeds'])} seeds ({', '.join(map(str, p['seeds']))})",
        "",
        (
            f"Protocol: alignment from the **{p['init_from']}** model, VFT {p['vft_epochs']} epochs, alignment "
            f"{p['align_epochs']} epochs at peak lr {p['align_lr']:g}, beta {p['beta']:g}"
            f"{_rounds_protocol(p)}; {p['test_questions']} test "
            f"questions and {p['validation_questions']} validation questions per seed"
            f"{' (each seed draws its own questions)' if p['task'] == 'synthetic' else ''}. "
            f"Run time: {sum(seconds.values()) / 60:.1f} min "
            f"({', '.join(f'seed {s}: {t / 60:.1f}' for s, t in seconds.items())})."
        ),
        "",
        "## Models: mean ± half-width of the 95% t-interval over seeds",
        "",
        models_table(study),
    ]
    for baseline, rows in study["paired"].items():
        lines += [
            "",
            f"## Paired differences against {baseline} (points; [95% interval], p-value)",
            "",
            "| model | accuracy, t over seeds | accuracy, bootstrap over questions | AAcc micro, t over seeds |",
            "|---|---|---|---|",
        ]
        for name, d in rows.items():
            acc = d.get("accuracy", {})
            aacc = d.get("assess_micro", {})
            cells = [_difference(acc.get("seeds"), "accuracy"), _difference(acc.get("questions"), "accuracy")]
            lines.append(f"| {name} | " + " | ".join([*cells, _difference(aacc.get("seeds"), "assess_micro")]) + " |")
    lines += [
        "",
        (
            "Tests: the t-interval (and two-sided paired t-test) of the per-seed differences, which carries "
            "training randomness; the paired bootstrap resamples each seed's test questions (10,000 times, the "
            "same indices for both models) and carries question sampling only."
        ),
        "",
        "## The paper's claims",
        "",
        claims_table(study),
        "",
        (
            f"Tests are two-sided; the verdicts use Holm's correction over the study's {study['holm_family']} "
            "claims with a test (family-wise error rate 5%); the differences, 95% intervals and raw p-values are "
            "unadjusted."
        ),
    ]
    for key, title in (("beta", "beta"), ("lr", "learning rate")):
        sweep = study.get(f"{key}_sweep", {})
        if not sweep.get("models"):
            continue
        lines += [
            "",
            f"## {title.capitalize()} sweep (AFT-BC)",
            "",
            f"| {title} | model | validation accuracy | test accuracy | test accuracy - vft, t over seeds |",
            "|---|---|---|---|---|",
        ]
        for value, name in sweep["models"].items():
            s = study["summary"][name]
            d = study["paired"].get("vft", {}).get(name, {}).get("accuracy", {})
            lines.append(
                f"| {value} | {name} | {_cell(s.get('validation_accuracy'), 'validation_accuracy')} | "
                f"{_cell(s.get('accuracy'), 'accuracy')} | {_difference(d.get('seeds'), 'accuracy')} |"
            )
        chosen = sweep["best_worst_on_validation"]
        if chosen:
            lines += ["", f"Chosen on validation accuracy: best {chosen[0]}, worst {chosen[1]}."]
    if "rounds" in study:
        lines += ["", rounds_markdown(study)]
    rule = VERDICT_RULE.split("\n\n", 1)[1].strip()
    lines += [
        "",
        "## Verdict rule",
        "",
        rule,
        "",
        "![metrics](plots/metrics.png)",
        "",
        "![accuracy vs AAcc](plots/accuracy_vs_aacc.png)",
        "",
        "![scores](plots/scores.png)",
        "",
        *(["![rounds](plots/rounds.png)", ""] if "rounds" in study else []),
    ]
    return "\n".join(lines)


GROUP_COLUMNS = {
    "positives_per_group": "positives per group",
    "groups_with_both": "with both (%)",
    "groups_without_signal": "no ranking signal (%)",
    "sample_accuracy": "sampling accuracy (%)",
}


def rounds_markdown(study: dict) -> str:
    """The rounds section of study.md: each run's model of every round with its accuracy, AAcc and
    perplexities, paired against VFT, against RFT's model of the same round and against its own first round,
    then the statistics of the groups each round trained on."""
    rounds = study["rounds"]
    vft = study["paired"].get("vft", {})
    lines = [
        "## Rounds",
        "",
        "Round r >= 2 of each method trained on groups sampled from its own model of round r - 1 (the protocol "
        "is above). Differences in points, paired within seeds: t-interval over seeds and p-value, unadjusted "
        "(the claims above carry the correction).",
        "",
        "| model | round | accuracy | AAcc micro | ppl pos | validation accuracy | accuracy - vft | AAcc - vft "
        "| accuracy - rft, same round | accuracy - round 1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for names in rounds["models"].values():
        for r, name in enumerate(names, start=1):
            s = study["summary"][name]
            cells = [_cell(s.get(m), m) for m in ("accuracy", "assess_micro", "ppl_pos", "validation_accuracy")]
            diffs = [
                vft.get(name, {}).get("accuracy", {}).get("seeds"),
                vft.get(name, {}).get("assess_micro", {}).get("seeds"),
                rounds["vs_rft"].get(name, {}).get("accuracy", {}).get("seeds"),
                rounds["vs_round_1"].get(name, {}).get("accuracy", {}).get("seeds"),
            ]
            metrics = ("accuracy", "assess_micro", "accuracy", "accuracy")
            cells += [_difference(d, m) for d, m in zip(diffs, metrics)]
            lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    if rounds["groups"]:
        lines += [
            "",
            "The groups each model trained on (mean ± half-width of the 95% t-interval over seeds; round 1's are "
            "VFT's, shared by every method):",
            "",
            "| model | round | " + " | ".join(GROUP_COLUMNS.values()) + " |",
            "|---|---|" + "---|" * len(GROUP_COLUMNS),
        ]
        for names in rounds["models"].values():
            for r, name in enumerate(names, start=1):
                g = rounds["groups"].get(name, {})
                cells = [_group_cell(g.get(k), k) for k in GROUP_COLUMNS]
                lines.append(f"| {name} | {r} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _group_cell(s: dict | None, key: str) -> str:
    if s is None:
        return ""
    k = 1.0 if key == "positives_per_group" else 100.0
    return f"{k * s['mean']:.2f}" if s["low"] is None else f"{k * s['mean']:.2f} ± {k * (s['high'] - s['low']) / 2:.2f}"


def _rounds_protocol(p: dict) -> str:
    if p.get("rounds", 1) == 1:
        return ""
    start = (
        "each from the method's model of the round before, on that round's groups"
        if p["round_init"] == "previous"
        else "each from the same start as round 1, on the groups of every round so far"
    )
    return f", {p['rounds']} rounds (round r >= 2 samples its groups from round r - 1's model; {start})"


def models_table(study: dict) -> str:
    models = study["models"]
    metrics = [m for m in TITLES if any(m in study["summary"][x] for x in models)]
    lines = ["| model | " + " | ".join(TITLES[m] for m in metrics) + " |", "|" + "---|" * (len(metrics) + 1)]
    for name in models:
        lines.append(f"| {name} | " + " | ".join(_cell(study["summary"][name].get(m), m) for m in metrics) + " |")
    return "\n".join(lines)


def _p(p: float | None) -> str:
    return "" if p is None else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def claims_table(study: dict) -> str:
    """One row per claim: the difference with its unadjusted 95% interval, the raw and the Holm-adjusted
    p-value, and the verdict (from the adjusted one)."""
    lines = [
        "| claim | comparison | metric | difference [95% interval] | test | p | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in study["claims"]:
        against = c["baseline"] or f"{100 * MISALIGNED_BELOW:.0f}%"
        interval = {"mean": c["difference"], "low": c["low"], "high": c["high"]}
        lines.append(
            f"| {c['claim']}. {c['text']} | {c['method']} {'>' if c['direction'] == 'higher' else '<'} {against} "
            f"| {TITLES[c['metric']]} | {_difference(interval, c['metric'])} | {c['test']} | {_p(c['p_value'])} "
            f"| {_p(c['p_holm'])} | **{c['verdict']}** |"
        )
    return "\n".join(lines)


def plot_study(results: dict, study: dict, plots: Path) -> None:
    """metrics.png (accuracy and AAcc per model with 95% intervals), accuracy_vs_aacc.png (every model of
    every seed) and scores.png (positive vs negative scores per model, pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    models = study["models"]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(models)), 3.6))
    for ax, metric in zip(axes, ("accuracy", "assess_micro")):
        s = [study["summary"][m].get(metric, {"mean": float("nan"), "low": None}) for m in models]
        means = [100 * x["mean"] for x in s]
        errors = [0 if x["low"] is None else 100 * (x["high"] - x["low"]) / 2 for x in s]
        ax.bar(range(len(models)), means, yerr=errors, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(models)), models, rotation=45, ha="right")
        ax.set_ylabel(f"{TITLES[metric]} (%)")
        ax.set_ylim(max(0, min(means) - 3 * max(errors + [1])), None)
    fig.tight_layout()
    _save(fig, plots / "metrics.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, m in enumerate(models):
        points = [(100 * r[m]["assess_micro"], 100 * r[m]["accuracy"]) for r in results.values()]
        ax.scatter(*zip(*points), label=m, color=plt.cm.tab20(i % 20), s=22)
    ax.set_xlabel("AAcc micro (%)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, plots / "accuracy_vs_aacc.png")
    plt.close("all")

    pooled = {
        m: {
            "pos_scores": [x for r in results.values() for x in r[m]["pos_scores"]],
            "neg_scores": [x for r in results.values() for x in r[m]["neg_scores"]],
        }
        for m in models
    }
    for m, r in pooled.items():
        r["assess_micro"] = study["summary"][m].get("assess_micro", {"mean": float("nan")})["mean"]
    plot_scores(pooled, plots / "scores.png")
    if "rounds" in study:
        plot_rounds(study, plots / "rounds.png")


def plot_rounds(study: dict, path: Path) -> None:
    """rounds.png: accuracy and AAcc of each run over rounds (round 0: VFT), mean with its 95% interval."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("accuracy", "assess_micro")):
        for i, (run, names) in enumerate(study["rounds"]["models"].items()):
            rows = [study["summary"][m].get(metric) for m in ["vft", *names]]
            xs = [r for r, row in enumerate(rows) if row]
            means = [100 * rows[r]["mean"] for r in xs]
            errors = [0 if rows[r]["low"] is None else 100 * (rows[r]["high"] - rows[r]["low"]) / 2 for r in xs]
            ax.errorbar([x + 0.06 * i for x in xs], means, yerr=errors, capsize=3, marker="o", label=run)
        ax.set_xticks(range(len(names) + 1), ["VFT", *(str(r) for r in range(1, len(names) + 1))])
        ax.set_xlabel("round")
        ax.set_ylabel(f"{TITLES[metric]} (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path: Path) -> None:
    with Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
