"""Every experiment of the paper: `--config configs/paper.py:MODEL-TASK`, e.g. `configs/paper.py:llama_7b-aqua_rat`.

MODEL: llama_7b, llama2_7b, llama2_13b. TASK: gsm8k, aqua_rat, ecqa, gsm8k_rank (ranking feedback), mix
(the three tasks trained together; the report adds per-task accuracies).
"""

from aft_jax.config.presets import paper_config


def get_config(name: str = "llama2_7b-gsm8k"):
    model, _, task = name.partition("-")
    return paper_config(model, task)
