"""`aft-jax study`: the pipeline once per seed, then statistics over the seeds and the paper's claims.

    <run_dir>/seed-<n>/    one pipeline run per seed of `study.seeds` (each resumable like the pipeline)
    <run_dir>/study.json   per model and metric: mean, std and 95% t-interval over seeds; paired
                           differences against `vft` and `rft`; the claims with their raw and
                           Holm-adjusted p-values and verdicts (`aft_jax.study.claims`)
    <run_dir>/study.md     the same as tables, with the protocol and the tests used
    <run_dir>/plots/       metrics.png, accuracy_vs_aacc.png, scores.png

Models are `vft` and `pipeline.methods`, plus `aft_bc-beta<b>` for each `study.betas` value and
`aft_bc-lr<lr>` for each `study.lrs` value (the configured beta and alignment learning rate are `aft_bc`
itself); each sweep's best and worst are chosen on validation accuracy. A killed study reruns the same
command: finished seeds are skipped stage by stage and the interrupted one resumes, so `study.json` ends
the same.

`aft-jax restudy RUN_DIR` (`restudy`) recomputes study.json, study.md and plots/ from the stored
per-seed evaluations without training, e.g. after a change of the statistics or the verdict rule.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np

from aft_jax.config.spec import RunConfig
from aft_jax.errors import UserError
from aft_jax.io.paths import Path, write_atomically
from aft_jax.io.wandb_log import WandbSettings, log_study
from aft_jax.method.registry import AlignmentRun, alignment_run
from aft_jax.parallel import sharding
from aft_jax.pipeline import GROUP_STATISTICS, align_lr, alignment_runs, log, pipeline_models, round_name, run_pipeline
from aft_jax.study.claims import MISALIGNED_BELOW, holm, paper_claims, verdict
from aft_jax.study.stats import paired_bootstrap, paired_t, t_interval

METRICS = ("accuracy", "self_consistency", "assess_macro", "assess_micro", "ppl_pos", "ppl_neg", "validation_accuracy")
PER_QUESTION = {"accuracy": "correct", "self_consistency": "self_consistent"}
BASELINES = ("vft", "rft")
SWEEPS = ("beta", "lr")


class StudyError(UserError, ValueError):
    """A run directory that `restudy` cannot read, or evaluations that cannot be compared; the message
    names the file, or the seed and the model."""


def _numbers(text: str, what: str, kind=float) -> list:
    """Distinct comma-separated numbers of `kind`; a ValueError names the setting."""
    expected = f"{what}={text!r}: expected distinct comma-separated {'integers' if kind is int else 'numbers'}"
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(expected) from None
    if len(set(values)) != len(values) or any(math.isnan(v) for v in values):
        raise ValueError(expected)
    return values


def study_plan(config: RunConfig) -> tuple[list[int], list[AlignmentRun], dict[str, dict[float, str]]]:
    """The seeds, the alignment runs each seed runs (`pipeline.methods`, then AFT-BC once per other swept
    value: `AlignmentRun.varied`), and the sweeps of AFT-BC as `{"beta": {beta: run name}, "lr": {learning
    rate: run name}}`; a ValueError names the bad setting."""
    seeds = _numbers(config.study.seeds, "study.seeds", int)
    if not seeds:
        raise ValueError(f"study.seeds={config.study.seeds!r}: expected distinct integers, e.g. 0,1,2")
    runs = alignment_runs(config)  # each name checked at load (`config.spec`)
    aft_bc = next((run for run in runs if run.name == "aft_bc"), None)
    sweeps: dict[str, dict[float, str]] = {}
    for key, own, what in (
        ("beta", config.loss.beta, "a boundary margin"),
        ("lr", align_lr(config), "a learning rate"),
    ):
        setting, text = f"study.{key}s", getattr(config.study, f"{key}s")
        sweeps[key] = {}
        for value in _numbers(text, setting):
            if value <= 0:
                raise ValueError(f"{setting}={text!r}: {what} must be positive")
            run = aft_bc if value == own and aft_bc else alignment_run("aft_bc").varied(**{key: value})
            sweeps[key][value] = run.name
            runs += [run] if run.name not in {r.name for r in runs} else []
    return seeds, runs, sweeps


def run_study(config: RunConfig) -> dict:
    seeds, runs, sweeps = study_plan(config)
    run_dir = Path(config.run_dir)
    wandb = WandbSettings.of(config)
    results = {}
    for i, seed in enumerate(seeds):
        log(f"study: seed {seed} ({i + 1} of {len(seeds)})")
        seed_config = config.replace(seed=seed, run_dir=str(run_dir / f"seed-{seed}"))
        if wandb is not None:  # W&B runs <study>/seed-<n>/..., in the study's group
            seed_config = seed_config.replace(
                log={"wandb_run_name": f"{wandb.name}/seed-{seed}", "wandb_group": wandb.group}
            )
        results[seed] = run_pipeline(seed_config, runs)  # every model's evaluation, as in <seed dir>/eval/
    rounds = config.pipeline.rounds
    models = pipeline_models(runs, rounds)
    by_round = {run.name: [round_name(run.name, r) for r in range(1, rounds + 1)] for run in runs} if rounds > 1 else {}
    groups = {s: groups_statistics(run_dir / f"seed-{s}", by_round) for s in seeds}
    study = aggregate(results, models, sweeps, by_round, groups)
    study["protocol"] = protocol(config, seeds, results[seeds[0]]["vft"]["questions"])
    if sharding.is_main_process():
        write_study(run_dir, results, study, wandb)
    return study


def restudy(run_dir: str | Path) -> dict:
    """The study of `run_dir` recomputed from its files, without training: `seeds`, `models`, the sweeps
    and `protocol` from study.json, every model's evaluation from seed-<s>/eval/<model>.json; rewrites
    study.json, study.md and plots/ as `run_study` does. A missing or unreadable file is a `StudyError`
    naming it."""
    run_dir = Path(run_dir)
    stored = _read(run_dir / "study.json")
    try:
        seeds, models, stored_protocol = stored["seeds"], stored["models"], stored["protocol"]
        sweeps = {
            key: {float(value): name for value, name in stored[f"{key}_sweep"]["models"].items()}
            for key in SWEEPS
            if f"{key}_sweep" in stored
        }
    except (KeyError, TypeError, ValueError) as err:
        raise StudyError(f"{run_dir / 'study.json'}: not a study's summary (no valid {err})") from None
    by_round = stored.get("rounds", {}).get("models", {})
    results = {s: {m: _read(run_dir / f"seed-{s}" / "eval" / f"{m}.json") for m in models} for s in seeds}
    groups = {s: groups_statistics(run_dir / f"seed-{s}", by_round) for s in seeds}
    study = aggregate(results, models, sweeps, by_round, groups)
    study["protocol"] = stored_protocol
    write_study(run_dir, results, study)
    return study


def write_study(
    run_dir: Path, results: dict[int, dict[str, dict]], study: dict, wandb: WandbSettings | None = None
) -> None:
    """study.json, plots/ and study.md in `run_dir` (run time from each seed's manifest.json), and the
    claims table on stdout; with `wandb`, the claims table and the plots to the study's W&B run."""
    from aft_jax.study.report import claims_table, plot_study, study_markdown

    seeds = study["seeds"]
    write_atomically(run_dir / "study.json", json.dumps(study, indent=1, allow_nan=False) + "\n")
    plot_study(results, study, run_dir / "plots")
    seconds = {s: _seconds(run_dir / f"seed-{s}") for s in seeds}
    write_atomically(run_dir / "study.md", study_markdown(study, seconds))
    print(
        "\n"
        + claims_table(study)
        + f"\n\nstudy: {run_dir / 'study.md'} ({len(seeds)} seeds, {len(study['models'])} models)"
    )
    log_study(wandb, run_dir, study)


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise StudyError(f"{path}: no such file (written by `aft-jax study`)") from None
    except (OSError, ValueError) as err:
        raise StudyError(f"{path}: unreadable ({err})") from None


def _seconds(seed_dir: Path) -> float:
    stages = _read(seed_dir / "manifest.json")["stages"].values()
    return sum(s.get("seconds", 0.0) for s in stages)


def protocol(config: RunConfig, seeds: list[int], test_questions: int) -> dict:
    p = config.pipeline
    return {
        "seeds": seeds,
        "task": config.task.name,
        "init_from": p.init_from,
        "vft_epochs": p.vft_epochs,
        "align_epochs": p.align_epochs,
        "align_lr": align_lr(config),
        "beta": config.loss.beta,
        "rounds": p.rounds,
        "round_init": p.round_init,
        "test_questions": test_questions,
        "validation_questions": config.eval.validation_limit,
    }


def groups_statistics(seed_dir: Path, by_round: dict[str, list[str]]) -> dict[str, dict]:
    """`stats.json` of the groups each round's model was trained on (`by_round`: run -> its model of each
    round), by model; {} without rounds. Round 1's are the shared groups/train, round r's groups/<model>.
    A folder without stats.json (a results copy that left it out) is skipped."""
    folders = {
        model: seed_dir / "groups" / ("train" if r == 0 else model)
        for names in by_round.values()
        for r, model in enumerate(names)
    }
    return {
        model: json.loads((f / "stats.json").read_text()) for model, f in folders.items() if (f / "stats.json").exists()
    }


def _interval(interval) -> dict:
    """An `Interval` as JSON (NaN, as with a single seed, becomes null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in dataclasses.asdict(interval).items()}


def aggregate(
    results: dict[int, dict[str, dict]],
    models: list[str],
    sweeps: dict[str, dict[float, str]],
    by_round: dict[str, list[str]] | None = None,
    groups: dict[int, dict[str, dict]] | None = None,
) -> dict:
    """`results[seed][model]` (evaluation JSON) -> the summary, paired differences, sweeps and claims; with
    rounds, `by_round` (run -> its model of rounds 1..R) and `groups[seed][model]` (the statistics of the
    groups each model trained on) add `rounds` (`rounds_summary`) and claims 8 to 10."""
    seeds = list(results)
    by_round = by_round or {}
    summary: dict[str, dict] = {}
    for m in models:
        summary[m] = {}
        for metric in METRICS:
            values = [results[s][m].get(metric) for s in seeds]
            if all(v is not None and not math.isnan(v) for v in values):
                summary[m][metric] = {**_interval(t_interval(values)), "values": values}
    paired = {b: {m: difference(results, m, b) for m in models if m != b} for b in BASELINES if b in models}
    swept = {key: sweep(names, summary) for key, names in sweeps.items()}
    claims = []
    last_round = {run: names[-1] for run, names in by_round.items()}
    beta_pair = swept.get("beta", {}).get("best_worst_on_validation")
    for c in paper_claims(models, beta_pair, max(map(len, by_round.values()), default=1), last_round):
        if c.baseline:
            done = paired.get(c.baseline, {}).get(c.method, {})
            d = done.get(c.metric) or difference(results, c.method, c.baseline, [c.metric]).get(c.metric)
            if d is None:  # a metric without a value (no group with both kinds of candidate)
                continue
            interval = d["seeds"] if len(seeds) > 1 else d.get("questions", d["seeds"])
            test = "t over seeds" if len(seeds) > 1 else "bootstrap over questions" if "questions" in d else "none"
        else:
            if c.metric not in summary[c.method]:
                continue
            s = summary[c.method][c.metric]
            interval = {k: (s[k] - MISALIGNED_BELOW if s[k] is not None else None) for k in ("mean", "low", "high")}
            # the one-sample t-test of value - threshold: its interval is the one above, shifted
            interval["p_value"] = paired_t(s["values"], [MISALIGNED_BELOW] * len(seeds)).p_value
            test = "one-sample t over seeds" if len(seeds) > 1 else "none"
        claims.append(
            {
                **dataclasses.asdict(c),
                "difference": interval["mean"],
                "low": interval["low"],
                "high": interval["high"],
                "p_value": interval.get("p_value"),
                "test": test,
            }
        )
    for c, p in zip(claims, holm([c["p_value"] for c in claims])):
        c["p_holm"] = p
        c["verdict"] = verdict(c["difference"], p, c["direction"])
    return {
        "seeds": seeds,
        "models": models,
        "summary": summary,
        "paired": paired,
        **{f"{key}_sweep": value for key, value in swept.items()},
        "claims": claims,
        "holm_family": sum(c["p_holm"] is not None for c in claims),
        **({"rounds": rounds_summary(results, by_round, groups or {})} if by_round else {}),
    }


def rounds_summary(results, by_round: dict[str, list[str]], groups: dict[int, dict[str, dict]]) -> dict:
    """Per model of every round: its accuracy and AAcc against RFT's model of the same round (`vs_rft`) and
    against the run's own first round (`vs_round_1`), paired within seeds as `difference`; and the mean
    over seeds of the statistics of the groups it trained on (`groups`)."""
    rft = by_round.get("rft", [])
    vs_rft, vs_first = {}, {}
    for run, names in by_round.items():
        for r, model in enumerate(names):
            if run != "rft" and r < len(rft):
                vs_rft[model] = difference(results, model, rft[r], ("accuracy", "assess_micro"))
            if r > 0:
                vs_first[model] = difference(results, model, names[0], ("accuracy", "assess_micro"))
    seeds = list(results)
    stats = {}
    for model in (m for names in by_round.values() for m in names):
        have = [groups.get(s, {}).get(model) for s in seeds]
        if all(have):
            stats[model] = {
                k: _interval(t_interval([g[k] for g in have]))
                for k in GROUP_STATISTICS
                if all(isinstance(g.get(k), (int, float)) for g in have)
            }
    return {"models": by_round, "vs_rft": vs_rft, "vs_round_1": vs_first, "groups": stats}


def sweep(names: dict[float, str], summary: dict) -> dict:
    """`{"models": {value: name}, "best_worst_on_validation": (best, worst) or None}`: the choice is made on
    mean validation accuracy over seeds, never on the test questions."""
    best_worst = None
    if len(names) >= 2 and all("validation_accuracy" in summary[n] for n in names.values()):
        ranked = sorted(names.values(), key=lambda n: summary[n]["validation_accuracy"]["mean"])
        best_worst = (ranked[-1], ranked[0])
    return {
        "models": {f"{value:g}": name for value, name in sorted(names.items())},
        "best_worst_on_validation": best_worst,
    }


def difference(results, method: str, baseline: str, metrics=METRICS) -> dict:
    """Per metric `method - baseline`, paired within each seed: `seeds` (t-interval of the per-seed
    differences, with p-value) and, for per-question metrics, `questions` (paired bootstrap)."""
    seeds = list(results)
    out = {}
    for metric in metrics:
        a = [results[s][method].get(metric) for s in seeds]
        b = [results[s][baseline].get(metric) for s in seeds]
        if any(v is None or math.isnan(v) for v in a + b):
            continue
        out[metric] = {"seeds": _interval(paired_t(a, b))}
        if metric in PER_QUESTION:
            a_sq, b_sq = (_per_question(results, seeds, m, PER_QUESTION[metric]) for m in (method, baseline))
            if a_sq is not None and b_sq is not None:
                out[metric]["questions"] = _interval(paired_bootstrap(a_sq, b_sq))
    return out


def _per_question(results, seeds, model: str, key: str):
    """`[seeds, questions]` of a per-question result, aligned by question id with the seed's VFT rows."""
    rows = []
    for s in seeds:
        pq = results[s][model]["per_question"]
        order = results[s]["vft"]["per_question"]["ids"]
        if pq["ids"] != order:
            raise StudyError(
                f"seed {s}: {model} was evaluated on other test questions than vft (per_question.ids of "
                f"seed-{s}/eval/{model}.json and seed-{s}/eval/vft.json differ); evaluate both on the same questions"
            )
        rows.append(np.asarray(pq[key], np.float64))
    return np.stack(rows) if len({len(r) for r in rows}) == 1 else None
