"""Llama-2-13B on GSM8K with the paper's settings (the same as `configs/paper.py:llama2_13b-gsm8k`)."""

from aft_jax.config.presets import paper_config


def get_config():
    return paper_config("llama2_13b", "gsm8k")
