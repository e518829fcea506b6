"""`aft-jax pipeline`: the three AFT steps and the evaluation, end to end, in one run directory.

    <run_dir>/manifest.json      stages and their status
    <run_dir>/tokenizer/         (when model.tokenizer = "build") a tokenizer trained on the task's text
    <run_dir>/vft/               step 1: VFT run (checkpoints, metrics, model/)
    <run_dir>/groups/train|eval  step 2: candidate groups of training / held-out test questions
    <run_dir>/<method>/          step 3: one alignment run per method
    <run_dir>/groups/<method>-r<r>/, <run_dir>/<method>-r<r>/
                                 rounds r = 2..R (`pipeline.rounds`): groups sampled from round r-1's model
                                 of the method, and the model aligned on them
    <run_dir>/eval/<model>.json  metrics of each model
    <run_dir>/report.md, metrics.json, plots/

Rounds (on-policy iteration, as in Iterative RPO, ReST-EM and STaR): round 1 is steps 2 and 3 above
(groups from the VFT model). Round r >= 2 samples new groups on the training questions from round r-1's
model of each method, with its own sampling seed, and aligns again: from round r-1's model on round r's
groups (`pipeline.round_init = "previous"`), or from the starting model of round 1 on the groups of rounds 1
to r together (`"start"`). Every round's model is evaluated on the same test questions and the same held-out
groups (sampled once, from the VFT model), so assessment accuracy compares like with like across rounds.

`run_pipeline` is the list of stages over one `PipelineContext` (the config, task, meshes and tokenizer,
built once). Each stage is skipped when its output is complete and resumes (from checkpoints or shards)
when not. A run starts from `model.path`, or from a random model made from the run's seed (the same model
whenever a stage needs it). With several processes (a TPU pod; `run_dir` on storage they share),
training runs on all of them together, each samples its own shards and evaluates its share of the models
with its own model copy, and process 0 writes the manifest and the reports; every stage ends at a barrier.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import TYPE_CHECKING, Callable

import jax

from aft_jax.build import Context, base_model_name, sampler_and_scorer
from aft_jax.io.metrics import read_metrics
from aft_jax.io.paths import Path, write_atomically
from aft_jax.io.wandb_log import WandbSettings, log_report
from aft_jax.method.registry import AlignmentRun, alignment_run, method_names
from aft_jax.parallel import sharding

if TYPE_CHECKING:
    from aft_jax.config.spec import RunConfig
    from aft_jax.data.tasks import Example


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named step of the pipeline: `run()` unless `done()` says its output is already complete (asked
    when the stage is reached, after the ones before it); `inputs` (folders it reads) go to the manifest."""

    name: str
    done: Callable[[], bool]
    run: Callable[[], object]
    inputs: dict = dataclasses.field(default_factory=dict)


class Manifest:
    """`manifest.json`: each stage's status (`running` / `done`), timing and inputs."""

    def __init__(self, run_dir: Path, config: RunConfig):
        self.path = run_dir / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        self.data["config"] = config.to_dict()
        self._save()

    def _save(self) -> None:
        if not sharding.is_main_process():
            return
        write_atomically(self.path, json.dumps(self.data, indent=2) + "\n")

    def run(self, stage: Stage) -> None:
        """Runs `stage` unless its output is complete; then waits for every process, so all see the stage's
        output before the next one."""
        entry = self.data["stages"].setdefault(stage.name, {})
        entry.update(stage.inputs)
        if stage.done():
            entry["status"] = "done"
            log(f"{stage.name}: complete, skipped")
        else:
            entry.update(status="running", started=time.time())
            self._save()
            log(f"{stage.name}: running")
            stage.run()
            entry.update(status="done", seconds=round(time.time() - entry["started"], 1))
        sharding.sync(f"stage {stage.name}")
        self._save()


def log(message: str) -> None:
    if sharding.is_main_process():
        print(f"[pipeline] {message}")


def align_lr(config: RunConfig) -> float:
    """The alignment runs' peak learning rate: `pipeline.align_lr`, or `optim.lr` when it is not positive."""
    return config.pipeline.align_lr if config.pipeline.align_lr > 0 else config.optim.lr


def alignment_runs(config: RunConfig) -> list[AlignmentRun]:
    """The alignment runs `pipeline.methods` names."""
    return [alignment_run(name) for name in method_names(config.pipeline.methods)]


def round_name(name: str, r: int) -> str:
    """The model of alignment run `name` after round `r`: `name` itself for round 1, else `name-r<r>`."""
    return name if r == 1 else f"{name}-r{r}"


