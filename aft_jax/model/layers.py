"""The Llama decoder block in Flax NNX: RMSNorm, grouped-query attention over an optional KV cache, SwiGLU.

Every weight is an `nnx.Param` carrying logical axis names in its `axes` metadata; `aft_jax.parallel.sharding`
maps them to mesh axes. A module built with `stack=L` holds L layers' weights with a leading `layers`
axis, ready to be scanned.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.config import LlamaConfig
from aft_jax.model.rope import apply_rope

_MASKED = float(jnp.finfo(jnp.float32).min)


def make_param(
    rngs: nnx.Rngs,
    config: LlamaConfig,
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

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.eps = config.rms_norm_eps
        self.scale = make_param(rngs, config, (config.hidden_size,), ("norm",), stack, ones=True)

    def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
        x32 = x_btd.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_btd.dtype) * normed.astype(x_btd.dtype)


class Attention(nnx.Module):
    """Causal grouped-query attention; query head h reads key/value head h // (num_heads / num_kv_heads)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.dtype = jnp.dtype(config.dtype)
        self.q_proj = make_param(rngs, config, (d, h, hd), ("embed", "q_heads", "head_dim"), stack)
        self.k_proj = make_param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"), stack)
        self.v_proj = make_param(rngs, config, (d, kv, hd), ("embed", "kv_heads", "head_dim"), stack)
        self.o_proj = make_param(rngs, config, (h, hd, d), ("q_heads", "head_dim", "embed"), stack)

    def __call__(self, x_btd, cos_btd, sin_btd, mask_btt, kv_cache=None, cache_mask_bts=None):
        """Returns the attention output `[B, T, D]` and this call's keys/values `[B, T, Hkv, Dh]`.

        The queries attend to this call's own tokens under `mask_btt` and, with a cache (this layer's
        `(keys, values)` `[B, S, Hkv, Dh]`), to the cached slots under `cache_mask_bts`, in one softmax.
        The cache is only read here; the caller stores the new keys/values.
        """
        dt = self.dtype
        q_bthk, k_btgk, v_btgk = self._project(x_btd, cos_btd, sin_btd)
        blocks = [(k_btgk, v_btgk, mask_btt)]
        if kv_cache is not None:
            blocks.insert(0, (kv_cache[0].astype(dt), kv_cache[1].astype(dt), cache_mask_bts))
        out_bthk = grouped_attention(q_bthk, blocks)
        return jnp.einsum("bthk,hkd->btd", out_bthk, self.o_proj[...].astype(dt)), (k_btgk, v_btgk)

    def decode(self, x_b1d, cos_b1d, sin_b1d, prompt_kv, own_kv, prompt_mask_qs, valid_bn, step):
        """One new token per row (`x_b1d`): stores its key/value in slot `step` of the row's own cache
        (`own_kv`: keys `[B, Hkv, Dh, N]`, values `[B, Hkv, N, Dh]`) and attends to the shared prompt
        (`prompt_kv`, laid out the same with Q prompts and S slots) and the valid own slots (`valid_bn`, which
        must already mark slot `step`). Returns `[B, 1, D]` and the updated `own_kv`."""
        dt = self.dtype
        q_bthk, k_btgk, v_btgk = self._project(x_b1d, cos_b1d, sin_b1d)
        k_bgk1 = k_btgk.transpose(0, 2, 3, 1).astype(own_kv[0].dtype)
        v_bg1k = v_btgk.transpose(0, 2, 1, 3).astype(own_kv[1].dtype)
        keys = jax.lax.dynamic_update_slice(own_kv[0], k_bgk1, (0, 0, 0, step))
        values = jax.lax.dynamic_update_slice(own_kv[1], v_bg1k, (0, 0, step, 0))
        out_bhk = shared_prompt_attention(
            q_bthk[:, 0], (prompt_kv[0].astype(dt), prompt_kv[1].astype(dt)), prompt_mask_qs,
            (keys.astype(dt), values.astype(dt)), valid_bn,
        )  # fmt: skip
        return jnp.einsum("bhk,hkd->bd", out_bhk, self.o_proj[...].astype(dt))[:, None], (keys, values)

    def _project(self, x_btd, cos_btd, sin_btd):
        """Queries `[B, T, H, Dh]`, keys and values `[B, T, Hkv, Dh]`, RoPE applied to queries and keys."""
        dt = self.dtype
        q_bthk = jnp.einsum("btd,dhk->bthk", x_btd, self.q_proj[...].astype(dt))
        k_btgk = jnp.einsum("btd,dgk->btgk", x_btd, self.k_proj[...].astype(dt))
        v_btgk = jnp.einsum("btd,dgk->btgk", x_btd, self.v_proj[...].astype(dt))
        return apply_rope(q_bthk, cos_btd, sin_btd), apply_rope(k_btgk, cos_btd, sin_btd), v_btgk


