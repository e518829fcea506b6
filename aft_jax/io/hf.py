"""Hugging Face <-> aft_jax: load a checkpoint folder (or hub name) into sharded weights, and export back.

Loading streams tensor by tensor: every device shard of every parameter is filled by a callback that
reads only the HF tensors it needs, so the model never exists whole in host memory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from aft_jax.io import paths
from aft_jax.io.hf_files import (
    CheckpointError,
    TensorReader,
    read_config,
    read_generation_config,
    resolve_checkpoint_dir,
)
from aft_jax.model.causal_lm import CausalLM, abstract_model
from aft_jax.model.config import ModelConfig
from aft_jax.model.families import config_from_hf, config_to_hf, eos_ids, family_of
from aft_jax.model.hf_weights import IGNORED_SUFFIXES, WeightSpec, hf_names
from aft_jax.parallel import sharding

log = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def from_pretrained(
    path_or_name: str | os.PathLike,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    mesh=None,
    revision: str | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **config_overrides,
) -> tuple[CausalLM, Any]:
    """Loads `(model, tokenizer)` from a HF checkpoint folder, an aft_jax model folder, or a hub name, of
    any family in `aft_jax.model.families`. The EOS ids are config.json's and generation_config.json's
    (an instruct model's `<|im_end|>` and its base's `<|endoftext|>`, say): sampling stops at any of them.

    `dtype` is the parameter dtype, `compute_dtype` the activation dtype (defaults to `dtype`); weights
    are placed directly into their shardings on `mesh` (one device when None). The tokenizer is None
    when the folder has no tokenizer files.
    """
    with _checkpoint_folder(path_or_name, revision) as (directory, origin):
        config = config_from_hf(
            read_config(directory),
            source=str(directory / "config.json"),
            param_dtype=dtype,
            dtype=compute_dtype or dtype,
            **config_overrides,
        )
        generation_eos = eos_ids(read_generation_config(directory).get("eos_token_id"))
        config = config.replace(eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + generation_eos)))
        mesh = mesh or sharding.single_device_mesh()
        from aft_jax.io import checkpoint  # Orbax is imported only when needed

        params = paths.Path(origin) / "params"
        if checkpoint.is_params_dir(params):
            model = checkpoint.restore_model(params, config, mesh)
        else:
            model = load_hf_weights(directory, config, mesh, allow_pickle=allow_pickle)
        return model, load_tokenizer(directory, trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _checkpoint_folder(path_or_name, revision):
    """`(local folder with the checkpoint's files, where an Orbax params/ would be)`. For a URI
    (gs://...) the files other than params/ are fetched into a temporary folder; Orbax reads params/
    where it is."""
    if paths.is_remote(path_or_name):
        with paths.fetched_dir(path_or_name, skip=("params",)) as local:
            yield Path(local), path_or_name
    else:
        directory = resolve_checkpoint_dir(path_or_name, revision)
        yield directory, directory


def load_tokenizer(directory: Path, *, trust_remote_code: bool = False):
    if not any((directory / name).exists() for name in TOKENIZER_FILES):
        log.warning("%s has no tokenizer files; returning tokenizer=None", directory)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)


def load_hf_weights(directory: Path, config: ModelConfig, mesh, *, allow_pickle: bool = False, rules=None) -> CausalLM:
    """Reads HF tensors straight into the shardings of a fresh abstract model (no full host copy)."""
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)
    specs = family_of(config).weight_specs(config)
    with TensorReader(directory, allow_pickle=allow_pickle) as reader:
        check_tensors(reader, specs, config)
        arrays = {spec.path: _load_param(reader, spec, config, shardings) for spec in specs}
    state = jax.tree.map_with_path(
        lambda path, v: v.replace(arrays[_path(path)]), abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.merge(graphdef, state)


def check_tensors(reader: TensorReader, specs: list[WeightSpec], config: ModelConfig) -> None:
    """Raises one CheckpointError listing every missing or wrongly shaped tensor (with its file)."""
    problems = []
    present = set(reader.names())
    for spec in specs:
        for name in hf_names(spec, config):
            if name not in present:
                problems.append(f"missing tensor {name!r} (expected shape {list(spec.hf_shape)})")
            elif reader.shape(name) != spec.hf_shape:
                problems.append(
                    f"{reader.file_of(name).name}: tensor {name!r} has shape "
                    f"{list(reader.shape(name))}, expected {list(spec.hf_shape)} from config.json"
                )
    if problems:
        raise CheckpointError(f"{reader.directory}: " + "; ".join(problems))
    expected = {n for spec in specs for n in hf_names(spec, config)}
    extra = [
        n
        for n in present - expected
        if not n.endswith(IGNORED_SUFFIXES) and not (config.tie_word_embeddings and n == "lm_head.weight")
    ]
    if extra:
        log.warning("%s: ignoring %d unexpected tensor(s): %s", reader.directory, len(extra), sorted(extra)[:5])


def _load_param(reader: TensorReader, spec: WeightSpec, config: ModelConfig, shardings) -> jax.Array:
    target = _get(shardings, spec.path)
    dtype = np.dtype(jnp.dtype(config.param_dtype))
    names = hf_names(spec, config)

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        if spec.stacked:
            layers = range(config.num_layers)[index[0]]
            return np.stack([spec.to_ours(reader.read(names[i]))[index[1:]].astype(dtype) for i in layers])
        return np.ascontiguousarray(spec.to_ours(reader.read(names[0]))[index].astype(dtype))

    shape = (
        (config.num_layers, *spec.to_ours(np.empty(spec.hf_shape, np.int8)).shape)
        if spec.stacked
        else spec.to_ours(np.empty(spec.hf_shape, np.int8)).shape
    )
    return jax.make_array_from_callback(tuple(shape), target.get_value(), shard)


def save_pretrained(
    model: CausalLM,
    tokenizer,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Writes safetensors (sharded with an index when large), config.json and the tokenizer files.

    Tensors are gathered one layer at a time. Files are written to a temporary folder first and moved
    into `out_dir` at the end, so an interrupted export never leaves a half-written checkpoint. A model
    with adapters is written merged (`aft_jax.model.adapters.merge_adapters`).
    """
    if model.config.lora is not None:
        from aft_jax.model.adapters import merge_adapters

        model = merge_adapters(model)
    config: ModelConfig = model.config
    if paths.is_remote(out_dir):  # e.g. gs://: written locally, then uploaded file by file
        with tempfile.TemporaryDirectory(prefix="aft_jax_export_") as local:
            save_pretrained(model, tokenizer, local, dtype=dtype, max_shard_bytes=max_shard_bytes)
            paths.copy_tree(local, out_dir)
        return paths.Path(out_dir)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    out_dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    params = nnx.state(model, nnx.Param)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp") as tmp:
        tmp_dir = Path(tmp)
        _write_shards(_hf_tensors(params, config, out_dtype), tmp_dir, max_shard_bytes)
        hf_config = config_to_hf(config) | {"torch_dtype": str(jnp.dtype(out_dtype))}
        (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        (tmp_dir / "generation_config.json").write_text(
            json.dumps(
                {
                    "bos_token_id": config.bos_token_id,
                    "eos_token_id": hf_config["eos_token_id"],
                    "pad_token_id": config.pad_token_id,
                },
                indent=2,
            )
            + "\n"
        )
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp_dir))
        out_dir.mkdir(exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
            stale.unlink()
        for file in tmp_dir.iterdir():
            os.replace(file, out_dir / file.name)
    return out_dir


def _hf_tensors(params: nnx.State, config: ModelConfig, dtype: np.dtype):
    """Yields (HF name, array) in HF order, gathering one layer of one parameter at a time."""
    specs = family_of(config).weight_specs(config)
    per_layer = [s for s in specs if s.stacked]
    top = {s.path[0]: s for s in specs if not s.stacked}
    yield top["embed"].hf_name, np.asarray(jax.device_get(_get(params, ("embed",))[...])).astype(dtype)
    for i in range(config.num_layers):
        for spec in per_layer:
            layer_i = np.asarray(jax.device_get(_get(params, spec.path)[i]))
            yield spec.hf_name.format(i=i), np.ascontiguousarray(spec.to_hf(layer_i).astype(dtype))
    for key in ("final_norm", "lm_head"):
        if key in top:
            spec = top[key]
            value = np.asarray(jax.device_get(_get(params, spec.path)[...]))
            yield spec.hf_name, np.ascontiguousarray(spec.to_hf(value).astype(dtype))


def _write_shards(tensors, out_dir: Path, max_shard_bytes: int) -> None:
    """Streams (name, array) pairs into safetensors files of at most `max_shard_bytes` (HF naming)."""
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        path = out_dir / f"shard-{len(written):05d}.safetensors"
        save_file(current, str(path), metadata={"format": "pt"})
        written.append((path, list(current)))
        current.clear()

    for name, array in tensors:
        if current and size + array.nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = array
        size += array.nbytes
        total += array.nbytes
    flush()
    if len(written) == 1:
        os.replace(written[0][0], out_dir / "model.safetensors")
        return
    weight_map = {}
    for k, (path, names) in enumerate(written, start=1):
        final = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, out_dir / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _path(key_path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def _get(state, path: tuple[str, ...]):
    for key in path:
        state = state[key]
    return state