def pipeline_models(runs: list[AlignmentRun], rounds: int) -> list[str]:
    """Every model a run evaluates: `vft`, then each run's model of round 1, then of round 2, ..."""
    return ["vft", *(round_name(run.name, r) for r in range(1, rounds + 1) for run in runs)]


def round_seed(seed: int, r: int) -> int:
    """The sampling seed of round `r`: the run's seed for round 1, shifted by 65,537 per later round (so a
    round never reuses another round's draws, nor, for the few seeds of a study, another seed's)."""
    return seed + 65_537 * (r - 1)


@dataclasses.dataclass
class PipelineContext(Context):
    """`Context` of a pipeline run, with its folders and the VFT model's sampler and scorer (loaded once for
    both sampling stages)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def model_dir(self, name: str) -> Path:
        return self.run_dir / name / "model"

    def groups_dir(self, split: str) -> Path:
        return self.run_dir / "groups" / split

    def train_groups_dir(self, name: str, r: int) -> Path:
        """The groups round `r` of alignment run `name` trains on: round 1's from the VFT model, shared by
        every run; round r's sampled from the run's model of round r - 1."""
        return self.groups_dir("train") if r == 1 else self.groups_dir(round_name(name, r))

    @property
    def references_file(self) -> Path:
        """task.without_rationale = "sampled": the VFT pairs sampled from the starting model."""
        return self.run_dir / "groups" / REFERENCES

    def examples(self, split: str, limit: int = 0) -> list[Example]:
        """`Context.examples`; for a task without references whose VFT trained on sampled ones
        (`sample_references`), the training questions carry those as their references (questions without
        one keep none)."""
        examples = super().examples(split, limit)
        file = self.references_file
        if split == self.config.task.train_split and not self.task.has_references and file.exists():
            from aft_jax.data.groups import read_pairs

            targets = {g.id: g.candidates[0].text for g in read_pairs(file)}
            examples = [dataclasses.replace(e, target=targets.get(e.id, "")) for e in examples]
        return examples

    def eval_file(self, name: str) -> Path:
        return self.run_dir / "eval" / f"{name}.json"

    def model_done(self, name: str) -> bool:
        from aft_jax.io.peft import WEIGHTS_FILE

        return (self.model_dir(name) / "params").is_dir() or (self.model_dir(name) / WEIGHTS_FILE).exists()

    def trained_model(self, name: str):
        """`(model, tokenizer)` of the trained model `name` on this process's devices: its folder, or for a
        LoRA run the run's base model with the run's adapter."""
        from aft_jax.io.hf import from_pretrained
        from aft_jax.io.peft import is_adapter_dir

        if is_adapter_dir(self.model_dir(name)):
            return self.model(self.sampling_mesh, str(self.model_dir(name))), self.tokenizer
        return from_pretrained(self.model_dir(name), mesh=self.sampling_mesh)

    @functools.cached_property
    def vft_sampling(self):
        """`(sampler, scorer)` of the VFT model on this process's devices."""
        model, tokenizer = self.trained_model("vft")
        return sampler_and_scorer(model, tokenizer, self.config, self.config.sample.batch_size)


def run_pipeline(config: RunConfig, runs: list[AlignmentRun] | None = None) -> dict:
    """Runs every stage not yet complete, with the alignment `runs` (default: `pipeline.methods`); returns
    the evaluation results per model."""
    ctx = PipelineContext.of(config)
    check_splits(ctx)
    runs = alignment_runs(config) if runs is None else runs
    rounds = config.pipeline.rounds
    models = pipeline_models(runs, rounds)
    stages = [
        *(
            [Stage("tokenizer", lambda: (ctx.run_dir / "tokenizer" / "tokenizer.json").exists(), lambda: ctx.tokenizer)]
            if config.model.tokenizer == "build"
            else []
        ),
        *(
            [Stage("sample_vft", lambda: ctx.references_file.exists(), lambda: sample_vft(ctx))]
            if vft_source(ctx) == "sampled"
            else []
        ),
        Stage("vft", lambda: ctx.model_done("vft"), lambda: train_vft(ctx), {"trained_on": vft_data(ctx)}),
        Stage("sample_train", lambda: sampled(ctx, "train"), lambda: sample_groups(ctx, "train")),
        Stage("sample_eval", lambda: sampled(ctx, "eval"), lambda: sample_groups(ctx, "eval")),
    ]
    for r in range(1, rounds + 1):
        for run in runs:
            name = round_name(run.name, r)
            if r > 1:
                stages.append(
                    Stage(
                        f"sample_{name}",
                        functools.partial(_has_stats, ctx.train_groups_dir(run.name, r)),
                        functools.partial(sample_round, ctx, run, r),
                        {"sampled_from": str(ctx.model_dir(round_name(run.name, r - 1)))},
                    )
                )
            start, groups = alignment_inputs(ctx, run, r)
            stages.append(
                Stage(
                    name,
                    functools.partial(ctx.model_done, name),
                    functools.partial(align, ctx, run, r),
                    {"start": start or "the starting model", "groups": list(groups)},
                )
            )
    stages.append(Stage("eval", lambda: not pending(ctx, models), lambda: evaluate_models(ctx, pending(ctx, models))))
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(ctx.run_dir, config)
    for stage in stages:
        manifest.run(stage)
    return report(ctx, models, runs)