def grouped_attention(q_bthk, blocks):
    """softmax(q k^T / sqrt(head_dim) + mask) v over the keys of every `(k_bsgk, v_bsgk, mask_bts)` block
    jointly, the softmax in float32; each key/value head serves a group of query heads."""
    b, t, h, hd = q_bthk.shape
    groups = blocks[0][0].shape[2]
    q_btgrk = q_bthk.reshape(b, t, groups, h // groups, hd)
    logits = [
        jnp.where(
            mask[:, None, None],
            jnp.einsum("btgrk,bsgk->bgrts", q_btgrk, k, preferred_element_type=jnp.float32) * (hd**-0.5),
            _MASKED,
        )
        for k, _, mask in blocks
    ]
    probs = jax.nn.softmax(jnp.concatenate(logits, axis=-1), axis=-1)
    out, offset = 0.0, 0
    for k, v, _ in blocks:
        part = probs[..., offset : offset + k.shape[1]].astype(v.dtype)
        out = out + jnp.einsum("bgrts,bsgk->btgrk", part, v)
        offset += k.shape[1]
    return out.reshape(b, t, h, hd)


def shared_prompt_attention(q_bhk, prompt_kv, prompt_mask_qs, own_kv, own_mask_bn):
    """Attention of one query per row over two key blocks in one float32 softmax: the prompt's, shared by
    rows `q * m ... (q + 1) * m - 1` (m = B / Q), keys `[Q, Hkv, Dh, S]` and values `[Q, Hkv, S, Dh]`,
    and each row's own, keys `[B, Hkv, Dh, N]` and values `[B, Hkv, N, Dh]`. Reading a prompt once for
    its m rows makes decoding several samples per prompt cheaper than giving every row a copy; keys are
    stored transposed so that both products are plain matrix products. Returns `[B, H, Dh]`."""
    b, h, hd = q_bhk.shape
    q, groups = prompt_kv[0].shape[:2]
    m, r = b // q, h // groups
    scale = hd**-0.5

    def to_prompt_rows(x_bgr):  # [B, Hkv, r, ...] -> [Q, Hkv, m * r, ...]: a prompt's rows as one block
        return x_bgr.reshape(q, m, groups, r, *x_bgr.shape[3:]).swapaxes(1, 2).reshape(q, groups, m * r, -1)

    def to_rows(x_qgi):  # the inverse of `to_prompt_rows`
        return x_qgi.reshape(q, groups, m, r, -1).swapaxes(1, 2).reshape(b, groups, r, -1)

    q_bgrk = q_bhk.reshape(b, groups, r, hd)
    prompt_logits = jnp.einsum(
        "qgik,qgks->qgis", to_prompt_rows(q_bgrk), prompt_kv[0], preferred_element_type=jnp.float32
    )
    prompt_logits = jnp.where(prompt_mask_qs[:, None, None], prompt_logits * scale, _MASKED)
    own_logits = jnp.einsum("bgrk,bgkn->bgrn", q_bgrk, own_kv[0], preferred_element_type=jnp.float32)
    own_logits = jnp.where(own_mask_bn[:, None, None], own_logits * scale, _MASKED)
    # The softmax statistics move between the two layouts; the logits stay in their own.
    prompt_top_bgr1 = to_rows(jnp.max(prompt_logits, axis=-1, keepdims=True))
    top_bgr1 = jnp.maximum(prompt_top_bgr1, jnp.max(own_logits, axis=-1, keepdims=True))
    prompt_weights = jnp.exp(prompt_logits - to_prompt_rows(top_bgr1))
    own_weights = jnp.exp(own_logits - top_bgr1)
    prompt_total_bgr1 = to_rows(jnp.sum(prompt_weights, axis=-1, keepdims=True))
    total_bgr1 = prompt_total_bgr1 + jnp.sum(own_weights, axis=-1, keepdims=True)
    dt = own_kv[1].dtype
    prompt_out = to_rows(jnp.einsum("qgis,qgsk->qgik", prompt_weights.astype(dt), prompt_kv[1]))
    own_out = jnp.einsum("bgrn,bgnk->bgrk", own_weights.astype(dt), own_kv[1])
    out_bgrk = (prompt_out + own_out) / total_bgr1.astype(dt)
    return out_bgrk.reshape(b, h, hd)


class MLP(nnx.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        d, f = config.hidden_size, config.intermediate_size
        self.dtype = jnp.dtype(config.dtype)
        self.gate_proj = make_param(rngs, config, (d, f), ("embed", "mlp"), stack)
        self.up_proj = make_param(rngs, config, (d, f), ("embed", "mlp"), stack)
        self.down_proj = make_param(rngs, config, (f, d), ("mlp", "embed"), stack)

    def __call__(self, x_btd):
        dt = self.dtype
        gate = jnp.einsum("btd,df->btf", x_btd, self.gate_proj[...].astype(dt))
        up = jnp.einsum("btd,df->btf", x_btd, self.up_proj[...].astype(dt))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))


class Block(nnx.Module):
    """Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: int | None = None):
        self.attn_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.attn = Attention(config, rngs=rngs, stack=stack)
        self.mlp_norm = RMSNorm(config, rngs=rngs, stack=stack)
        self.mlp = MLP(config, rngs=rngs, stack=stack)

    def __call__(self, x_btd, cos_btd, sin_btd, mask_btt, kv_cache=None, cache_mask_bts=None):
        attn_out, new_kv = self.attn(self.attn_norm(x_btd), cos_btd, sin_btd, mask_btt, kv_cache, cache_mask_bts)
        x_btd = x_btd + attn_out
        return x_btd + self.mlp(self.mlp_norm(x_btd)), new_kv

    def decode(self, x_b1d, cos_b1d, sin_b1d, prompt_kv, own_kv, prompt_mask_qs, valid_bn, step):
        """One token per row through the layer (see `Attention.decode`); returns `[B, 1, D]`, own_kv."""
        attn_out, own_kv = self.attn.decode(
            self.attn_norm(x_b1d), cos_b1d, sin_b1d, prompt_kv, own_kv, prompt_mask_qs, valid_bn, step
        )
        x_b1d = x_b1d + attn_out
        return x_b1d + self.mlp(self.mlp_norm(x_b1d)), own_kv
