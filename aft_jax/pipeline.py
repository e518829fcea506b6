"""`aft-jax pipeline`: the three AFT steps and the evaluation, end to end, in one run directory.

    <run_dir>/manifest.json      stages and their status
    <run_dir>/tokenizer/         (when model.tokenizer = "build") a tokenizer trained on the task's text
    <run_dir>/vft/               step 1: VFT run (checkpoints, metrics, model/)
    <run_dir>/groups/train|eval  step 2: candidate groups of training / held-out test questions
    <run_dir>/<method>/          step 3: one alignment run per method
    <run_dir>/eval/<model>.json  metrics of each model
    <run_dir>/report.md, metrics.json, plots/

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
from aft_jax.method.registry import AlignmentRun, alignment_run, method_names
from aft_jax.parallel import sharding

if TYPE_CHECKING:
    from aft_jax.config.spec import RunConfig


@dataclasses.dataclass(frozen=True)
class Stage:
    """A named step of the pipeline: `run()` unless `done()` says its output is already complete (asked
    when the stage is reached, after the ones before it)."""

    name: str
    done: Callable[[], bool]
    run: Callable[[], object]


class Manifest:
    """`manifest.json`: each stage's status (`running` / `done`) and timing."""

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
    models = ["vft", *(run.name for run in runs)]
    stages = [
        *(
            [Stage("tokenizer", lambda: (ctx.run_dir / "tokenizer" / "tokenizer.json").exists(), lambda: ctx.tokenizer)]
            if config.model.tokenizer == "build"
            else []
        ),
        Stage("vft", lambda: ctx.model_done("vft"), lambda: train_vft(ctx)),
        Stage("sample_train", lambda: sampled(ctx, "train"), lambda: sample_groups(ctx, "train")),
        Stage("sample_eval", lambda: sampled(ctx, "eval"), lambda: sample_groups(ctx, "eval")),
        *(
            Stage(run.name, functools.partial(ctx.model_done, run.name), functools.partial(align, ctx, run))
            for run in runs
        ),
        Stage("eval", lambda: not pending(ctx, models), lambda: evaluate_models(ctx, pending(ctx, models))),
    ]
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(ctx.run_dir, config)
    for stage in stages:
        manifest.run(stage)
    return report(ctx, models)


def check_splits(ctx: PipelineContext) -> None:
    """`eval.validation_limit` needs the task to have `task.validation_split`."""
    from aft_jax.config.spec import RunConfigError

    c = ctx.config
    if c.eval.validation_limit > 0 and c.task.validation_split not in ctx.task.splits:
        raise RunConfigError(
            f"eval.validation_limit={c.eval.validation_limit}: task {ctx.task.name} has no split "
            f"task.validation_split={c.task.validation_split!r}; splits: {sorted(ctx.task.splits)}"
        )


def train_vft(ctx: PipelineContext) -> None:
    """Step 1: VFT of the starting model on the task's training split, `pipeline.vft_epochs` epochs."""
    from aft_jax.stages.train import TrainSettings, run_training

    c = ctx.config
    settings = TrainSettings.of(c)
    settings = dataclasses.replace(
        settings,
        loss=dataclasses.replace(c.loss, method="vft"),
        train=dataclasses.replace(c.train, num_epochs=c.pipeline.vft_epochs),
    )
    batcher = ctx.batcher("", "vft")
    run_training(
        ctx.model(),
        ctx.tokenizer,
        batcher,
        settings,
        ctx.run_dir / "vft",
        mesh=ctx.mesh,
        base_name=base_model_name(c.model),
    )


def sampled(ctx: PipelineContext, split: str) -> bool:
    return (ctx.groups_dir(split) / "stats.json").exists()


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


def align(ctx: PipelineContext, run: AlignmentRun) -> None:
    """Step 3: one alignment run on the training groups, from the starting model (`pipeline.init_from` =
    "base") or the VFT model, `pipeline.align_epochs` epochs at the run's learning rate."""
    from aft_jax.stages.train import TrainSettings, run_training

    c = ctx.config
    settings = dataclasses.replace(
        TrainSettings.of(c),
        loss=dataclasses.replace(c.loss, **run.loss),
        optim=dataclasses.replace(c.optim, lr=run.lr if run.lr is not None else align_lr(c)),
        train=dataclasses.replace(c.train, num_epochs=c.pipeline.align_epochs),
    )
    start = "" if c.pipeline.init_from == "base" else str(ctx.model_dir("vft"))
    batcher = ctx.batcher(str(ctx.groups_dir("train")), settings.loss.method)
    run_training(
        ctx.model(path=start), ctx.tokenizer, batcher, settings, ctx.run_dir / run.name, mesh=ctx.mesh,
        base_name=base_model_name(c.model),
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


def report(ctx: PipelineContext, models: list[str]) -> dict:
    """Every model's evaluation; process 0 writes the report, plots and metrics and prints the table."""
    from aft_jax.stages.evaluate import comparison_table, write_report

    results = {name: json.loads(ctx.eval_file(name).read_text()) for name in models}
    if sharding.is_main_process():
        stats = json.loads((ctx.groups_dir("train") / "stats.json").read_text())
        extra = (
            "Training groups: "
            + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
            + "."
        )
        curves = {name: read_metrics(ctx.run_dir / name) for name in models}
        path = write_report(ctx.run_dir, results, curves, extra)
        print("\n" + comparison_table(results) + "\n")
        print(f"report: {path}\nplots:  {ctx.run_dir / 'plots'}\nmetrics: {ctx.run_dir / 'metrics.json'}")
        print(f"on {sharding.describe(ctx.mesh)}")
    return results
