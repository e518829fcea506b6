"""The paper's experiments as configs: a model x a task, with the paper's training settings (the defaults
of `config.defaults.default_config`, AFT_METHOD section 7) and a memory layout for multi-accelerator hosts;
the same for the instruct models people fine-tune today (Qwen2.5, Qwen3), prompted with their chat template."""

from __future__ import annotations

from typing import Any

import ml_collections

from aft_jax.config.defaults import default_config
from aft_jax.config.spec import RunConfigError

PAPER_MODELS = {  # hub name, gradient accumulation for 128 questions per step
    "llama_7b": ("huggyllama/llama-7b", 4),
    "llama2_7b": ("meta-llama/Llama-2-7b-hf", 4),
    "llama2_13b": ("meta-llama/Llama-2-13b-hf", 8),
}
OPEN_MODELS = {  # hub name, gradient accumulation for 128 questions per step
    "qwen2.5_0.5b": ("Qwen/Qwen2.5-0.5B-Instruct", 1),
    "qwen2.5_1.5b": ("Qwen/Qwen2.5-1.5B-Instruct", 2),
    "qwen2.5_7b": ("Qwen/Qwen2.5-7B-Instruct", 4),
    "qwen3_8b": ("Qwen/Qwen3-8B", 4),
}
PAPER_TASKS: dict[str, dict[str, dict[str, Any]]] = {
    "gsm8k": {"task": {"name": "gsm8k"}},
    "aqua_rat": {"task": {"name": "aqua_rat"}},
    "ecqa": {"task": {"name": "ecqa"}},
    "gsm8k_rank": {
        "task": {"name": "gsm8k_rank"},
        "loss": {"use_levels": True},
        "pipeline": {"methods": "aft_bc,aft_dc,rrhf,pro,dpo"},
    },
    "mix": {"task": {"name": "mix"}},  # GSM8K + AQuA-RAT + ECQA together
}


def paper_config(model: str, task: str, models: dict[str, tuple[str, int]] = PAPER_MODELS) -> ml_collections.ConfigDict:
    """`model` in `models` (PAPER_MODELS, or OPEN_MODELS through `open_model_config`), `task` in PAPER_TASKS."""
    if model not in models or task not in PAPER_TASKS:
        raise RunConfigError(f"unknown preset {model}-{task}; models: {sorted(models)}, tasks: {sorted(PAPER_TASKS)}")
    path, grad_accum = models[model]
    c = default_config()
    c.run_dir = f"runs/{model}_{task}"
    c.model.path = path
    c.model.compute_dtype = "bfloat16"
    c.model.remat_policy = "dots_no_batch"
    c.train.grad_accum = grad_accum
    c.pipeline.methods = "aft_bc,aft_dc,rft,rrhf,dpo"
    c.checkpoint.save_every = 100
    c.checkpoint.export_hf = True
    for section, values in PAPER_TASKS[task].items():
        c[section].update(values)
    return c


def open_model_config(model: str, task: str) -> ml_collections.ConfigDict:
    """`paper_config` for a model of OPEN_MODELS, prompted with its tokenizer's chat template."""
    c = paper_config(model, task, OPEN_MODELS)
    c.task.template = "chat"
    return c
