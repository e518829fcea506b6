"""The decoder block in Flax NNX: RMSNorm, grouped-query attention (with the q/k/v biases and q/k norms of the
families that have them), SwiGLU.

The block's structure (pre-norm, residuals) is written once, in `Block.__call__`; where the attention's keys
and values come from is the caller's `source` (`aft_jax.model.attention.KVSource`): this call's own tokens in
the training forward and the prefill, the shared-prompt cache in the sampler's decoding.

Every weight is an `nnx.Param` carrying logical axis names in its `axes` metadata; `aft_jax.parallel.sharding`
maps them to mesh axes. A module built with `stack=L` holds L layers' weights with a leading `layers`
axis, ready to be scanned. The seven projections go through `aft_jax.model.lora` (`init_projection`,
`project`): the plain weight, or with `config.lora` a (quantized) base and its adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.attention import KVSource
from aft_jax.model.config import ModelConfig
from aft_jax.model.lora import init_projection, project
from aft_jax.model.rope import apply_rope


def make_param(
    rngs: nnx.Rngs,
    config: ModelConfig,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    stack: int | None,
    *,
    ones: bool = False,
) -> nnx.Param:
    """A weight of `shape` (with a leading `layers` axis when stacked): N(0, initializer_range) or ones."""
    if stack:
        shape, axes = (stack, *shape), ("layers", *axes)
    dtype = jnp.dtype(config.param_dtype)
    if ones:
        value = jnp.ones(shape, dtype)
    else:
        value = config.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
        value = value.astype(dtype)
    return nnx.Param(value, axes=axes)


class RMSNorm(nnx.Module):
    """`w * x / sqrt(mean(x^2) + eps)`, normalised in float32 and cast back as Hugging Face does."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None, dim: int | None = None):
        self.eps = config.rms_norm_eps
        self.scale = make_param(rngs, config, (dim or config.hidden_size,), ("norm",), stack, ones=True)

    def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
        """Normalises the last axis (`hidden_size`, or `dim` when given: a q/k norm's `head_dim`)."""
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_btd.dtype) * normed.astype(x_btd.dtype)


class Attention(nnx.Module):
    """Grouped-query attention over a source's keys and values (the source's masks make it causal); query
    head h reads key/value head h // (num_heads / num_kv_heads).
    With `qkv_bias` the projections add `q_bias` `[H, Dh]`, `k_bias` and `v_bias` `[Hkv, Dh]`; with `qk_norm`
    queries and keys are RMS-normalised per head (`q_norm`, `k_norm` over `Dh`) before RoPE."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype = jnp.dtype(config.dtype)
        self.qkv_bias, self.qk_norm = config.qkv_bias, config.qk_norm
        self.lora_scale = config.lora.scale if config.lora else None
        for target, shape, axes in (
            ("q", (d, h, hd), ("embed", "q_heads", "head_dim")),
            ("k", (d, kv, hd), ("embed", "kv_heads", "head_dim")),
            ("v", (d, kv, hd), ("embed", "kv_heads", "head_dim")),
            ("o", (h, hd, d), ("q_heads", "head_dim", "embed")),
        ):
            init_projection(self, target, make_param(rngs, config, shape, axes, stack), config, rngs, bool(stack))
        if config.qkv_bias:
            self.q_bias = make_param(rngs, config, (h, hd), ("q_heads", "head_dim"), stack)
            self.k_bias = make_param(rngs, config, (kv, hd), ("kv_heads", "head_dim"), stack)
            self.v_bias = make_param(rngs, config, (kv, hd), ("kv_heads", "head_dim"), stack)
        if config.qk_norm:
            self.q_norm = RMSNorm(config, rngs=rngs, stack=stack, dim=hd)
            self.k_norm = RMSNorm(config, rngs=rngs, stack=stack, dim=hd)

    def __call__(self, x_btd, cos_btd, sin_btd, source: KVSource):
        """The attention output `[B, T, D]` of `x_btd` (RoPE by `cos_btd`/`sin_btd`, `[B, T, Dh]`) over the keys
        and values of `source`, and what `source` keeps."""
        dt = self.dtype
        q_bthk, k_btgk, v_btgk = (project(self, target, x_btd, dt) for target in "qkv")
        if self.qkv_bias:
            q_bthk = q_bthk + self.q_bias[...].astype(dt)
            k_btgk = k_btgk + self.k_bias[...].astype(dt)
            v_btgk = v_btgk + self.v_bias[...].astype(dt)
        if self.qk_norm:
            q_bthk, k_btgk = self.q_norm(q_bthk), self.k_norm(k_btgk)
        q_bthk, k_btgk = apply_rope(q_bthk, cos_btd, sin_btd), apply_rope(k_btgk, cos_btd, sin_btd)
        out_bthk, kept = source(q_bthk, k_btgk, v_btgk)
        return project(self, "o", out_bthk, dt), kept


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = jnp.dtype(config.dtype)
        self.lora_scale = config.lora.scale if config.lora else None
        for target, shape, axes in (("gate", (d, f), ("embed", "mlp")), ("up", (d, f), ("embed", "mlp")),
                                    ("down", (f, d), ("mlp", "embed"))):  # fmt: skip
            init_projection(self, target, make_param(rngs, config, shape, axes, stack), config, rngs, bool(stack))

    def __call__(self, x_btd):
        dt = self.dtype
        gate, up = project(self, "gate", x_btd, dt), project(self, "up", x_btd, dt)
        return project(self, "down", jax.nn.silu(gate) * up, dt)


class Block(nnx.Module):
    """Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`, the attention over `source`'s keys
    and values (`aft_jax.model.attention`: `OwnTokens` in the forward and the prefill, `SharedPrompt` in
    decoding)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.attn_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.attn = Attention(config, rngs=rngs, stack=stack)
        self.mlp_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.mlp = MLP(config, rngs=rngs, stack=stack)

    def __call__(self, x_btd, cos_btd, sin_btd, source: KVSource):
        """The layer's output `[B, T, D]` and what `source` keeps (see `Attention.__call__`)."""
        attn_out, kept = self.attn(self.attn_norm(x_btd), cos_btd, sin_btd, source)
        x_btd = x_btd + attn_out
        return x_btd + self.mlp(self.mlp_norm(x_btd)), kept
