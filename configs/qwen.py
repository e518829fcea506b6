"""Qwen instruct models with the paper's settings: `--config configs/qwen.py:MODEL-TASK`, e.g.
`configs/qwen.py:qwen2.5_1.5b-gsm8k`, prompted with the model's chat template (non-thinking for Qwen3).

MODEL: qwen2.5_0.5b, qwen2.5_1.5b, qwen2.5_7b (Qwen2.5-*-Instruct), qwen3_8b (Qwen3-8B). TASK: as in
`configs/paper.py` (gsm8k, aqua_rat, ecqa, gsm8k_rank, mix).

`MODEL-TASK-lora` trains low-rank adapters instead of every weight (`model.lora`: rank 16, alpha 32, on all
seven projections, bfloat16 weights and compute) and `MODEL-TASK-qlora` the same on a base whose
projections are stored in NF4 (`model.lora.quantize=nf4`), e.g. `configs/qwen.py:qwen2.5_7b-gsm8k-lora`.
"""

from aft_jax.config.presets import open_model_config
from aft_jax.config.spec import RunConfigError

# The adapters' learning rate: QLoRA (Dettmers et al. 2023, appendix B.2, table 9) trains 7B and 13B models'
# adapters at 2e-4 (1e-4 at 33B and 65B), as TRL's LoRA/QLoRA examples do (`sft.py --use_peft`, 2.0e-4);
# LoRA (Hu et al. 2021) used 2e-4 for GPT-2 and 4e-4 to 5e-4 for RoBERTa. The paper's full fine-tuning rate,
# 2e-5, would barely move adapters whose B starts at zero.
LORA_LR = 2e-4
# The memory settings `aft-jax plan` finds for a v5e-8 (8 chips x 16 GB, train.mesh=fsdp: all 8 on the fsdp
# axis) at 128 groups per step: layers recomputed, 8 micro-batches, which fit even with every candidate at
# data.max_length = 512 tokens (`aft-jax plan --config configs/qwen.py:qwen2.5_7b-gsm8k-lora --devices 8
# --chip v5e`; the numbers are in docs/models.md, "LoRA and QLoRA"). Other models keep their full
# fine-tuning settings; plan them with `aft-jax plan` before a run.
LORA_MEMORY = {  # model: {variant: (remat_policy, grad_accum)}
    "qwen2.5_7b": {"lora": ("full", 8), "qlora": ("full", 8)},
    "qwen3_8b": {"lora": ("full", 8), "qlora": ("full", 8)},
}
LORA_VARIANTS = ("lora", "qlora")


def get_config(name: str = "qwen2.5_1.5b-gsm8k"):
    model, _, rest = name.partition("-")
    task, _, variant = rest.partition("-")
    if variant and variant not in LORA_VARIANTS:
        raise RunConfigError(f"unknown preset {name}: the suffix after MODEL-TASK is one of {list(LORA_VARIANTS)}")
    c = open_model_config(model, task)
    if variant:
        c.run_dir += f"_{variant}"
        c.model.lora.update(rank=16, alpha=32.0, targets="q,k,v,o,gate,up,down")
        c.model.lora.quantize = "nf4" if variant == "qlora" else "none"
        c.model.param_dtype = "bfloat16"
        c.model.compute_dtype = "bfloat16"
        c.optim.lr = LORA_LR
        c.train.mesh = "fsdp"
        if model in LORA_MEMORY:
            c.model.remat_policy, c.train.grad_accum = LORA_MEMORY[model][variant]
    return c
