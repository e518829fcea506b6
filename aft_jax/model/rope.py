"""Rotary position embeddings exactly as Hugging Face computes them (rotate-half layout).

Because the layout matches HF, porting weights needs no q/k permutation.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from aft_jax.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """`1 / theta^(2i/d)` for i < d/2, with `linear` or `llama3` scaling applied; float32 `[head_dim/2]`."""
    dim = config.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / np.power(np.float32(config.rope_theta), exponents)).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions_bt: jnp.ndarray, inv_freq: np.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin of `position * inv_freq`, duplicated to full head width: two float32 `[B, T, head_dim]`."""
    angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles_btd = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_btd), jnp.sin(angles_btd)


def apply_rope(x_bthd: jnp.ndarray, cos_btd: jnp.ndarray, sin_btd: jnp.ndarray) -> jnp.ndarray:
    """`x * cos + rotate_half(x) * sin`, where rotate_half([a, b]) = [-b, a]; computed in x's dtype."""
    half = x_bthd.shape[-1] // 2
    rotated = jnp.concatenate([-x_bthd[..., half:], x_bthd[..., :half]], axis=-1)
    cos = cos_btd[:, :, None, :].astype(x_bthd.dtype)
    sin = sin_btd[:, :, None, :].astype(x_bthd.dtype)
    return x_bthd * cos + rotated * sin
