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
- `pallas`: for packed rows, the block-sparse Pallas kernel of `aft_jax.model.packed_attention`, which takes
  the rows' segment, branch and position ids instead of a mask and computes only the tiles the packed mask
  lets through (compiled on TPU; run in Pallas interpret mode elsewhere, for tests, not speed); padded rows
  use `xla`;
- `auto` (the default): `pallas` for packed rows on TPU; `cudnn` where it applies (a GPU backend, a bfloat16
  or float16 compute dtype, a head size that is a multiple of 8 up to 128); else `xla`.

A decoder layer (`aft_jax.model.layers.Block`) takes its keys and values from a *source* (`KVSource`): called
with the layer's queries and this call's keys/values, it returns the attention output and what the caller
keeps. `OwnTokens` (the training forward, the prefill) attends to this call's tokens by `attend`, or by the packed
kernel when it carries a `PackedPlan`;
`SharedPrompt` (the sampler's decoding, `aft_jax.sampling.decode`) to a prompt cache read by several rows
and each row's own cache, by `shared_prompt_attention`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from aft_jax.model.packed_attention import PackedPlan, packed_attention
from aft_jax.model.packed_blocks import MASKED
from aft_jax.parallel import sharding

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
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


def resolve_impl(impl: str, dtype, head_dim: int, packed: bool = False) -> str:
    """`xla`, `cudnn` or `pallas` (packed rows only): `impl` itself, or for `auto` what applies on this
    backend, layout, dtype and head size."""
    if impl == "pallas" or (impl == "auto" and packed and jax.default_backend() == "tpu"):
        return "pallas" if packed else "xla"
    if impl != "auto":
        return impl
    fits = jnp.dtype(dtype).name in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fits and jax.default_backend() == "gpu" else "xla"


def packed_attention_per_shard(q_bthk, k_btgk, v_btgk, plan: PackedPlan):
    """`packed_attention` on each device's rows (and heads, where the tensor axis divides both the query and
    the key/value heads) of the active mesh: XLA cannot partition a Pallas call itself."""
    q_heads, kv_heads = q_bthk.shape[2], k_btgk.shape[2]
    split_heads = sharding.active_spec(("q_heads",), (q_heads,)) == sharding.active_spec(("kv_heads",), (kv_heads,))
    q_axes = ("activation_batch", None, "q_heads" if split_heads else None)
    kv_axes = ("activation_batch", None, "kv_heads" if split_heads else None)
    return sharding.per_shard(
        packed_attention, (q_bthk, k_btgk, v_btgk, plan), (q_axes, kv_axes, kv_axes, ("activation_batch",)), q_axes
    )


class KVSource(Protocol):
    """Where a layer's queries find their keys and values. Called with this call's queries `[B, T, H, Dh]` and
    keys and values `[B, T, Hkv, Dh]` (RoPE applied), it returns the attention output `[B, T, H, Dh]` and what
    the caller keeps (this call's keys/values, an updated cache)."""

    def __call__(self, q_bthk, k_btgk, v_btgk) -> tuple[jnp.ndarray, Any]: ...


class OwnTokens(NamedTuple):
    """The source of the training forward and the prefill: this call's own tokens under `mask_btt`
    (`[B, T, T]`), by `attend` with `impl`; or, given `plan`, packed rows by the block-sparse kernel
    (`packed_attention`, no mask). Keeps this call's keys and values."""

    mask_btt: jnp.ndarray | None
    impl: str = "auto"
    plan: PackedPlan | None = None

    def __call__(self, q_bthk, k_btgk, v_btgk):
        if self.plan is not None:
            return packed_attention_per_shard(q_bthk, k_btgk, v_btgk, self.plan), (k_btgk, v_btgk)
        return attend(q_bthk, k_btgk, v_btgk, self.mask_btt, self.impl), (k_btgk, v_btgk)


class SharedPrompt(NamedTuple):
    """The decode source (one new token per row, T = 1): rows `q * m ... (q + 1) * m - 1` (m = B / Q) share
    prompt q's keys `[Q, Hkv, Dh, S]` and values `[Q, Hkv, S, Dh]` (seen under `prompt_mask`, `[Q, S]` or
    `[Q, m, S]` per row), and each row has its own keys `[B, Hkv, Dh, N]` and values `[B, Hkv, N, Dh]` (seen
    under `own_mask_bn`, which must already mark column `step`). The new key/value goes to own column `step`;
    keeps the updated own `(keys, values)`."""

    prompt_keys: jnp.ndarray
    prompt_values: jnp.ndarray
    prompt_mask: jnp.ndarray
    keys: jnp.ndarray
    values: jnp.ndarray
    own_mask_bn: jnp.ndarray
    step: jnp.ndarray

    def __call__(self, q_b1hk, k_b1gk, v_b1gk):
        dt = q_b1hk.dtype
        k_bgk1 = k_b1gk.transpose(0, 2, 3, 1).astype(self.keys.dtype)
        v_bg1k = v_b1gk.transpose(0, 2, 1, 3).astype(self.values.dtype)
        keys = jax.lax.dynamic_update_slice(self.keys, k_bgk1, (0, 0, 0, self.step))
        values = jax.lax.dynamic_update_slice(self.values, v_bg1k, (0, 0, self.step, 0))
        out_bhk = shared_prompt_attention(
            q_b1hk[:, 0], (self.prompt_keys.astype(dt), self.prompt_values.astype(dt)), self.prompt_mask,
            (keys.astype(dt), values.astype(dt)), self.own_mask_bn,
        )  # fmt: skip
        return out_bhk[:, None], (keys, values)


def shared_prompt_attention(q_bhk, prompt_kv, prompt_mask, own_kv, own_mask_bn):
    """Attention of one query per row over two key blocks in one float32 softmax: the prompt's, shared by
    rows `q * m ... (q + 1) * m - 1` (m = B / Q), keys `[Q, Hkv, Dh, S]` and values `[Q, Hkv, S, Dh]`
    under `prompt_mask` (`[Q, S]`, or `[Q, m, S]` per row), and each row's own, keys `[B, Hkv, Dh, N]` and
    values `[B, Hkv, N, Dh]` under `own_mask_bn`. Reading a prompt once for its m rows makes decoding several
    samples per prompt cheaper than giving every row a copy; keys are stored transposed so that both products
    are plain matrix products. Returns `[B, H, Dh]`."""
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
    prompt_mask_qgis = (
        prompt_mask[:, None, None] if prompt_mask.ndim == 2 else jnp.repeat(prompt_mask, r, axis=1)[:, None]
    )
    prompt_logits = jnp.where(prompt_mask_qgis, prompt_logits * scale, MASKED)
    own_logits = jnp.einsum("bgrk,bgkn->bgrn", q_bgrk, own_kv[0], preferred_element_type=jnp.float32)
    own_logits = jnp.where(own_mask_bn[:, None, None], own_logits * scale, MASKED)
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