def check_splits(ctx: PipelineContext) -> None:
    """`eval.validation_limit` needs the task to have `task.validation_split`."""
    from aft_jax.config.spec import RunConfigError

    c = ctx.config
    if c.eval.validation_limit > 0 and c.task.validation_split not in ctx.task.splits:
        raise RunConfigError(
            f"eval.validation_limit={c.eval.validation_limit}: task {ctx.task.name} has no split "
            f"task.validation_split={c.task.validation_split!r}; splits: {sorted(ctx.task.splits)}"
        )


def vft_source(ctx: Context) -> str:
    """What VFT trains on: "references" (the task's), or for a task without them (task.name='jsonl' with
    task.fields.rationale empty) `task.without_rationale`: "sampled" (the starting model's own chains that
    the answer checker accepts) or "skip" (no VFT: the starting model is the VFT model)."""
    return "references" if ctx.task.has_references else ctx.config.task.without_rationale


def vft_data(ctx: PipelineContext) -> str:
    """What the run's VFT model was trained on, in words (the manifest and the report)."""
    return {
        "references": f"the reference chains of thought of task {ctx.task.name}",
        "sampled": f"{ctx.references_file}: the starting model's sampled chains accepted by the checker "
        "(task.without_rationale=sampled)",
        "skip": "nothing: the starting model is the VFT model (task.without_rationale=skip)",
    }[vft_source(ctx)]


REFERENCES = "vft_references.jsonl"  # in a groups folder: VFT pairs sampled from the starting model


