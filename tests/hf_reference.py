"""Tiny random `transformers.LlamaForCausalLM` checkpoints, built locally, as the independent reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_CONFIGS = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e5),
    "llama3_rope": dict(
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=False,
        rope_theta=5e5,
        max_position_embeddings=256,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        eos_token_id=[5, 7],
    ),
}


def tiny_hf_model(name: str, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    fields = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
        initializer_range=0.2,
    )
    fields.update(TINY_CONFIGS[name])
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    with torch.no_grad():  # norms away from 1 so a mixed-up norm weight is caught
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.uniform_(0.5, 1.5)
    return model


def save_tiny(name: str, directory: Path, seed: int = 0):
    model = tiny_hf_model(name, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def hf_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """HF logits with positions from the mask (cumsum - 1), the convention aft_jax uses by default."""
    import torch

    mask = torch.tensor(attention_mask, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(input_ids, dtype=torch.long), attention_mask=mask, position_ids=positions)
    return out.logits.float().numpy()


def padded_batch(rng: np.random.Generator, vocab: int, lengths: list[int], side: str):
    """Random token ids `[B, T]` with each row's `lengths[b]` real tokens padded on `side`."""
    t = max(lengths)
    ids = rng.integers(3, vocab, size=(len(lengths), t))
    mask = np.zeros((len(lengths), t), np.int32)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, t - n :] = 1
    return np.where(mask == 1, ids, 0), mask
