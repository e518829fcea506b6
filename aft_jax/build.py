"""From a run config to live objects: the sampling mesh, the task and its examples, the tokenizer (loaded or
trained on the task) and the model."""

from __future__ import annotations

import dataclasses

from aft_jax.data.tasks import Example, Task, get_task
from aft_jax.io.paths import Path
from aft_jax.model.config import ConfigError, ModelConfig
from aft_jax.parallel import sharding


def sampling_mesh(config):
    """`sample.mesh` over this process's devices: each process samples its own shards."""
    import jax

    return sharding.make_mesh(config.sample.mesh, jax.local_devices())


def resolve_model_path(name: str) -> str:
    """ "smollm2" names the built-in SmolLM2-135M checkpoint; anything else is a folder or hub name."""
    if name == "smollm2":
        from aft_jax.io.smollm2 import smollm2_checkpoint

        return str(smollm2_checkpoint())
    return name


def load_tokenizer(name: str):
    """A tokenizer from a folder (a local one or a URI such as gs://...), a hub name, or "smollm2"."""
    from transformers import AutoTokenizer

    from aft_jax.io.paths import fetched_dir

    with fetched_dir(resolve_model_path(name), skip=("params",)) as local:
        return AutoTokenizer.from_pretrained(local)


def with_built_tokenizer(config, task: Task):
    """`config` itself, or, when `model.tokenizer = "build"`, a copy that names `<run_dir>/tokenizer`: a
    tokenizer trained on `task`'s training text, by process 0 when that folder has none yet."""
    if config.model.tokenizer != "build":
        return config
    folder = Path(config.run_dir) / "tokenizer"
    if sharding.is_main_process() and not (folder / "tokenizer.json").exists():
        train_tokenizer_on_task(task, config, folder)
    sharding.sync("tokenizer")
    return config.replace(model={"tokenizer": str(folder)})


def task_from_config(config) -> Task:
    """The task of `task.name`, the synthetic one generated with its configured sizes and the run's seed.
    Called once, at an entry point (command, pipeline, study); the stages receive the Task."""
    if config.task.name == "synthetic":
        t = config.task
        return get_task(
            "synthetic",
            num_train=t.synthetic_train,
            num_validation=t.synthetic_validation,
            num_test=t.synthetic_test,
            seed=config.seed,
        )
    return get_task(config.task.name)


def load_examples(task: Task, task_cfg, split: str) -> list[Example]:
    """A split of `task`, read from `task_cfg.data_dir` (the `task` section); the training split is cut to
    `task_cfg.limit` questions when that is positive."""
    limit = task_cfg.limit if task_cfg.limit > 0 and split == task_cfg.train_split else None
    return task.load(split, data_dir=task_cfg.data_dir or None, limit=limit)


def train_tokenizer_on_task(task: Task, config, out_dir: str | Path):
    """`train_task_tokenizer` (`model.build_vocab_size` tokens at most) on the prompt (`task.template`) and
    target of every training question."""
    from aft_jax.data.task_tokenizer import train_task_tokenizer

    examples = load_examples(task, config.task, config.task.train_split)
    texts = [task.prompt(e, config.task.template) + e.target for e in examples]
    return train_task_tokenizer(texts, out_dir, vocab_size=config.model.build_vocab_size)


def model_from_config(model_cfg, mesh, seed: int = 0):
    """`(model, tokenizer)`: loaded from `model.path` ("smollm2" names the built-in checkpoint), or randomly
    initialised from `model.random`."""
    import jax

    from aft_jax.io.hf import from_pretrained
    from aft_jax.model.causal_lm import create_model

    if model_cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU; JAX's backend is {jax.default_backend()!r}")
    if model_cfg.path:
        model, tokenizer = from_pretrained(
            resolve_model_path(model_cfg.path),
            dtype=model_cfg.dtype,
            compute_dtype=model_cfg.compute_dtype,
            mesh=mesh,
            remat_policy=model_cfg.remat_policy,
            attention=model_cfg.attention,
        )
        if model_cfg.tokenizer:
            tokenizer = load_tokenizer(model_cfg.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{model_cfg.path} has no tokenizer files; set model.tokenizer")
        return model, tokenizer
    if not model_cfg.tokenizer or not model_cfg.random.num_layers:
        raise ValueError("set model.path, or model.tokenizer and model.random.* for a randomly initialised model")
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    dims = dataclasses.asdict(model_cfg.random)
    config = ModelConfig(
        vocab_size=len(tokenizer),
        **dims,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        param_dtype=model_cfg.dtype,
        dtype=model_cfg.compute_dtype,
        remat_policy=model_cfg.remat_policy,
        attention=model_cfg.attention,
    )
    return create_model(config, mesh=mesh, seed=seed), tokenizer
