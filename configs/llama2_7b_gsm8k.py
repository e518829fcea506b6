"""Llama-2-7B on GSM8K with the paper's settings (the same as `configs/paper.py:llama2_7b-gsm8k`)."""

from aft_jax.config.presets import paper_config


def get_config():
    return paper_config("llama2_7b", "gsm8k")
