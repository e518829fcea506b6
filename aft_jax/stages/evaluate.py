"""Metrics of AFT_METHOD section 6 and the report.

- accuracy: greedy decoding on test questions, exact match of the extracted answer;
- self-consistency: majority vote over `sc_k` samples at temperature `sc_temperature`;
- assessment accuracy (macro and micro) and perplexity `exp(-mean s)` of positive and of negative
  chains of thought, on held-out groups sampled once from test questions and scored by each model.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from aft_jax.data.groups import Group
from aft_jax.data.tasks import Example, Task
from aft_jax.io.paths import Path
from aft_jax.method import losses
from aft_jax.sampling.sampler import Sampler
from aft_jax.stages.score import Scorer

if TYPE_CHECKING:
    from aft_jax.config.spec import EvalSection


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent extracted answer (ties: the one seen first); None if none was extracted."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def group_assessment(groups: list[Group]) -> dict:
    """Assessment accuracy (`losses.assessment_accuracy` on candidates' `logp_mean`) and perplexities."""
    k = max((len(g.candidates) for g in groups), default=1)
    scores_bk = np.zeros((len(groups), k), np.float32)
    is_pos_bk, is_neg_bk = np.zeros((len(groups), k), bool), np.zeros((len(groups), k), bool)
    for b, g in enumerate(groups):
        for j, c in enumerate(g.candidates):
            scores_bk[b, j], is_pos_bk[b, j], is_neg_bk[b, j] = c.logp_mean, c.correct, not c.correct
    macro, micro = losses.assessment_accuracy(scores_bk, is_pos_bk, is_neg_bk)
    pos, neg = scores_bk[is_pos_bk].tolist(), scores_bk[is_neg_bk].tolist()
    return {
        "assess_macro": float(macro),
        "assess_micro": float(micro),
        "ppl_pos": float(np.exp(-np.mean(pos))) if pos else float("nan"),
        "ppl_neg": float(np.exp(-np.mean(neg))) if neg else float("nan"),
        "pos_scores": pos,
        "neg_scores": neg,
    }


def greedy_correct(
    sampler: Sampler, task: Task, examples: list[Example], *, template: str, max_new_tokens: int, tokenizer=None
) -> tuple[list[str], list[bool]]:
    """Greedy completions of `examples` (prompts in `template`, formatted with `tokenizer` where the
    template needs one, at most `max_new_tokens`) by `sampler`, and whether each one's answer is right."""
    prompts = [task.prompt(x, template, tokenizer) for x in examples]
    greedy = sampler.sample(prompts, max_new_tokens=max_new_tokens)
    texts = [out[0] for out in greedy]
    return texts, [task.is_correct(t, x.answer) for t, x in zip(texts, examples)]


def evaluate_model(
    sampler: Sampler,
    scorer: Scorer,
    task: Task,
    examples: list[Example],
    groups: list[Group],
    validation=(),
    *,
    settings: EvalSection,
    template: str,
    seed: int,
) -> dict:
    """Every metric of section 6 of one model on `examples` (test) and `groups` (held-out): `sampler`
    generates every completion and `scorer` rescores the groups (its tokenizer formats the prompts, in
    `template`); with `validation` questions, also their greedy accuracy (`validation_accuracy`), the number
    to make choices on. `settings` is the `eval` section (max_new_tokens, sc_k, sc_temperature);
    self-consistency samples with seed `seed + 1`."""
    e, tokenizer = settings, scorer.tokenizer
    greedy_options = dict(template=template, max_new_tokens=e.max_new_tokens, tokenizer=tokenizer)
    prompts = [task.prompt(x, template, tokenizer) for x in examples]
    greedy, correct = greedy_correct(sampler, task, examples, **greedy_options)
    sampled = sampler.sample(
        prompts,
        max_new_tokens=e.max_new_tokens,
        temperature=e.sc_temperature,
        num_samples=e.sc_k,
        seed=seed + 1,
    )
    votes = [majority_vote([task.extract_for(t, x) for t in outs]) for outs, x in zip(sampled, examples)]
    consistent = [v is not None and task.answers_match(v, x.answer) for v, x in zip(votes, examples)]
    rescored = scorer.score(groups)
    per_task = {}
    for name in sorted({x.meta.get("task") for x in examples} - {None}):
        rows = [i for i, x in enumerate(examples) if x.meta.get("task") == name]
        per_task[name] = {
            "accuracy": float(np.mean([correct[i] for i in rows])),
            "self_consistency": float(np.mean([consistent[i] for i in rows])),
            "questions": len(rows),
        }
    return {
        "accuracy": float(np.mean(correct)),
        "self_consistency": float(np.mean(consistent)),
        "questions": len(examples),
        "per_task": per_task,
        **group_assessment(rescored),
        "examples": [
            {"question": x.question, "greedy": text, "correct": c} for x, text, c in zip(examples[:5], greedy, correct)
        ],
        "per_question": {  # for paired comparisons between models on the same questions (aft_jax.study.stats)
            "ids": [x.id for x in examples],
            "correct": [bool(c) for c in correct],
            "self_consistent": [bool(c) for c in consistent],
        },
        **validation_accuracy(sampler, task, list(validation), **greedy_options),
    }


def validation_accuracy(
    sampler: Sampler, task: Task, validation: list[Example], *, template: str, max_new_tokens: int, tokenizer=None
) -> dict:
    """`validation_accuracy` and `validation_questions` (greedy, by `sampler`; `greedy_correct`), or nothing
    without validation questions."""
    if not validation:
        return {}
    _, correct = greedy_correct(
        sampler, task, validation, template=template, max_new_tokens=max_new_tokens, tokenizer=tokenizer
    )
    return {"validation_accuracy": float(np.mean(correct)), "validation_questions": len(validation)}


COLUMNS = [
    ("accuracy", "accuracy"),
    ("self_consistency", "self-consistency"),
    ("assess_macro", "AAcc macro"),
    ("assess_micro", "AAcc micro"),
    ("ppl_pos", "ppl pos"),
    ("ppl_neg", "ppl neg"),
]


def comparison_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per model, accuracies in %, perplexities as numbers."""
    header = "| method | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, r in results.items():
        cells = [f"{100 * r[k]:.1f}" if k.startswith(("acc", "self", "assess")) else f"{r[k]:.3g}" for k, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_task_table(results: dict[str, dict]) -> str:
    """Accuracy per task for the multi-task mix (empty for a single task)."""
    tasks = sorted({t for r in results.values() for t in r.get("per_task", {})})
    if not tasks:
        return ""
    lines = ["| method | " + " | ".join(f"{t} accuracy" for t in tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r['per_task'][t]['accuracy']:.1f}" for t in tasks) + " |")
    return "\n".join(lines)


def plot_scores(results: dict[str, dict], path: Path) -> None:
    """Histograms of positive vs negative COT scores per model: the picture of assessment misalignment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        everything = r["pos_scores"] + r["neg_scores"]
        bins = np.linspace(min(everything, default=-1), max(everything, default=0), 30)
        ax.hist(r["neg_scores"], bins=bins, alpha=0.6, label="negative", color="tab:red")
        ax.hist(r["pos_scores"], bins=bins, alpha=0.6, label="positive", color="tab:green")
        ax.set_title(f"{name} (AAcc {100 * r['assess_micro']:.0f}%)")
        ax.set_xlabel("score s(c) = mean log p")
    axes[0][0].legend()
    fig.tight_layout()
    with Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def plot_training(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, rows in curves.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=name)
        axes[1].plot(steps, [r.get("assess_micro") for r in rows], label=name)
    axes[0].set_title("training loss")
    axes[1].set_title("in-batch assessment accuracy")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    with Path(path).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def write_report(run_dir: Path, results: dict[str, dict], curves: dict[str, list[dict]], extra: str = "") -> Path:
    """metrics.json, report.md and plots/ in `run_dir`."""
    plots = run_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    plot_scores(results, plots / "scores.png")
    plot_training(curves, plots / "training.png")
    summary = {
        name: {k: v for k, v in r.items() if k not in ("pos_scores", "neg_scores", "per_question")}
        for name, r in results.items()
    }
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = [
        f"# AFT pipeline report: {run_dir.name}",
        "",
        comparison_table(results),
        "",
        per_task_table(results),
        extra,
        "",
        "![scores](plots/scores.png)",
        "",
        "![training](plots/training.png)",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(report))
    return run_dir / "report.md"
