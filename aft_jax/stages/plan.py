"""`aft-jax plan`: per-device memory of the AFT train step, from XLA's memory analysis of an
ahead-of-time compilation on simulated devices with abstract shapes (no weights are loaded or created).

The mesh needs that many devices: on a CPU, `plan` asks XLA for `--devices` host devices (set before the
backend starts). Parameters and optimizer state are counted per device from their shardings; the
activations and temporaries are XLA's `temp_size` for the compiled step.
"""

from __future__ import annotations

import dataclasses
import math
import os

from aft_jax.model.config import LlamaConfig

# Configs of models users name by hub id, so a plan needs no download.
_LLAMA_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rms_norm_eps=1e-5,
)
KNOWN_MODELS = {
    "huggyllama/llama-7b": {**_LLAMA_7B, "rms_norm_eps": 1e-6},
    "meta-llama/Llama-2-7b-hf": _LLAMA_7B,
    "meta-llama/Llama-2-13b-hf": {
        **_LLAMA_7B,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_layers": 40,
        "num_heads": 40,
        "num_kv_heads": 40,
    },
}
HBM_GB = {"v4": 32, "v5e": 16, "v5p": 95, "h100": 80, "h200": 141, "cpu": 0}


def request_host_devices(count: int) -> None:
    """Asks XLA's CPU backend for `count` devices; must run before JAX starts its backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_config(config) -> LlamaConfig:
    """The model's shape from a known hub id, an HF/aft_jax folder's config.json, or `model.random`."""
    from aft_jax.io.hf_files import read_config
    from aft_jax.build import resolve_model_path

    m = config.model
    common = dict(param_dtype=m.dtype, dtype=m.compute_dtype, remat_policy=m.remat_policy)
    if m.path in KNOWN_MODELS:
        return LlamaConfig(**KNOWN_MODELS[m.path], **common)
    if m.path:
        from pathlib import Path

        path = Path(resolve_model_path(m.path))
        return LlamaConfig.from_hf_config(read_config(path), source=str(path / "config.json"), **common)
    from aft_jax.build import load_tokenizer

    vocab = 384 if m.tokenizer == "build" else len(load_tokenizer(m.tokenizer))  # task_tokenizer's default
    return LlamaConfig(vocab_size=vocab, **dict(m.random), tie_word_embeddings=True, **common)


@dataclasses.dataclass
class MemoryPlan:
    devices: int
    mesh: str
    params_gb: float
    optimizer_gb: float
    temporaries_gb: float
    total_gb: float
    compile_s: float


def plan_memory(config, batch_size: int | None = None, seq_len: int | None = None) -> MemoryPlan:
    """Compiles the train step for `config` on its mesh with abstract inputs and reads per-device memory."""
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from aft_jax.parallel import sharding
    from aft_jax.model.llama import abstract_model
    from aft_jax.build import mesh_from_config
    from aft_jax.stages.train import TrainState, build_optimizer, make_train_step

    mesh = mesh_from_config(config.train.mesh)
    b = batch_size or config.train.batch_size
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if b % (config.train.grad_accum * data_ways):
        raise ValueError(
            f"batch {b} must be a multiple of grad_accum x data x fsdp = "
            f"{config.train.grad_accum} x {data_ways}: every device needs whole groups"
        )
    cfg = model_config(config)
    graphdef, abstract_state = nnx.split(abstract_model(cfg))
    param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, mesh))
    params = jax.tree.map(
        lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
        nnx.to_pure_dict(abstract_state),
        param_shardings,
    )
    tx, schedule = build_optimizer(config.optim, total_steps=1000)
    replicated = sharding.replicated(mesh)
    abstract_opt = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_opt,
        sharding.shardings_like_params(abstract_opt, params, mesh),
    )
    state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        opt_state,
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    k = 1 if config.loss.method == "vft" else config.data.group_size
    t = seq_len or config.data.max_length
    batch_shapes = {
        "input_ids": ((b, k, t), jnp.int32),
        "attention_mask": ((b, k, t), jnp.int32),
        "completion_mask": ((b, k, t), jnp.int32),
        "valid": ((b, k), bool),
        "is_pos": ((b, k), bool),
        "is_neg": ((b, k), bool),
        "is_reference": ((b, k), bool),
        "levels": ((b, k), jnp.int32),
        "ref_logp_sum": ((b, k), jnp.float32),
    }
    batch = {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in batch_shapes.items()
    }
    step = make_train_step(graphdef, config.loss, tx, schedule, config.train.grad_accum)
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    began = time.perf_counter()
    with sharding.use_mesh(mesh):
        compiled = (
            jax.jit(
                step,
                in_shardings=(state_shardings, sharding.batch_sharding(mesh, 1)),
                out_shardings=(state_shardings, replicated),
                donate_argnums=(0,),
            )
            .lower(state, batch)
            .compile()
        )
    seconds = time.perf_counter() - began
    analysis = compiled.memory_analysis()

    def per_device(tree) -> float:
        return sum(
            math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
        )

    gb = 1024**3
    params_b, opt_b = per_device(params), per_device(opt_state)
    temp_b = float(getattr(analysis, "temp_size_in_bytes", 0))
    return MemoryPlan(
        devices=mesh.devices.size,
        mesh=sharding.describe(mesh),
        params_gb=params_b / gb,
        optimizer_gb=opt_b / gb,
        temporaries_gb=temp_b / gb,
        total_gb=(params_b + opt_b + temp_b) / gb,
        compile_s=seconds,
    )


def recommend(plan: MemoryPlan, hbm_gb: float, config) -> str:
    if not hbm_gb:
        return "no HBM size given (--hbm-gb or --chip): nothing to compare against"
    if plan.total_gb <= 0.85 * hbm_gb:
        return f"fits: {plan.total_gb:.1f} of {hbm_gb} GB per device ({100 * plan.total_gb / hbm_gb:.0f}%)"
    advice = []
    if config.model.remat_policy != "full":
        advice.append("model.remat_policy=full (keeps only each layer's input for the backward pass)")
    devices = plan.devices
    if config.train.batch_size % (2 * config.train.grad_accum * devices) == 0:
        advice.append(f"train.grad_accum={2 * config.train.grad_accum} (half the micro-batch)")
    if plan.params_gb + plan.optimizer_gb > 0.5 * hbm_gb:
        advice.append("more devices on the fsdp axis (parameters and optimizer state are split over it)")
    return f"does not fit: {plan.total_gb:.1f} GB per device > 85% of {hbm_gb} GB; try " + "; ".join(advice)
