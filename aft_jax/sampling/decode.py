"""The sampler's decode path: one new token per row, B rows continuing Q shared prompts.

Rows `q * m ... (q + 1) * m - 1` (m = B / Q) continue prompt q: they read its keys/values from one copy
(`shared_prompt_attention`) and keep their own generated keys/values apart. `decode_cache` turns a prefill's
`KVCache` into that state, `grow_decode_cache` adds own slots, and `decode_step` runs one token per row
through the layers of `unstack_layers`, composing the model's own pieces (embedding, norms,
`Attention.project` / `output`, MLP, `logits`). Private to the sampling package: the public cache is
`aft_jax.KVCache`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.attention import MASKED, window_mask
from aft_jax.model.causal_lm import CausalLM, KVCache
from aft_jax.model.layers import Block
from aft_jax.model.rope import inverse_frequencies, rope_tables


class DecodeCache(NamedTuple):
    """Decode state of B rows that share Q prompts: per layer, the prompt keys `[Q, Hkv, Dh, S]` and values
    `[Q, Hkv, S, Dh]` with `prompt_mask_qs`, and each row's own generated keys `[B, Hkv, Dh, N]` and values
    `[B, Hkv, N, Dh]` with `valid_bn`; `positions_b` is the position of each row's next token and `step` the
    number of own slots written."""

    prompt_keys: tuple
    prompt_values: tuple
    prompt_mask_qs: jnp.ndarray
    keys: tuple
    values: tuple
    valid_bn: jnp.ndarray
    positions_b: jnp.ndarray
    step: jnp.ndarray


def decode_cache(prompt_cache: KVCache, rows_per_prompt: int, max_new_tokens: int) -> DecodeCache:
    """The decode state after a prefill into `prompt_cache` (`[L, Q, S, Hkv, Dh]`), for `rows_per_prompt`
    rows per prompt with room for `max_new_tokens` tokens each."""
    n_layers, q, _, groups, head_dim = prompt_cache.keys.shape
    b = q * rows_per_prompt
    own_keys = jnp.zeros((b, groups, head_dim, max_new_tokens), prompt_cache.keys.dtype)
    own_values = jnp.zeros((b, groups, max_new_tokens, head_dim), prompt_cache.values.dtype)
    return DecodeCache(
        tuple(prompt_cache.keys[i].transpose(0, 2, 3, 1) for i in range(n_layers)),
        tuple(prompt_cache.values[i].transpose(0, 2, 1, 3) for i in range(n_layers)),
        prompt_cache.valid_bs,
        (own_keys,) * n_layers,
        (own_values,) * n_layers,
        jnp.zeros((b, max_new_tokens), bool),
        jnp.repeat(jnp.sum(prompt_cache.valid_bs, axis=-1, dtype=jnp.int32), rows_per_prompt),
        jnp.zeros((), jnp.int32),
    )


def grow_decode_cache(cache: DecodeCache, max_new_tokens: int) -> DecodeCache:
    """`cache` with room for `max_new_tokens` own slots per row, the added ones empty."""
    extra = max_new_tokens - cache.valid_bn.shape[1]

    def pad(x, axis):
        return jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])

    return cache._replace(
        keys=tuple(pad(k, 3) for k in cache.keys), values=tuple(pad(v, 2) for v in cache.values),
        valid_bn=pad(cache.valid_bn, 1),
    )  # fmt: skip


def unstack_layers(model: CausalLM, layer_states=None) -> list[Block]:
    """The model's decoder layers as separate modules, each with its own weight arrays (a copy): a decode
    loop reads them in place, where slicing the stacked weights would copy them on every step.
    `layer_states` (`nnx.state` of each layer of an earlier call) reuses that copy."""
    block_def, block_state = nnx.split(model.layers)
    if layer_states is None:
        layer_states = [jax.tree.map(lambda w, i=i: w[i], block_state) for i in range(model.config.num_layers)]
    return [nnx.merge(block_def, state) for state in layer_states]


@functools.lru_cache(maxsize=8)
def _compiled_unstack(graphdef):
    return jax.jit(lambda state: [nnx.state(layer) for layer in unstack_layers(nnx.merge(graphdef, state))])


def decode_layers(model) -> list:
    """A copy of the decoder weights one array per layer (`unstack_layers`), for the decode loops: made once
    and passed to every batch, where each call would otherwise copy them again."""
    graphdef, state = nnx.split(model)
    return _compiled_unstack(graphdef)(state)


def decode_step(model: CausalLM, layers: list[Block], token_b: jnp.ndarray, cache: DecodeCache):
    """float32 logits `[B, V]` of one new token per row, and the cache with its keys/values stored;
    `layers` is `unstack_layers(model)`."""
    cfg = model.config
    cos_b1d, sin_b1d = rope_tables(cache.positions_b[:, None], inverse_frequencies(cfg))
    x_b1d = model.embed_tokens(token_b[:, None])
    valid_bn = jax.lax.dynamic_update_slice(cache.valid_bn, jnp.ones((token_b.shape[0], 1), bool), (0, cache.step))
    masks = {None: (cache.prompt_mask_qs, valid_bn)}
    if cfg.sliding_window is not None:
        masks[cfg.sliding_window] = window_masks(cache, valid_bn, cfg.sliding_window)
    keys, values = [], []
    for i, block in enumerate(layers):
        prompt_kv = (cache.prompt_keys[i], cache.prompt_values[i])
        x_b1d, (k, v) = _decode_block(
            block, x_b1d, cos_b1d, sin_b1d, prompt_kv, (cache.keys[i], cache.values[i]), *masks[cfg.window_of(i)],
            cache.step,
        )  # fmt: skip
        keys.append(k)
        values.append(v)
    logits_bv = model.logits(model.final_norm(x_b1d)[:, 0])
    new_cache = cache._replace(
        keys=tuple(keys), values=tuple(values), valid_bn=valid_bn, positions_b=cache.positions_b + 1,
        step=cache.step + 1,
    )  # fmt: skip
    return logits_bv, new_cache


def window_masks(cache: DecodeCache, valid_bn, window: int):
    """The prompt slots `[Q, m, S]` and own columns `[B, N]` that each row's new token sees in a sliding layer:
    those less than `window` positions before it. Own column c was written `(step - c) mod N` steps ago (a
    sample writes at most N columns, one per step, so this holds for the ring of the continuous loop too)."""
    q, n = cache.prompt_mask_qs.shape[0], valid_bn.shape[1]
    prompt_positions_qs = jnp.cumsum(cache.prompt_mask_qs, axis=-1, dtype=jnp.int32) - 1
    positions_qm = cache.positions_b.reshape(q, -1)
    prompt_qms = cache.prompt_mask_qs[:, None, :] & window_mask(positions_qm, prompt_positions_qs, window)
    age_n = (cache.step - jnp.arange(n)) % n
    return prompt_qms, valid_bn & (age_n < window)[None]


def _decode_block(block: Block, x_b1d, cos_b1d, sin_b1d, prompt_kv, own_kv, prompt_mask, own_mask_bn, step):
    """One new token per row (`x_b1d`) through a decoder layer: stores its key/value in slot `step` of the
    row's own cache (`own_kv`: keys `[B, Hkv, Dh, N]`, values `[B, Hkv, N, Dh]`) and attends to the shared
    prompt (`prompt_kv`, laid out the same with Q prompts and S slots) under `prompt_mask` and to its own
    slots under `own_mask_bn` (which must already mark slot `step`). Returns `[B, 1, D]` and the updated
    `own_kv`."""
    attn, dt = block.attn, block.attn.dtype
    q_bthk, k_btgk, v_btgk = attn.project(block.attn_norm(x_b1d), cos_b1d, sin_b1d)
    k_bgk1 = k_btgk.transpose(0, 2, 3, 1).astype(own_kv[0].dtype)
    v_bg1k = v_btgk.transpose(0, 2, 1, 3).astype(own_kv[1].dtype)
    keys = jax.lax.dynamic_update_slice(own_kv[0], k_bgk1, (0, 0, 0, step))
    values = jax.lax.dynamic_update_slice(own_kv[1], v_bg1k, (0, 0, step, 0))
    out_bhk = shared_prompt_attention(
        q_bthk[:, 0], (prompt_kv[0].astype(dt), prompt_kv[1].astype(dt)), prompt_mask,
        (keys.astype(dt), values.astype(dt)), own_mask_bn,
    )  # fmt: skip
    x_b1d = x_b1d + attn.output(out_bhk[:, None])
    return x_b1d + block.mlp(block.mlp_norm(x_b1d)), (keys, values)


def shared_prompt_attention(q_bhk, prompt_kv, prompt_mask, own_kv, own_mask_bn):
    """Attention of one query per row over two key blocks in one float32 softmax: the prompt's, shared by
    rows `q * m ... (q + 1) * m - 1` (m = B / Q), keys `[Q, Hkv, Dh, S]` and values `[Q, Hkv, S, Dh]`
    under `prompt_mask` (`[Q, S]`, or `[Q, m, S]` per row), and each row's own, keys `[B, Hkv, Dh, N]` and
    values `[B, Hkv, N, Dh]` under `own_mask_bn`. Reading a prompt once for
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
