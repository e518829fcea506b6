"""Attention masks of the two layouts, and the attention itself: the one place that decides how it is computed.

- `causal_mask`: padded rows; a query sees the earlier real tokens of its own row.
- `packed_mask`: packed candidate groups (`aft_jax.data.packing`); a row holds pieces (segment ids 1, 2, ...,
  0 for filler), each the shared prompt (branch 0) followed by candidates (branches 1, 2, ...). A query sees
  the earlier tokens of its own piece that are in the prompt or in its own branch, so every candidate is
  computed as if it were alone after its prompt.
- `window_mask`: the sliding window of the families that have one, by position, and-ed with either mask.

`grouped_attention` is plain XLA (einsums and a float32 softmax) on every backend; fused kernels (cuDNN via
`jax.nn.dot_product_attention`, TPU splash attention) are not used, since none has been checked against
these masks on an accelerator yet.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASKED = float(jnp.finfo(jnp.float32).min)  # the logit of a masked-out key


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