class Unscored:
    """The `Scorer` interface without scores: the chains sampled for VFT references are never compared by
    their log-probs, so they are not scored (and no scoring program is compiled for the starting model)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def score(self, groups):
        return groups


def sample_references(ctx: Context, groups_root: Path, sampler=None) -> Path:
    """task.without_rationale = "sampled" (STaR-style VFT data): `sample.k` chains of thought per training
    question from the starting model, with the run's sampler and `sample` settings, labelled by the task's
    answer checker, into `groups_root/vft/`; then `groups_root/vft_references.jsonl`, a VFT pairs file of
    each question's first accepted chain (questions with none are dropped, and counted in
    `vft_references.json`). Returns the pairs file; skips what is there already. `sampler` (default: the
    starting model's `JaxSampler`) draws the chains."""
    import json

    from aft_jax.data.groups import read_groups
    from aft_jax.errors import SettingError
    from aft_jax.stages.sample import accepted_references, sample_candidates

    c, out = ctx.config, groups_root / REFERENCES
    if out.exists():
        return out
    if sampler is None:
        sampler, _ = sampler_and_scorer(ctx.model(mesh=ctx.sampling_mesh), ctx.tokenizer, c, c.sample.batch_size)
    examples = Context.examples(ctx, c.task.train_split)
    folder = sample_candidates(
        sampler, Unscored(ctx.tokenizer), ctx.task, examples, groups_root / "vft", settings=c.sample,
        template=c.task.template, seed=c.seed,
    )  # fmt: skip
    kept, dropped = accepted_references(read_groups(folder))
    counts = {
        "questions": len(examples),
        "accepted": len(kept),
        "dropped": len(dropped),
        "samples_per_question": c.sample.k,
    }
    log(
        f"VFT references: {len(kept)} of {len(examples)} training questions have a sampled chain (of "
        f"sample.k={c.sample.k}) accepted by task.checker={c.task.checker!r}; {len(dropped)} without one are dropped"
    )
    if not kept:
        raise SettingError(
            f"task.without_rationale='sampled': none of the starting model's {c.sample.k} samples per question was "
            f"accepted by task.checker={c.task.checker!r} on any of the {len(examples)} training questions, so VFT has "
            "nothing to train on; set task.fields.rationale, task.without_rationale=skip, or a stronger model.path"
        )
    if sharding.is_main_process():
        pairs = "".join(
            json.dumps({"id": g.id, "prompt": g.prompt, "answer": g.answer, "target": g.candidates[0].text}) + "\n"
            for g in kept
        )
        write_atomically(groups_root / "vft_references.json", json.dumps(counts | {"dropped_ids": dropped}) + "\n")
        write_atomically(out, pairs)  # written last: marks the references complete
    sharding.sync("vft references")
    return out


def sample_vft(ctx: PipelineContext) -> None:
    sample_references(ctx, ctx.run_dir / "groups")


def train_vft(ctx: PipelineContext) -> None:
    """Step 1: VFT of the starting model on the task's training split, `pipeline.vft_epochs` epochs; for a
    task without references, on the sampled ones (`sample_references`), or none: with
    task.without_rationale = "skip" the starting model is exported untrained as the VFT model."""
    from aft_jax.stages.train import TrainSettings, export_final, run_training

    c = ctx.config
    log(f"vft: trains on {vft_data(ctx)}")
    if vft_source(ctx) == "skip":
        export_final(ctx.model(), ctx.tokenizer, ctx.run_dir / "vft", base_name=base_model_name(c.model))
        return
    settings = TrainSettings.of(c)
    settings = dataclasses.replace(
        settings,
        loss=dataclasses.replace(c.loss, method="vft"),
        train=dataclasses.replace(c.train, num_epochs=c.pipeline.vft_epochs),
    )
    references = str(ctx.references_file) if vft_source(ctx) == "sampled" else ""
    model = ctx.model()
    batcher = ctx.batcher(references, "vft", model.config)
    run_training(
        model,
        ctx.tokenizer,
        batcher,
        settings,
        ctx.run_dir / "vft",
        mesh=ctx.mesh,
        base_name=base_model_name(c.model),
    )


def _has_stats(groups_dir: Path) -> bool:
    return (groups_dir / "stats.json").exists()  # written last: the groups are complete


def sampled(ctx: PipelineContext, split: str) -> bool:
    return _has_stats(ctx.groups_dir(split))


def sample_groups(ctx: PipelineContext, split: str) -> None:
    """Step 2 with the VFT model: candidate groups of the training questions (`train`) or of the first
    `eval.group_questions` test questions (`eval`, held out for assessment accuracy); the VFT model is let go
    after the second."""
    from aft_jax.stages.sample import sample_candidates

    c = ctx.config
    if split == "train":
        examples = ctx.examples(c.task.train_split)
    else:
        examples = ctx.examples(c.task.eval_split)[: max(c.eval.group_questions, 0)]
    sampler, scorer = ctx.vft_sampling
    out_dir = ctx.groups_dir(split)
    sample_candidates(
        sampler, scorer, ctx.task, examples, out_dir, settings=c.sample, template=c.task.template, seed=c.seed
    )
    if split == "eval":
        del ctx.vft_sampling


def sample_round(ctx: PipelineContext, run: AlignmentRun, r: int) -> None:
    """Step 2 of round `r` >= 2: candidate groups of the training questions from `run`'s model of round
    r - 1, with the round's seed (`round_seed`)."""
    from aft_jax.stages.sample import sample_candidates

    c = ctx.config
    model, tokenizer = ctx.trained_model(round_name(run.name, r - 1))
    sampler, scorer = sampler_and_scorer(model, tokenizer, c, c.sample.batch_size)
    sample_candidates(
        sampler, scorer, ctx.task, ctx.examples(c.task.train_split), ctx.train_groups_dir(run.name, r),
        settings=c.sample, template=c.task.template, seed=round_seed(c.seed, r),
    )  # fmt: skip


def alignment_inputs(ctx: PipelineContext, run: AlignmentRun, r: int) -> tuple[str, tuple[str, ...]]:
    """The model round `r` of `run` starts from ("": the starting model) and the groups folders it trains on:
    round 1 from the starting model (`pipeline.init_from` = "base") or the VFT model on round 1's groups; a
    later round from the run's model of round r - 1 on round r's groups (`pipeline.round_init` =
    "previous"), or from the same start as round 1 on the groups of rounds 1 to r (`"start"`)."""
    c = ctx.config
    if r > 1 and c.pipeline.round_init == "previous":
        start, rounds = str(ctx.model_dir(round_name(run.name, r - 1))), [r]
    else:
        start, rounds = ("" if c.pipeline.init_from == "base" else str(ctx.model_dir("vft"))), range(1, r + 1)
    return start, tuple(str(ctx.train_groups_dir(run.name, i)) for i in rounds)


def align(ctx: PipelineContext, run: AlignmentRun, r: int = 1) -> None:
    """Step 3, round `r`: one alignment run (`alignment_inputs`), `pipeline.align_epochs` epochs at the run's
    learning rate."""
    from aft_jax.stages.train import TrainSettings, run_training

    c = ctx.config
    settings = dataclasses.replace(
        TrainSettings.of(c),
        loss=dataclasses.replace(c.loss, **run.loss),
        optim=dataclasses.replace(c.optim, lr=run.lr if run.lr is not None else align_lr(c)),
        train=dataclasses.replace(c.train, num_epochs=c.pipeline.align_epochs),
    )
    start, groups = alignment_inputs(ctx, run, r)
    model = ctx.model(path=start)
    run_training(
        model, ctx.tokenizer, ctx.batcher(groups, settings.loss.method, model.config), settings,
        ctx.run_dir / round_name(run.name, r), mesh=ctx.mesh, base_name=base_model_name(c.model),
    )  # fmt: skip


def pending(ctx: PipelineContext, models: list[str]) -> list[str]:
    """The models not yet evaluated (the same list on every process)."""
    return [name for name in models if not ctx.eval_file(name).exists()]


def evaluate_models(ctx: PipelineContext, names: list[str]) -> None:
    """Evaluation of each model of `names` (`stages.evaluate.evaluate_model`): each process evaluates every
    P-th on its own devices; all of them load every one, since each Orbax restore waits for all processes."""
    from aft_jax.data.groups import read_groups
    from aft_jax.stages.evaluate import evaluate_model

    c = ctx.config
    examples = ctx.examples(c.task.eval_split, limit=c.eval.limit)
    validation = ctx.examples(c.task.validation_split)[: c.eval.validation_limit] if c.eval.validation_limit > 0 else []
    eval_groups = read_groups(ctx.groups_dir("eval"))
    for i, name in enumerate(names):
        model, tokenizer = ctx.trained_model(name)
        if i % jax.process_count() != jax.process_index():
            continue
        result = evaluate_model(
            *sampler_and_scorer(model, tokenizer, c, c.eval.batch_size),
            ctx.task,
            examples,
            eval_groups,
            validation,
            settings=c.eval,
            template=c.task.template,
            seed=c.seed,
        )
        ctx.eval_file(name).parent.mkdir(exist_ok=True)
        write_atomically(ctx.eval_file(name), json.dumps(result) + "\n")  # marks the model evaluated


GROUP_STATISTICS = {
    "groups": "groups",
    "positives_per_group": "positives per group",
    "negatives_per_group": "negatives per group",
    "groups_with_both": "with both",
    "groups_without_signal": "no ranking signal",
    "sample_accuracy": "sampling accuracy",
    "duplicate_rate": "duplicates",
}


def groups_table(ctx: PipelineContext, runs: list[AlignmentRun]) -> str:
    """The training groups of every round (`stats.json` of each folder) as a Markdown table."""
    rows = [("1", "vft", ctx.groups_dir("train"))] + [
        (str(r), round_name(run.name, r - 1), ctx.train_groups_dir(run.name, r))
        for r in range(2, ctx.config.pipeline.rounds + 1)
        for run in runs
    ]
    lines = [
        "| round | sampled from | " + " | ".join(GROUP_STATISTICS.values()) + " |",
        "|" + "---|" * (len(GROUP_STATISTICS) + 2),
    ]
    for r, source, folder in rows:
        stats = json.loads((folder / "stats.json").read_text())
        cells = [
            f"{stats[k]:.3g}" if isinstance(stats.get(k), float) else str(stats.get(k, "")) for k in GROUP_STATISTICS
        ]
        lines.append(f"| {r} | {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(ctx: PipelineContext, models: list[str], runs: list[AlignmentRun]) -> dict:
    """Every model's evaluation; process 0 writes the report, plots and metrics and prints the table."""
    from aft_jax.stages.evaluate import comparison_table, write_report

    results = {name: json.loads(ctx.eval_file(name).read_text()) for name in models}
    if sharding.is_main_process():
        extra = f"VFT trained on {vft_data(ctx)}.\n\n"
        extra += "Training groups (shares of groups; sampling accuracy of the sampled candidates):\n\n"
        curves = {name: read_metrics(ctx.run_dir / name) for name in models}
        path = write_report(ctx.run_dir, results, curves, extra + groups_table(ctx, runs))
        log_report(WandbSettings.of(ctx.config), ctx.run_dir, results)
        print("\n" + comparison_table(results) + "\n")
        print(f"report: {path}\nplots:  {ctx.run_dir / 'plots'}\nmetrics: {ctx.run_dir / 'metrics.json'}")
        print(f"on {sharding.describe(ctx.mesh)}")
    return results
