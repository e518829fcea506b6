"""From a run config to live objects: the mesh, and the model with its tokenizer."""

from __future__ import annotations

from aft_jax.parallel import sharding
from aft_jax.model.config import LlamaConfig


def mesh_from_config(spec: str, devices=None):
    """A preset name (`fsdp`, `data`, ...) or comma-separated `data,fsdp,tensor` sizes (one may be -1),
    over `devices` (default: every device of every process)."""
    if "," in spec:
        return sharding.make_mesh(tuple(int(x) for x in spec.split(",")), devices)
    return sharding.make_mesh(spec, devices)


def sampling_mesh(config):
    """`sample.mesh` over this process's devices: each process samples its own shards."""
    import jax

    return mesh_from_config(config.sample.mesh, jax.local_devices())


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


def with_built_tokenizer(config):
    """`config` itself, or, when `model.tokenizer = "build"`, a copy that names `<run_dir>/tokenizer`: a
    tokenizer trained on the task's training text, by process 0 when that folder has none yet."""
    if config.model.tokenizer != "build":
        return config
    from aft_jax.io.paths import Path
    from aft_jax.data.task_tokenizer import train_for_config

    folder = Path(config.run_dir) / "tokenizer"
    if sharding.is_main_process() and not (folder / "tokenizer.json").exists():
        train_for_config(config, folder)
    sharding.sync("tokenizer")
    config = config.copy_and_resolve_references()
    config.model.tokenizer = str(folder)
    return config


def model_from_config(model_cfg, mesh, seed: int = 0):
    """`(model, tokenizer)`: loaded from `model.path` ("smollm2" names the built-in checkpoint), or randomly
    initialised from `model.random`."""
    from aft_jax.io.hf import from_pretrained
    from aft_jax.model.llama import create_model

    if model_cfg.path:
        model, tokenizer = from_pretrained(
            resolve_model_path(model_cfg.path),
            dtype=model_cfg.dtype,
            compute_dtype=model_cfg.compute_dtype,
            mesh=mesh,
            remat_policy=model_cfg.remat_policy,
        )
        if model_cfg.tokenizer:
            tokenizer = load_tokenizer(model_cfg.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{model_cfg.path} has no tokenizer files; set model.tokenizer")
        return model, tokenizer
    if not model_cfg.tokenizer or not model_cfg.random.num_layers:
        raise ValueError("set model.path, or model.tokenizer and model.random.* for a randomly initialised model")
    tokenizer = load_tokenizer(model_cfg.tokenizer)
    dims = dict(model_cfg.random)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **dims,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=(tokenizer.eos_token_id,),
        pad_token_id=tokenizer.pad_token_id,
        param_dtype=model_cfg.dtype,
        dtype=model_cfg.compute_dtype,
        remat_policy=model_cfg.remat_policy,
    )
    return create_model(config, mesh=mesh, seed=seed), tokenizer
