"""Hugging Face PEFT LoRA adapter folders <-> aft_jax adapters.

A folder holds `adapter_config.json` and `adapter_model.safetensors`, tensors named as PEFT saves them,
`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` `[r, in]` and `...lora_B.weight`
`[out, r]` (a `nn.Linear`'s layout); aft_jax's stacked `A` `[L, *in, r]` and `B` `[L, r, *out]`
(`aft_jax.model.lora`) flatten to them with the heads' order kept (`in = h * Dh + k`). Only plain LoRA is
read: no DoRA, rsLoRA, biases, per-module ranks or saved modules.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np

from aft_jax.io import paths
from aft_jax.io.hf_files import CheckpointError, TensorReader
from aft_jax.model.config import LORA_TARGETS, LoraConfig, ModelConfig
from aft_jax.model.lora import PROJECTIONS
from aft_jax.parallel import sharding

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
HF_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
PREFIX = "base_model.model.model.layers.{i}."
# adapter_config.json keys whose non-default values aft_jax does not implement: key -> default
UNSUPPORTED = {"use_dora": False, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
               "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}  # fmt: skip
# more such keys, of newer PEFT versions (0.14 on): checked on reading, not written (older versions lack them)
UNSUPPORTED_NEWER = {"lora_bias": False, "use_qalora": False, "alora_invocation_tokens": None,
                     "layer_replication": None, "trainable_token_indices": None, "target_parameters": None,
                     "arrow_config": None, "kasa_config": None}  # fmt: skip


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return bool(path) and (paths.Path(path) / CONFIG_FILE).exists()


def _modules(targets) -> list[str]:
    """PEFT's `target_modules` of aft_jax's `targets`."""
    return [HF_MODULES[t].split(".")[-1] for t in targets]


def tensor_names(target: str, layer: int) -> tuple[str, str]:
    """PEFT's names of layer `layer`'s `A` and `B` of projection `target`."""
    stem = PREFIX.format(i=layer) + HF_MODULES[target]
    return stem + ".lora_A.weight", stem + ".lora_B.weight"


def save_adapter(model, out_dir: str | os.PathLike, *, base_name: str = "", tokenizer=None) -> Path:
    """Writes `model`'s adapters as a PEFT folder at `out_dir` (with `tokenizer`'s files when given); the
    weights file is written last, so its presence marks the folder complete. With several processes every
    one calls it (the adapters are gathered) and process 0 writes."""
    from safetensors.numpy import save_file

    from aft_jax.model.adapters import adapter_arrays

    lora = model.config.lora
    if lora is None:
        raise ValueError("the model has no adapters (model.lora.rank = 0): nothing to write as a PEFT adapter")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or None,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "target_modules": _modules(lora.targets),
        "inference_mode": True,
        "init_lora_weights": True,
    } | UNSUPPORTED
    tensors = {}
    replicate = jax.jit(lambda x: x, out_shardings=sharding.replicated(sharding.mesh_of(model.embed[...])))
    for target, (a, b) in adapter_arrays(model).items():
        # every process gathers (a collective), process 0 writes
        a, b = (np.asarray(replicate(x).addressable_data(0), np.float32) for x in (a, b))
        for i in range(a.shape[0]):
            name_a, name_b = tensor_names(target, i)
            tensors[name_a] = np.ascontiguousarray(a[i].reshape(-1, lora.rank).T)
            tensors[name_b] = np.ascontiguousarray(b[i].reshape(lora.rank, -1).T)
    if not sharding.is_main_process():
        return paths.Path(out_dir)
    with paths.staged_dir(out_dir) as local:
        if tokenizer is not None:
            tokenizer.save_pretrained(local)
        Path(local, CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, os.path.join(local, WEIGHTS_FILE), metadata={"format": "pt"})
    return paths.Path(out_dir)


def read_adapter_config(folder: str | os.PathLike, quantize: str = "none") -> tuple[LoraConfig, str]:
    """The `LoraConfig` of a PEFT folder (its base stored as `quantize` says) and its base model's name."""
    file = paths.Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: not a readable adapter config ({err})") from err
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: not a readable adapter config (expected a JSON object)")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{file}: peft_type={raw.get('peft_type')!r}; only LORA adapters can be read")
    for key, default in (UNSUPPORTED | UNSUPPORTED_NEWER).items():
        value = raw.get(key, default)
        if value != default and not (value in (None, {}, []) and not default):
            raise CheckpointError(f"{file}: {key}={raw[key]!r} is not supported (expected {default!r})")
    modules = raw.get("target_modules")
    by_module = {m.split(".")[-1]: t for t, m in HF_MODULES.items()}
    if modules == "all-linear":
        modules = list(by_module)
    if not isinstance(modules, list) or any(m not in by_module for m in modules):
        raise CheckpointError(
            f"{file}: target_modules={modules!r}; expected a list among {sorted(by_module)} or 'all-linear'"
        )
    targets = tuple(t for t in LORA_TARGETS if HF_MODULES[t].split(".")[-1] in modules)
    try:
        rank, alpha = int(raw["r"]), float(raw["lora_alpha"])
    except KeyError as err:
        raise CheckpointError(f"{file}: missing key {err}") from None
    return LoraConfig(rank, alpha, targets, quantize), raw.get("base_model_name_or_path") or ""


def read_adapter(folder: str | os.PathLike, config: ModelConfig, quantize: str = "none"):
    """`(LoraConfig, {target: (A, B)})` of a PEFT folder (local or a URI) for a base model of `config`, the
    arrays stacked over layers in aft_jax's shapes; every tensor is checked against the shape `config`
    implies, and a tensor no adapter uses (a DoRA magnitude, a LoRA bias) is refused."""
    lora, _ = read_adapter_config(folder, quantize)
    from aft_jax.model.causal_lm import abstract_model

    layers = abstract_model(config).layers
    adapters = {}
    with paths.fetched_dir(folder) as local, TensorReader(Path(local)) as reader:
        names = set(reader.names())

        def where(tensor: str):  # its file, named as the user gave the folder
            return paths.Path(folder) / reader.file_of(tensor).name

        for target in lora.targets:
            module, name, n_in, _ = PROJECTIONS[target]
            shape = getattr(getattr(layers, module), name).get_value().shape[1:]
            in_shape, out_shape = shape[:n_in], shape[n_in:]
            a_layers, b_layers = [], []
            for i in range(config.num_layers):
                for tensor, want, into, dims in zip(
                    tensor_names(target, i),
                    ((lora.rank, int(np.prod(in_shape))), (int(np.prod(out_shape)), lora.rank)),
                    (a_layers, b_layers),
                    ((*in_shape, lora.rank), (lora.rank, *out_shape)),
                ):
                    if tensor not in names:
                        raise CheckpointError(f"{paths.Path(folder) / WEIGHTS_FILE}: missing tensor {tensor!r}")
                    if reader.shape(tensor) != want:
                        raise CheckpointError(
                            f"{where(tensor)}: tensor {tensor!r} has shape {list(reader.shape(tensor))}; "
                            f"a rank-{lora.rank} adapter of this base model needs {list(want)}"
                        )
                    into.append(np.asarray(reader.read(tensor), np.float32).T.reshape(dims))
                    names.discard(tensor)
            adapters[target] = (np.stack(a_layers), np.stack(b_layers))
        if names:
            extra = sorted(names)
            more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
            raise CheckpointError(
                f"{where(extra[0])}: tensor {extra[0]!r}{more} is no LoRA A or B weight of the target_modules "
                f"{_modules(lora.targets)}; only plain LoRA adapters can be read"
            )
    return lora, adapters
