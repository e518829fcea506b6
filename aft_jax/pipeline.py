"""`aft-jax pipeline`: the three AFT steps and the evaluation, end to end, in one run directory.

    <run_dir>/manifest.json      stages and their status
    <run_dir>/tokenizer/         (when model.tokenizer = "build") a tokenizer trained on the task's text
    <run_dir>/base/              (when model.path is empty) the random initial model every run starts from
    <run_dir>/vft/               step 1: VFT run (checkpoints, metrics, model/)
    <run_dir>/groups/train|eval  step 2: candidate groups of training / held-out test questions
    <run_dir>/<method>/          step 3: one alignment run per method
    <run_dir>/eval/<model>.json  metrics of each model
    <run_dir>/report.md, metrics.json, plots/

Each stage is skipped when its output is complete and resumes (from checkpoints or shards) when not.
With several processes (a TPU pod; `run_dir` on storage they share), training runs on all of them
together, each samples its own shards and evaluates its share of the models with its own model copy,
and process 0 writes the manifest and the reports; every stage ends at a barrier.
"""

from __future__ import annotations

import json
import time

import jax

from aft_jax.io.metrics import read_metrics
from aft_jax.io.paths import Path, write_atomically
from aft_jax.method.registry import method_names, method_settings
from aft_jax.parallel import sharding


class Manifest:
    """`manifest.json`: each stage's status (`running` / `done`) and timing."""

    def __init__(self, run_dir: Path, config):
        self.path = run_dir / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {"stages": {}}
        self.data["config"] = config.to_dict()
        self._save()

    def _save(self) -> None:
        if not sharding.is_main_process():
            return
        write_atomically(self.path, json.dumps(self.data, indent=2) + "\n")

    def stage(self, name: str, done: bool, run) -> None:
        """Runs `run()` unless the stage's output is already complete (`done`); then waits for every
        process, so all see the stage's output before the next one."""
        entry = self.data["stages"].setdefault(name, {})
        if done:
            entry["status"] = "done"
            log(f"{name}: complete, skipped")
        else:
            entry.update(status="running", started=time.time())
            self._save()
            log(f"{name}: running")
            run()
            entry.update(status="done", seconds=round(time.time() - entry["started"], 1))
        sharding.sync(f"stage {name}")
        self._save()


def log(message: str) -> None:
    if sharding.is_main_process():
        print(f"[pipeline] {message}")


def align_lr(config) -> float:
    """The alignment runs' peak learning rate: `pipeline.align_lr`, or `optim.lr` when it is not positive."""
    return config.pipeline.align_lr if config.pipeline.align_lr > 0 else config.optim.lr


def _model_done(folder: Path) -> bool:
    return (folder / "model" / "params").is_dir()


