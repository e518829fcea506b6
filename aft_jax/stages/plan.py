"""`aft-jax plan`: per-device memory of the AFT train step, from XLA's memory analysis of an
ahead-of-time compilation on simulated devices with abstract shapes (no weights are loaded or created).

The mesh needs that many devices: on a CPU, `plan` asks XLA for `--devices` host devices (set before the
backend starts). Parameters (the trained ones and, for a LoRA model, the frozen and possibly quantized
base) and optimizer state are counted per device from their shardings; the activations and temporaries are
XLA's `temp_size` for the compiled step, less what only XLA:CPU spends (`cpu_upcast_bytes`): having no
bfloat16 matrix product, it multiplies in float32 and converts each bfloat16 (or float16) weight it
multiplies to a float32 copy, hoisted out of the layer loop, so the copies of every layer's weights are
held for the whole step (twice a bfloat16 base's bytes: e.g. 25 GB for a 7B LoRA base on one device). TPUs
and GPUs multiply bfloat16 directly.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from aft_jax.config.spec import RunConfig
from aft_jax.errors import SettingError
from aft_jax.model.config import ModelConfig, RopeScaling
from aft_jax.model.families import config_from_hf

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
KNOWN_MODELS: dict[str, dict[str, Any]] = {
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
KNOWN_MODELS["meta-llama/Llama-3.2-1B"] = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
    head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
    max_position_embeddings=131072, tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001,),
)  # fmt: skip
_QWEN = dict(vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, family="qwen2", qkv_bias=True)
KNOWN_MODELS |= {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        **_QWEN, "hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2,
        "head_dim": 64, "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        **_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-7B-Instruct": {
        **_QWEN, "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_layers": 28,
        "num_heads": 28, "num_kv_heads": 4,
    },
    "Qwen/Qwen3-8B": {
        **_QWEN, "family": "qwen3", "qkv_bias": False, "qk_norm": True, "hidden_size": 4096,
        "intermediate_size": 12288, "num_layers": 36, "num_heads": 32, "num_kv_heads": 8,
    },
}  # fmt: skip
# GB of accelerator memory per device; "l4" stands for any 24 GB GPU (NVIDIA L4, A10G, RTX 4090, RTX 3090).
HBM_GB = {"v4": 32, "v5e": 16, "v5p": 95, "h100": 80, "h200": 141, "l4": 24, "cpu": 0}


def request_host_devices(count: int) -> None:
    """Asks XLA's CPU backend for `count` devices; must run before JAX starts its backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={count}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def model_config(config: RunConfig) -> ModelConfig:
    """The model's shape from a known hub id, an HF/aft_jax folder's config.json, or `model.random`, with
    the adapters of `model.lora` (`LoraConfig`, None at rank 0)."""
    from aft_jax.build import resolve_model_path
    from aft_jax.io.hf_files import read_config

    m = config.model
    common: dict[str, Any] = dict(
        param_dtype=m.param_dtype, dtype=m.compute_dtype, remat_policy=m.remat_policy, lora=m.lora.lora_config()
    )
    if m.path in KNOWN_MODELS:
        return ModelConfig(**KNOWN_MODELS[m.path], **common)
    if m.path:
        from pathlib import Path

        path = Path(resolve_model_path(m.path))
        return config_from_hf(read_config(path), source=str(path / "config.json"), **common)
    from aft_jax.build import load_tokenizer

    vocab = m.build_vocab_size if m.tokenizer == "build" else len(load_tokenizer(m.tokenizer))  # at most
    return ModelConfig(vocab_size=vocab, **dataclasses.asdict(m.random), tie_word_embeddings=True, **common)


