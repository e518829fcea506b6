"""Qwen instruct models with the paper's settings: `--config configs/qwen.py:MODEL-TASK`, e.g.
`configs/qwen.py:qwen2.5_1.5b-gsm8k`, prompted with the model's chat template (non-thinking for Qwen3).

MODEL: qwen2.5_0.5b, qwen2.5_1.5b, qwen2.5_7b (Qwen2.5-*-Instruct), qwen3_8b (Qwen3-8B). TASK: as in
`configs/paper.py` (gsm8k, aqua_rat, ecqa, gsm8k_rank, mix).
"""

from aft_jax.config.presets import open_model_config


def get_config(name: str = "qwen2.5_1.5b-gsm8k"):
    model, _, task = name.partition("-")
    return open_model_config(model, task)
