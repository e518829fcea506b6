"""Attention masks of the two layouts, and the attention itself: the one place that decides how it is computed.

- `causal_mask`: padded rows; a query sees the earlier real tokens of its own row.
- `packed_mask`: packed candidate groups (`aft_jax.data.packing`); a row holds pieces (segment ids 1, 2, ...,
  0 for filler), each the shared prompt (branch 0) followed by candidates (branches 1, 2, ...). A query sees
  the earlier tokens of its own piece that are in the prompt or in its own branch, so every candidate is
  computed as if it were alone after its prompt.
- `window_mask`: the sliding window of the families that have one, by position, and-ed with either mask.

`attend` computes one block of keys (the training forward, the prefill) by `ModelConfig.attention`:

- `xla`: `grouped_attention`, einsums and a float32 softmax, on every backend (the reference);
- `cudnn`: cuDNN's fused attention through `jax.nn.dot_product_attention(implementation="cudnn")`, on
  NVIDIA GPUs in bfloat16 or float16, with the mask passed as a dense `[B, 1, T, S]` mask (cuDNN adds it as
  a bias: no segment or causal shortcut expresses a prompt shared by several branches). Checked on an H200
  against `xla` for packed and padded candidate groups (`benchmarks/gpu_scale.py`);
- `auto` (the default): `cudnn` where it applies (a GPU backend, a bfloat16 or float16 compute dtype, a
  head size that is a multiple of 8 up to 128), else `xla`.

TPU splash attention is not wired: it has not been checked here. Attention over a KV cache (decoding) is
always `grouped_attention` or the sampler's own (`aft_jax.sampling.decode`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)  # the logit of a masked-out key
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = ("bfloat16", "float16")  # the compute dtypes cuDNN's fused attention takes


def causal_mask(mask_bt):
    """`[B, T, T]`: query t sees key s <= t where `mask_bt[:, s]` is set."""
    t = mask_bt.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & mask_bt.astype(bool)[:, None, :]


def packed_mask(segment_ids_bt, branch_ids_bt):
    """`[B, T, T]`: query t sees key s <= t of the same segment whose branch is 0 (the prompt) or t's own."""
    t = segment_ids_bt.shape[1]
    same_segment = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    branch_q, branch_k = branch_ids_bt[:, :, None], branch_ids_bt[:, None, :]
    return jnp.tril(jnp.ones((t, t), bool))[None] & same_segment & ((branch_k == 0) | (branch_k == branch_q))


def window_mask(query_positions_bt, key_positions_bs, window: int):
    """`[B, T, S]`: key s lies within `window` positions of query t (`position_t - position_s < window`, as
    Hugging Face's sliding window: a query sees itself and the `window - 1` positions before it)."""
    return (query_positions_bt[:, :, None] - key_positions_bs[:, None, :]) < window


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
            MASKED,
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


def attend(q_bthk, k_bsgk, v_bsgk, mask_bts, impl: str = "auto"):
    """softmax(q k^T / sqrt(head_dim) + mask) v over one key block, `[B, T, H, Dh]`, by `impl` (see the
    module docstring); the query heads are grouped over the key/value heads as in `grouped_attention`."""
    if resolve_impl(impl, q_bthk.dtype, q_bthk.shape[-1]) == "cudnn":
        return jax.nn.dot_product_attention(q_bthk, k_bsgk, v_bsgk, mask=mask_bts[:, None], implementation="cudnn")
    return grouped_attention(q_bthk, [(k_bsgk, v_bsgk, mask_bts)])


def resolve_impl(impl: str, dtype, head_dim: int) -> str:
    """`xla` or `cudnn`: `impl` itself, or for `auto` what applies on this backend, dtype and head size."""
    if impl != "auto":
        return impl
    fits = jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"