@dataclasses.dataclass
class MemoryPlan:
    """Per-device memory of one train step, in GiB (1024^3 bytes)."""

    layout: str
    computed_tokens: int  # tokens of the step's token arrays, padding and filler included
    devices: int
    mesh: str
    params_gb: float  # every weight: the trained ones and the frozen base (`frozen_gb` of it)
    optimizer_gb: float  # the trained weights' optimizer state (AdamW: two float32 moments each)
    temporaries_gb: float  # activations and temporaries (XLA's temp_size, less `cpu_upcast_gb`)
    total_gb: float
    compile_s: float
    frozen_gb: float = 0.0  # of params_gb, a LoRA model's frozen (possibly quantized) base; 0: all trained
    trained_params: int = 0  # number of trained weights, all devices together (a LoRA model's adapters)
    cpu_upcast_gb: float = 0.0  # float32 copies of low-precision weights only XLA:CPU makes (not counted above)


_HEADER = re.compile(r"^(ENTRY )?%(\S+) \(")
_LOW_PARAM = re.compile(r"^\s*%(\S+) = (?:bf16|f16)\[([\d,]*)\]\S* parameter\(")
_TO_F32 = re.compile(
    r"^\s*%\S+ = f32\[([\d,]*)\]\S* (convert|fusion)\(%([^,)\s]+)\)(?:, kind=kLoop, calls=%([^,\s]+))?"
)
_CONVERT_ROOT = re.compile(r"^\s*ROOT %\S+ = f32\[[\d,]*\]\S* convert\(%\S+\)")


def cpu_upcast_bytes(hlo: str) -> int:
    """Bytes of the float32 copies of whole bfloat16 / float16 arguments of the step (its weights) in the
    entry computation of optimized HLO `hlo`: a `convert`, or a fusion of one convert, of an argument to
    float32 of the same shape. XLA:CPU makes them to multiply in float32 (see the module docstring)."""
    computations: dict[str, list[str]] = {}
    entry, body = "", None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            body = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            body = None
        elif body is not None and line.strip():
            body.append(line)

    def only_converts(name: str) -> bool:
        lines = computations.get(name, [])
        return len(lines) == 2 and bool(_CONVERT_ROOT.match(lines[1]))

    arguments, total = {}, 0
    for line in computations.get(entry, []):
        argument = _LOW_PARAM.match(line)
        if argument:
            arguments[argument.group(1)] = argument.group(2)
            continue
        upcast = _TO_F32.match(line)
        if upcast and arguments.get(upcast.group(3)) == upcast.group(1):
            if upcast.group(2) == "convert" or only_converts(upcast.group(4) or ""):
                total += 4 * math.prod(int(d) for d in upcast.group(1).split(",") if d)
    return total


def planned_batch(config: RunConfig, mesh, batch_size: int, seq_len: int, prompt_len: int) -> dict[str, Any]:
    """Abstract batch of `batch_size` groups of K candidates of `seq_len` tokens each (`prompt_len` of them the
    shared prompt), in `data.layout`: padded `[B, K, seq_len]`, or packed rows as the batcher packs them."""
    from aft_jax.data import packing
    from aft_jax.method.registry import get_method
    from aft_jax.stages.program import batch_spec

    k = config.data.group_size if get_method(config.loss.method).needs_groups else 1
    if config.data.layout == "padded":
        return batch_spec(mesh, batch_size, k, seq_len)
    if not 0 < prompt_len < seq_len:
        raise SettingError(
            f"--prompt-len={prompt_len}: expected a prompt length in (0, {seq_len}), {seq_len} being the sequence "
            "length (--seq-len, or data.max_length)"
        )
    budget, accum = config.data.tokens_per_row, config.train.grad_accum
    pieces = packing.group_pieces([[0] * seq_len] * k, prompt_len, budget)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    lengths = [[p.length for _ in unit for p in pieces] for unit in packing.batch_units(batch_size, shards, accum)]
    rows_per_unit, length = packing.unit_rows(lengths, budget, config.data.pad_multiple)
    return batch_spec(mesh, batch_size, k, length, rows=shards * accum * rows_per_unit)


