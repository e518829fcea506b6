"""Orbax checkpoints of model parameters. The only module that calls Orbax.

An aft_jax model folder holds `config.json` (HF layout), the tokenizer files and `params/` (Orbax);
`from_pretrained` loads it like a HF folder, restoring each array directly into its sharding.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from aft_jax import sharding
from aft_jax.config import LlamaConfig
from aft_jax.model import Llama, abstract_model


def is_params_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def save_params(path: str | Path, model: Llama) -> Path:
    """Writes the model's parameters as an Orbax checkpoint at `path` (which must not exist)."""
    path = Path(path).absolute()
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, state)
        checkpointer.wait_until_finished()
    return path


def restore_model(path: str | Path, config: LlamaConfig, mesh, rules=None) -> Llama:
    """Restores parameters saved by `save_params` straight into their shardings on `mesh`."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    target = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                          nnx.to_pure_dict(abstract_state), nnx.to_pure_dict(shardings))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(Path(path).absolute(), target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)
