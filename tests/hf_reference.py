"""Tiny random `transformers` checkpoints of every supported family, built locally, as the independent reference.

A config's `model_type` (default llama) picks the family; biases and norm weights are drawn away from their
HF initial values (0 and 1), so a dropped or mixed-up bias or norm is caught.
"""

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
    # q/k/v biases; a window of 4 on layers 1 and 2 (layer 0 full), so both kinds of layer are checked
    "qwen2_window": dict(
        model_type="qwen2",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    ),
    # q/k norms, head_dim 16 where hidden_size / heads is 8; a window of 3 on layer 0 only, by layer_types
    "qwen3_head_dim": dict(
        model_type="qwen3",
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        use_sliding_window=True,
        sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
    ),
    "mistral_window": dict(
        model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False
    ),
}
FAMILY_CONFIGS = ("qwen2_window", "qwen3_head_dim", "mistral_window")


def tiny_hf_model(name: str, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

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
    config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name_, param in model.named_parameters():
            if "norm" in name_:
                param.uniform_(0.5, 1.5)
            elif name_.endswith("bias"):
                param.uniform_(-0.5, 0.5)
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