def run_pipeline(config) -> dict:
    """Runs every stage not yet complete; returns the evaluation results per model."""
    from aft_jax.build import load_examples, model_from_config, sampling_mesh, task_from_config
    from aft_jax.config.spec import RunConfigError
    from aft_jax.data.groups import read_groups
    from aft_jax.io.checkpoint import save_model_folder
    from aft_jax.io.hf import from_pretrained
    from aft_jax.sampling.sampler import Sampler
    from aft_jax.stages.evaluate import comparison_table, evaluate_model, write_report
    from aft_jax.stages.sample import sample_candidates
    from aft_jax.stages.train import run_training

    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir, config)
    methods = method_names(config.pipeline.methods)
    method_sections = {name: method_settings(name) for name in methods}
    mesh = sharding.make_mesh(config.train.mesh)  # training runs'
    local_mesh = sampling_mesh(config)  # this process's sampling and evaluation
    task = task_from_config(config)
    if config.eval.validation_limit > 0 and config.task.validation_split not in task.splits:
        raise RunConfigError(
            f"eval.validation_limit={config.eval.validation_limit}: task {task.name} has no split "
            f"task.validation_split={config.task.validation_split!r}; splits: {sorted(task.splits)}"
        )

    if config.model.tokenizer == "build":
        from aft_jax.build import train_tokenizer_on_task

        folder = run_dir / "tokenizer"
        done = (folder / "tokenizer.json").exists()
        manifest.stage(
            "tokenizer",
            done,
            lambda: sharding.is_main_process() and train_tokenizer_on_task(task, config, folder),
        )
        config = config.replace(model={"tokenizer": str(folder)})

    base = config.model.path
    if not base:
        base = str(run_dir / "base")

        def make_base():
            model, tokenizer = model_from_config(config.model, mesh, seed=config.seed)
            save_model_folder(model, tokenizer, base)

        manifest.stage("base", (Path(base) / "params").is_dir(), make_base)
    base_model = {"path": base, "tokenizer": ""}

    vft_dir = run_dir / "vft"
    vft_config = config.replace(
        run_dir=str(vft_dir),
        model=base_model,
        loss={"method": "vft"},
        data={"train_file": ""},
        train={"num_epochs": config.pipeline.vft_epochs},
    )
    manifest.stage("vft", _model_done(vft_dir), lambda: run_training(vft_config, mesh=mesh, task=task))
    vft_model_dir = str(vft_dir / "model")

    groups_train, groups_eval = run_dir / "groups" / "train", run_dir / "groups" / "eval"
    loaded: dict = {}

    def vft_sampler() -> Sampler:
        """The VFT model's one sampler for both sampling stages, loaded when the first one runs."""
        if "vft" not in loaded:
            model, tokenizer = from_pretrained(vft_model_dir, mesh=local_mesh)
            loaded["vft"] = Sampler(
                model, tokenizer, batch_size=config.sample.batch_size, rows_per_prompt=config.sample.rows_per_prompt
            )
        return loaded["vft"]

    sampling = dict(settings=config.sample, template=config.task.template, data=config.data, seed=config.seed)
    manifest.stage(
        "sample_train",
        (groups_train / "stats.json").exists(),
        lambda: sample_candidates(
            vft_sampler(), task, load_examples(task, config.task, config.task.train_split), groups_train, **sampling
        ),
    )
    held_out = load_examples(task, config.task, config.task.eval_split)[: max(config.eval.group_questions, 0)]
    manifest.stage(
        "sample_eval",
        (groups_eval / "stats.json").exists(),
        lambda: sample_candidates(vft_sampler(), task, held_out, groups_eval, **sampling),
    )
    loaded.clear()

    start = base if config.pipeline.init_from == "base" else vft_model_dir
    for name in methods:
        method_config = config.replace(
            run_dir=str(run_dir / name),
            model={"path": start, "tokenizer": ""},
            loss=method_sections[name]["loss"],
            data={"train_file": str(groups_train)},
            train={"num_epochs": config.pipeline.align_epochs},
            optim={"lr": method_sections[name].get("optim", {}).get("lr", align_lr(config))},
        )
        manifest.stage(name, _model_done(run_dir / name), lambda c=method_config: run_training(c, mesh=mesh))

    limit = config.eval.limit if config.eval.limit > 0 else None
    examples = task.load(config.task.eval_split, data_dir=config.task.data_dir or None, limit=limit)
    eval_groups = read_groups(groups_eval)
    validation = []
    if config.eval.validation_limit > 0:
        validation = task.load(config.task.validation_split, data_dir=config.task.data_dir or None)
        validation = validation[: config.eval.validation_limit]
    models = ["vft", *methods]
    outputs = {name: run_dir / "eval" / f"{name}.json" for name in models}

    pending = [name for name in models if not outputs[name].exists()]  # the same list on every process

    def evaluate():
        """Each process evaluates every P-th pending model on its own devices; all of them load every
        pending model, since each Orbax restore waits for all processes."""
        for i, name in enumerate(pending):
            model, tokenizer = from_pretrained(run_dir / name / "model", mesh=local_mesh)
            if i % jax.process_count() == jax.process_index():
                result = evaluate_model(
                    Sampler(
                        model,
                        tokenizer,
                        batch_size=config.eval.batch_size,
                        rows_per_prompt=config.sample.rows_per_prompt,
                    ),
                    task,
                    examples,
                    eval_groups,
                    validation,
                    settings=config.eval,
                    template=config.task.template,
                    data=config.data,
                    seed=config.seed,
                )
                outputs[name].parent.mkdir(exist_ok=True)
                write_atomically(outputs[name], json.dumps(result) + "\n")  # marks the model evaluated

    manifest.stage("eval", not pending, evaluate)
    results = {name: json.loads(out.read_text()) for name, out in outputs.items()}

    stats = json.loads((groups_train / "stats.json").read_text())
    extra = (
        "Training groups: "
        + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items())
        + "."
    )
    if sharding.is_main_process():
        curves = {name: read_metrics(run_dir / name) for name in models}
        report = write_report(run_dir, results, curves, extra)
        print("\n" + comparison_table(results) + "\n")
        print(f"report: {report}\nplots:  {run_dir / 'plots'}\nmetrics: {run_dir / 'metrics.json'}")
        print(f"on {sharding.describe(mesh)}")
    return results
