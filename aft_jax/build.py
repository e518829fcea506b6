"""From a run config to live objects, once, at an entry point (a command, the pipeline, the study): the
meshes, the task and its examples, the tokenizer (loaded, or trained on the task), the models, the sampler
and scorer of a model, and the training batches. The stages receive these objects and their own
settings, never the run config.

`Context` holds what a command or a pipeline run shares: its config, task, meshes and tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING

from aft_jax.data.tasks import Example, Task, get_task, make_checker
from aft_jax.io.paths import Path
from aft_jax.model.config import ConfigError, ModelConfig
from aft_jax.parallel import sharding

if TYPE_CHECKING:
    from aft_jax.config.spec import ModelSection, RunConfig, TaskSection
    from aft_jax.data.batches import GroupBatcher
    from aft_jax.data.groups import Group
    from aft_jax.sampling.sampler import JaxSampler
    from aft_jax.stages.score import Scorer


def resolve_model_path(name: str) -> str:
    """ "smollm2" names the built-in SmolLM2-135M checkpoint; anything else is a folder or hub name."""
    if name == "smollm2":
        from aft_jax.io.smollm2 import smollm2_checkpoint

        return str(smollm2_checkpoint())
    return name


def load_tokenizer(name: str, key: str = "model.tokenizer"):
    """A tokenizer from a folder (a local one or a URI such as gs://...), a hub name, or "smollm2"; a folder
    without tokenizer files, or a name that gives none, is a user error naming `key`."""
    import os

    from transformers import AutoTokenizer

    from aft_jax.config.spec import RunConfigError
    from aft_jax.io.hf import TOKENIZER_FILES
    from aft_jax.io.hf_files import CheckpointError, check_hub_name, first_line
    from aft_jax.io.paths import fetched_dir, is_remote

    path = resolve_model_path(name)
    if not is_remote(path) and not os.path.exists(os.path.expanduser(path)):
        check_hub_name(path)
    with fetched_dir(path, skip=("params",)) as local:
        if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
            raise RunConfigError(f"{key}={name!r}: {local} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        try:
            return AutoTokenizer.from_pretrained(local)
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{key}={name!r}: no tokenizer could be loaded ({first_line(err)})") from err


def task_from_config(config: RunConfig) -> Task:
    """The task of `task.name` (the synthetic one generated with its configured sizes and the run's seed;
    jsonl reading `task.files` by `task.fields`), checking answers with `task.checker` when that is set."""
    t = config.task
    if t.name == "synthetic":
        task = get_task(
            "synthetic",
            num_train=t.synthetic_train,
            num_validation=t.synthetic_validation,
            num_test=t.synthetic_test,
            seed=config.seed,
        )
    elif t.name == "jsonl":
        task = get_task("jsonl", files=dataclasses.asdict(t.files), **dataclasses.asdict(t.fields))
    else:
        task = get_task(t.name)
    return task.with_checker(make_checker(t.checker, t.checker_timeout)) if t.checker else task


def load_examples(task: Task, task_cfg: TaskSection, split: str, limit: int = 0) -> list[Example]:
    """A split of `task`, read from `task_cfg.data_dir` (the `task` section), at most `limit` questions when
    positive; the training split is cut to `task_cfg.limit` questions when that is positive."""
    if split == task_cfg.train_split and task_cfg.limit > 0:
        limit = min(limit, task_cfg.limit) if limit > 0 else task_cfg.limit
    return task.load(split, data_dir=task_cfg.data_dir or None, limit=limit if limit > 0 else None)


def train_tokenizer_on_task(task: Task, config: RunConfig, out_dir: str | Path):
    """`train_task_tokenizer` (`model.build_vocab_size` tokens at most) on the prompt (`task.template`) and
    target of every training question."""
    from aft_jax.data.task_tokenizer import train_task_tokenizer

    examples = load_examples(task, config.task, config.task.train_split)
    texts = [task.prompt(e, config.task.template) + e.target for e in examples]
    return train_task_tokenizer(texts, out_dir, vocab_size=config.model.build_vocab_size)


def tokenizer_folder(config: RunConfig) -> str:
    """Where the run's tokenizer is: `model.tokenizer`, `<run_dir>/tokenizer` for "build", else the model's
    own folder (`model.path`)."""
    if config.model.tokenizer == "build":
        return str(Path(config.run_dir) / "tokenizer")
    return config.model.tokenizer or config.model.path


def tokenizer_from_config(config: RunConfig, task: Task):
    """The run's tokenizer (`tokenizer_folder`); with `model.tokenizer = "build"`, trained on `task`'s
    training text by process 0 first, when `<run_dir>/tokenizer` has none yet."""
    folder = tokenizer_folder(config)
    if config.model.tokenizer == "build":
        if sharding.is_main_process() and not (Path(folder) / "tokenizer.json").exists():
            train_tokenizer_on_task(task, config, folder)
        sharding.sync("tokenizer")
    return load_tokenizer(folder, "model.tokenizer" if config.model.tokenizer else "model.path")


def model_from_config(model_cfg: ModelSection, mesh, tokenizer=None, *, seed: int = 0, path: str = ""):
    """The model of `model_cfg` (the `model` section) on `mesh`: loaded from `path` (default `model.path`;
    "smollm2" names the built-in checkpoint), or randomly initialised from `model.random` with `seed`,
    sized for `tokenizer`. Weights in `model.param_dtype`, compute in `model.compute_dtype`.

    With adapters (`model.lora.rank` > 0, or `path` a PEFT adapter folder such as a LoRA run's output), the
    base model (`model.path`, the adapter's own base when that is the folder, or random) carries them:
    the folder's, `model.lora.init_from`'s, or new ones from `seed`, the base stored as
    `model.lora.quantize` says."""
    from aft_jax.io.peft import is_adapter_dir, read_adapter, read_adapter_config
    from aft_jax.model.adapters import with_adapters

    path = path or model_cfg.path
    lora, adapter = model_cfg.lora.lora_config(), model_cfg.lora.init_from
    if is_adapter_dir(path):
        adapter, path = path, model_cfg.path
        if path == adapter:
            path = read_adapter_config(adapter)[1]
            if not path:
                raise ConfigError(
                    f"model.path={adapter!r} is an adapter whose adapter_config.json names no base model: set "
                    "model.path to its base (empty for a random one) and model.lora.init_from to the adapter"
                )
    base = _base_model(model_cfg, mesh, tokenizer, seed, path)
    if not adapter and lora is None:
        return base
    adapters = None
    if adapter:
        lora, adapters = read_adapter(adapter, base.config, model_cfg.lora.quantize)
    return with_adapters(base, lora, seed=seed, adapters=adapters, mesh=mesh)


def base_model_name(model_cfg: ModelSection) -> str:
    """The name of the base model under `model.path` (the adapter's base when it is an adapter folder)."""
    from aft_jax.io.peft import is_adapter_dir, read_adapter_config

    return read_adapter_config(model_cfg.path)[1] if is_adapter_dir(model_cfg.path) else model_cfg.path


def _base_model(model_cfg: ModelSection, mesh, tokenizer, seed: int, path: str):
    import jax

    from aft_jax.io.hf import from_pretrained
    from aft_jax.model.causal_lm import create_model

    if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU; JAX's backend is {jax.default_backend()!r}")
    if model_cfg.attention == "pallas" and jax.default_backend() != "tpu":
        logging.getLogger(__name__).warning(
            "model.attention='pallas' on %r: the packed-attention kernel runs in Pallas interpret mode here "
            "(correct, for tests; far slower than xla)",
            jax.default_backend(),
        )
    if path:
        model, _ = from_pretrained(
            resolve_model_path(path),
            dtype=model_cfg.param_dtype,
            compute_dtype=model_cfg.compute_dtype,
            mesh=mesh,
            remat_policy=model_cfg.remat_policy,
            attention=model_cfg.attention,
        )
        return model
    config = ModelConfig(
        vocab_size=len(tokenizer),
        **dataclasses.asdict(model_cfg.random),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        param_dtype=model_cfg.param_dtype,
        dtype=model_cfg.compute_dtype,
        remat_policy=model_cfg.remat_policy,
        attention=model_cfg.attention,
    )
    return create_model(config, mesh=mesh, seed=seed)


def sampler_and_scorer(model, tokenizer, config: RunConfig, batch_size: int) -> tuple[JaxSampler, Scorer]:
    """The `JaxSampler` of `model` (`batch_size` rows: `sample.batch_size` for step 2, `eval.batch_size` for
    evaluation; `sample.rows_per_prompt` rows per prompt) and its `Scorer` (the `data` section's layout,
    `batch_size` sequences' worth per call). A model with adapters is merged first when
    `model.lora.merge_for_sampling` is set and its base is not quantized."""
    from aft_jax.sampling.sampler import JaxSampler
    from aft_jax.stages.score import Scorer

    lora = model.config.lora
    if lora and lora.quantize == "none" and config.model.lora.merge_for_sampling:
        from aft_jax.model.adapters import merge_adapters

        model = merge_adapters(model)
    d = config.data
    sampler = JaxSampler(model, tokenizer, batch_size=batch_size, rows_per_prompt=config.sample.rows_per_prompt)
    return sampler, Scorer(model, tokenizer, d.max_length, batch_size, d.layout, d.tokens_per_row)


@dataclasses.dataclass
class Context:
    """What the stages of one command or pipeline run share, built once from its config: the `task`, and
    when first used the training `mesh` (`train.mesh`, over every process's devices), this process's
    `sampling_mesh` (`sample.mesh` over its own devices: each process samples its own shards) and the
    `tokenizer`."""

    config: RunConfig
    task: Task

    @classmethod
    def of(cls, config: RunConfig) -> Context:
        return cls(config, task_from_config(config))

    @functools.cached_property
    def mesh(self):
        return sharding.make_mesh(self.config.train.mesh, name="train.mesh")

    @functools.cached_property
    def sampling_mesh(self):
        import jax

        return sharding.make_mesh(self.config.sample.mesh, jax.local_devices(), name="sample.mesh")

    @functools.cached_property
    def tokenizer(self):
        return tokenizer_from_config(self.config, self.task)

    def examples(self, split: str, limit: int = 0) -> list[Example]:
        return load_examples(self.task, self.config.task, split, limit)

    def model(self, mesh=None, path: str = ""):
        """The run's model (`model_from_config`) from `path` (default `model.path`, else random with the
        run's seed), on `mesh` (default the training mesh)."""
        return model_from_config(
            self.config.model, self.mesh if mesh is None else mesh, self.tokenizer, seed=self.config.seed, path=path
        )

    def training_groups(self, train_file: str | tuple[str, ...], method: str) -> list[Group]:
        """`train_file` (candidate groups, or VFT pairs; several files: their groups one after the other) if
        set; else, for VFT, the task's training split with its references (`stages.train.reference_groups`)."""
        from aft_jax.config.spec import RunConfigError
        from aft_jax.data.groups import read_training_file
        from aft_jax.method.registry import get_method
        from aft_jax.stages.train import reference_groups

        files = [f for f in ((train_file,) if isinstance(train_file, str) else train_file) if f]
        if files:
            return [group for f in files for group in read_training_file(f)]
        if get_method(method).needs_groups:
            raise RunConfigError(
                f"loss.method={method!r} trains on candidate groups: set data.train_file to the output of "
                "`aft-jax sample`"
            )
        t = self.config.task
        if not self.task.has_references:
            from aft_jax.errors import SettingError

            raise SettingError(
                f"task.fields.rationale is empty and task.without_rationale={t.without_rationale!r}: the task has no "
                "reference chains of thought for VFT to train on; set task.without_rationale=sampled (`aft-jax vft` "
                "and the pipeline), or data.train_file to a VFT pairs file (the pipeline with 'skip' uses the "
                "starting model as the VFT model)"
            )
        return reference_groups(self.task, self.examples(t.train_split), t.template, self.tokenizer)

    def batcher(self, train_file: str | tuple[str, ...], method: str, model_config: ModelConfig) -> GroupBatcher:
        """`stages.train.make_batcher` of `training_groups(train_file, method)` on the training mesh, with the
        run's `data` section, `train.batch_size`, `train.grad_accum` and seed, and the layout cost of the model
        it trains (`model_config`) on this backend."""
        import jax

        from aft_jax.data.layout_cost import layout_cost
        from aft_jax.model.attention import resolve_impl
        from aft_jax.stages.train import make_batcher

        c, t, m = self.config, self.config.train, model_config
        attention = resolve_impl(m.attention, m.dtype, m.head_dim, packed=True)
        return make_batcher(
            self.training_groups(train_file, method), self.tokenizer, self.mesh, data=c.data, method=method,
            batch_size=t.batch_size, grad_accum=t.grad_accum, seed=c.seed,
            cost=layout_cost(m, jax.default_backend(), attention),
            source=(train_file if isinstance(train_file, str) else ", ".join(train_file))
            or f"task {self.task.name} split {c.task.train_split!r}",
        )  # fmt: skip
