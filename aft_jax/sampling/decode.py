"""The sampler's decode state: one new token per row, B rows continuing Q shared prompts.

Rows `q * m ... (q + 1) * m - 1` (m = B / Q) continue prompt q: they read its keys/values from one copy and
keep their own generated keys/values apart (`DecodeCache`). `decode_cache` turns a prefill's `KVCache` into
that state, `grow_decode_cache` adds own slots, and `decode_step` runs one token per row through the layers
of `unstack_layers` (`CausalLM.decode`), each layer attending to its `SharedPrompt` source
(`aft_jax.model.attention`). Private to the sampling package.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.attention import SharedPrompt, window_mask
from aft_jax.model.causal_lm import CausalLM, KVCache
from aft_jax.model.layers import Block


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
    valid_bn = jax.lax.dynamic_update_slice(cache.valid_bn, jnp.ones((token_b.shape[0], 1), bool), (0, cache.step))
    masks = {None: (cache.prompt_mask_qs, valid_bn)}
    if cfg.sliding_window is not None:
        masks[cfg.sliding_window] = window_masks(cache, valid_bn, cfg.sliding_window)
    sources = []
    for i in range(len(layers)):
        prompt_mask, own_mask_bn = masks[cfg.window_of(i)]
        sources.append(SharedPrompt(
            cache.prompt_keys[i], cache.prompt_values[i], prompt_mask, cache.keys[i], cache.values[i], own_mask_bn,
            cache.step,
        ))  # fmt: skip
    logits_bv, kept = model.decode(layers, token_b, cache.positions_b, sources)
    new_cache = cache._replace(
        keys=tuple(k for k, _ in kept), values=tuple(v for _, v in kept), valid_bn=valid_bn,
        positions_b=cache.positions_b + 1, step=cache.step + 1,
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
