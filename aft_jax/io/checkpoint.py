"""Orbax checkpoints of model parameters. The only module that calls Orbax.

An aft_jax model folder holds `config.json` (HF layout), the tokenizer files and `params/` (Orbax);
`from_pretrained` loads it like a HF folder, restoring each array directly into its sharding.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp
from flax import nnx

from aft_jax.io import paths
from aft_jax.io.hf_files import CheckpointError, first_line
from aft_jax.model.causal_lm import CausalLM, abstract_model
from aft_jax.model.config import ModelConfig
from aft_jax.model.families import config_to_hf
from aft_jax.parallel import sharding


def is_params_dir(path: str | os.PathLike) -> bool:
    path = paths.Path(path)
    return path.is_dir() and any(path.iterdir())


def save_params(path: str | os.PathLike, model: CausalLM):
    """Writes the model's parameters as an Orbax checkpoint at `path` (which must not exist)."""
    path = paths.for_orbax(path)
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
    return path


def save_model_folder(model: CausalLM, tokenizer, out_dir: str | os.PathLike):
    """An aft_jax model folder: `config.json` (HF layout), the tokenizer files and `params/` (Orbax)."""
    out_dir = paths.Path(out_dir)
    if (out_dir / "params").exists():
        raise FileExistsError(f"{out_dir / 'params'}: already exists; choose an empty destination")
    if sharding.is_main_process():
        with paths.staged_dir(out_dir) as local:
            if tokenizer is not None:
                tokenizer.save_pretrained(local)
            with open(os.path.join(local, "config.json"), "w") as f:
                f.write(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    save_params(out_dir / "params", model)  # every process; last: its presence marks the folder complete
    return out_dir


def restore_model(path: str | os.PathLike, config: ModelConfig, mesh, rules=None) -> CausalLM:
    """Restores parameters saved by `save_params` straight into their shardings on `mesh`."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        nnx.to_pure_dict(shardings),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            restored = checkpointer.restore(paths.for_orbax(path), target)
        except (ValueError, KeyError, OSError) as err:  # Orbax: a missing, partial or differently shaped state
            raise CheckpointError(
                f"{path}: cannot restore these parameters in the shapes of the folder's config.json ({first_line(err)})"
            ) from err
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


class TrainCheckpointer:
    """Asynchronous Orbax `CheckpointManager` for a training run: the train state (params, optimizer,
    step, RNG) and the data iterator's position, every `save_every` steps, keeping the last `keep`.
    A checkpoint becomes visible only once completely written, so a killed run resumes from the last
    complete one."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=save_every, enable_async_checkpointing=async_save, create=True
        )
        self.directory = directory
        self._manager = ocp.CheckpointManager(paths.for_orbax(directory), options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        return self._manager.save(step, args=args, force=force)

    def restore(self, step: int, like_state):
        """Restores into the shapes, dtypes and shardings of `like_state` (arrays or ShapeDtypeStructs)."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
        try:
            restored = self._manager.restore(step, args=args)
        except (ValueError, KeyError, OSError) as err:  # Orbax: a state of other shapes or structure
            raise CheckpointError(
                f"{self.directory}: cannot resume from step {step}: its train state does not match the configured "
                f"model and optimizer ({first_line(err)}); resume with the run's own config, or start a new run_dir"
            ) from err
        return restored["state"], restored["data"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