def planned_program(
    config: RunConfig,
    batch_size: int | None = None,
    seq_len: int | None = None,
    prompt_len: int | None = None,
    batch: dict[str, Any] | None = None,
):
    """`(program, lowered)`: the training program of `config` (`stages.program`, as training builds it) and
    its step lowered for an abstract state and `batch`, by default `planned_batch` (`train.batch_size`
    groups, `data.max_length` tokens per candidate, half of them the prompt). The learning-rate schedule
    spans `train.max_steps`, or 1,000 steps when that is not set."""
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program, check_batch

    mesh = sharding.make_mesh(config.train.mesh, name="train.mesh")
    b = batch_size or config.train.batch_size
    check_batch(b, config.train.grad_accum, mesh)
    total_steps = config.train.max_steps if config.train.max_steps > 0 else 1000
    program = build_train_program(
        model_config(config), mesh, config.loss, config.optim, total_steps, grad_accum=config.train.grad_accum
    )
    length = seq_len or config.data.max_length
    batch = batch or planned_batch(config, mesh, b, length, prompt_len or length // 2)
    return program, program.lower(program.abstract_state, batch)


def plan_memory(
    config: RunConfig, batch_size: int | None = None, seq_len: int | None = None, prompt_len: int | None = None
) -> MemoryPlan:
    """Compiles the train step for `config` on its mesh with abstract inputs (`planned_program`) and reads
    per-device memory."""
    import time

    import jax
    import numpy as np

    from aft_jax.parallel import sharding

    began = time.perf_counter()
    program, lowered = planned_program(config, batch_size, seq_len, prompt_len)
    compiled = lowered.compile()
    mesh = program.mesh
    seconds = time.perf_counter() - began
    analysis = compiled.memory_analysis()

    def per_device(tree) -> float:
        return sum(
            math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
        )

    gb = 1024**3
    trained_b, frozen_b = per_device(program.abstract_state.params), per_device(program.abstract_frozen)
    params_b, opt_b = trained_b + frozen_b, per_device(program.abstract_state.opt_state)
    upcast_b = cpu_upcast_bytes(compiled.as_text()) if jax.default_backend() == "cpu" else 0
    temp_b = float(getattr(analysis, "temp_size_in_bytes", 0)) - upcast_b
    token_arrays = lowered.args_info[0][1]["input_ids"].shape  # (rows, length) packed, (B, K, T) padded
    return MemoryPlan(
        layout=config.data.layout,
        computed_tokens=math.prod(token_arrays),
        devices=mesh.devices.size,
        mesh=sharding.describe(mesh),
        params_gb=params_b / gb,
        optimizer_gb=opt_b / gb,
        temporaries_gb=temp_b / gb,
        total_gb=(params_b + opt_b + temp_b) / gb,
        compile_s=seconds,
        frozen_gb=frozen_b / gb,
        trained_params=sum(math.prod(x.shape) for x in jax.tree.leaves(program.abstract_state.params)),
        cpu_upcast_gb=upcast_b / gb,
    )


def recommend(plan: MemoryPlan, hbm_gb: float, config: RunConfig) -> str:
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
    weights = plan.params_gb + plan.optimizer_gb
    if weights > 0.5 * hbm_gb or weights > plan.temporaries_gb:  # the weights and their optimizer state dominate
        lora, dtype = config.model.lora, config.model.param_dtype
        if lora.rank == 0:
            advice.append(
                "LoRA: model.lora.rank=16 (only the adapters are trained: no gradients or optimizer state for "
                "the base weights)"
            )
        if lora.quantize != "nf4":
            advice.append(
                ("QLoRA: model.lora.rank=16 " if lora.rank == 0 else "QLoRA: ")
                + "model.lora.quantize=nf4 (the base projections at 4.5 bits a weight)"
            )
        if dtype == "float32" and (lora.rank == 0 or lora.quantize == "none"):
            advice.append("model.param_dtype=bfloat16 (half the bytes of every weight held in param_dtype)")
        advice.append("more devices on the fsdp axis (parameters and optimizer state are split over it)")
    return f"does not fit: {plan.total_gb:.1f} GB per device > 85% of {hbm_gb} GB; try " + "; ".join(advice)
