"""The Llama-family causal LM in Flax NNX, with scanned (optionally rematerialised) layers and a KV cache.

`Llama(input_ids, attention_mask)` returns float32 logits `[B, T, V]`. Passing `cache=` (see
`init_cache`) also returns the updated cache: a prefill followed by one-token steps equals the full
forward (`Llama.prefill` builds the cache of a batch of prompts in one pass). Default positions come from
the attention mask (`cumsum(mask) - 1`), so left padding does not shift positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.parallel import sharding
from aft_jax.model.config import LlamaConfig
from aft_jax.model.layers import Block, RMSNorm, make_param
from aft_jax.model.rope import inverse_frequencies, rope_tables

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """Explicit decode state: keys/values `[L, B, S, Hkv, Dh]`, `valid_bs` marks real (non-pad) slots,
    `end` is the number of slots written so far (the same for every row)."""

    keys: jnp.ndarray
    values: jnp.ndarray
    valid_bs: jnp.ndarray
    end: jnp.ndarray


def init_cache(config: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return KVCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((batch_size, max_length), bool),
        jnp.zeros((), jnp.int32),
    )


class DecodeCache(NamedTuple):
    """Decode state of B rows that share Q prompts (rows `q * m ... (q + 1) * m - 1` continue prompt q):
    per layer, the prompt keys `[Q, Hkv, Dh, S]` and values `[Q, Hkv, S, Dh]` with `prompt_mask_qs`, and
    each row's own generated keys `[B, Hkv, Dh, N]` and values `[B, Hkv, N, Dh]` with `valid_bn`;
    `positions_b` is the position of each row's next token and `step` the number of own slots written."""

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


class Llama(nnx.Module):
    """Token embedding, `num_layers` scanned decoder blocks, final RMSNorm, (tied or untied) LM head."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = make_param(rngs, config, (config.vocab_size, config.hidden_size), ("vocab", "embed"), None)
        self.layers = Block(config, rngs=rngs, stack=config.num_layers)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = make_param(rngs, config, (config.hidden_size, config.vocab_size), ("embed", "vocab"), None)

    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, cache: KVCache | None = None):
        hidden_btd, new_cache = self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt, cache)
        logits_btv = self.logits(hidden_btd)
        return logits_btv if cache is None else (logits_btv, new_cache)

    def logits(self, hidden_btd: jnp.ndarray) -> jnp.ndarray:
        """float32 logits of final hidden states (any leading shape)."""
        dt = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            return jnp.einsum(
                "...d,vd->...v", hidden_btd, self.embed[...].astype(dt), preferred_element_type=jnp.float32
            )
        return jnp.einsum("...d,dv->...v", hidden_btd, self.lm_head[...].astype(dt), preferred_element_type=jnp.float32)

    def unstacked_layers(self, layer_states=None) -> list[Block]:
        """The decoder layers as separate modules, each with its own weight arrays (a copy): a decode
        loop reads them in place, where slicing the stacked weights would copy them on every step.
        `layer_states` (`nnx.state` of each layer of an earlier call) reuses that copy."""
        block_def, block_state = nnx.split(self.layers)
        if layer_states is None:
            layer_states = [jax.tree.map(lambda w, i=i: w[i], block_state) for i in range(self.config.num_layers)]
        return [nnx.merge(block_def, state) for state in layer_states]

    def decode_step(self, layers: list[Block], token_b: jnp.ndarray, cache: DecodeCache):
        """float32 logits `[B, V]` of one new token per row, and the cache with its keys/values stored;
        `layers` is `unstacked_layers()`."""
        cos_b1d, sin_b1d = rope_tables(cache.positions_b[:, None], inverse_frequencies(self.config))
        x_b1d = jnp.take(self.embed[...], token_b[:, None], axis=0).astype(self.config.dtype)
        valid_bn = jax.lax.dynamic_update_slice(cache.valid_bn, jnp.ones((token_b.shape[0], 1), bool), (0, cache.step))
        keys, values = [], []
        for i, block in enumerate(layers):
            prompt_kv = (cache.prompt_keys[i], cache.prompt_values[i])
            x_b1d, (k, v) = block.decode(
                x_b1d, cos_b1d, sin_b1d, prompt_kv, (cache.keys[i], cache.values[i]), cache.prompt_mask_qs,
                valid_bn, cache.step,
            )  # fmt: skip
            keys.append(k)
            values.append(v)
        logits_bv = self.logits(self.final_norm(x_b1d)[:, 0])
        new_cache = cache._replace(
            keys=tuple(keys), values=tuple(values), valid_bn=valid_bn, positions_b=cache.positions_b + 1,
            step=cache.step + 1,
        )  # fmt: skip
        return logits_bv, new_cache

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, cache=None):
        """Final-norm hidden states `[B, T, D]` in the compute dtype, and the updated cache (or None)."""
        b, t = input_ids_bt.shape
        mask_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if cache is None:
            hidden_btd, _ = self._forward(input_ids_bt, mask_bt, positions_bt, jnp.zeros((b,), jnp.int32))
            return hidden_btd, None
        offset_b = jnp.sum(cache.valid_bs, axis=-1, dtype=jnp.int32)
        # The cache is read layer by layer; only this call's new slots come out of the scan, and are
        # written into the cache with one update (in place inside a decode loop).
        kv, cache_mask_bts = (cache.keys, cache.values), cache.valid_bs[:, None, :]
        hidden_btd, new_kv = self._forward(
            input_ids_bt, mask_bt, positions_bt, offset_b, kv, cache_mask_bts, keep_new_kv=True
        )
        start = (0, 0, cache.end, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache.keys, new_kv[0].astype(cache.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(cache.values, new_kv[1].astype(cache.values.dtype), start)
        valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, mask_bt, (0, cache.end))
        return hidden_btd, KVCache(keys, values, valid_bs, cache.end + t)

    def prefill(self, input_ids_bt, attention_mask_bt):
        """Hidden states `[B, T, D]` of prompts and a cache of exactly their T slots: what `hidden_states`
        gives with an empty `init_cache(config, B, T)`, without attending to the empty slots."""
        mask_bt = attention_mask_bt.astype(bool)
        zeros_b = jnp.zeros((input_ids_bt.shape[0],), jnp.int32)
        hidden_btd, new_kv = self._forward(input_ids_bt, mask_bt, None, zeros_b, keep_new_kv=True)
        return hidden_btd, KVCache(new_kv[0], new_kv[1], mask_bt, jnp.asarray(mask_bt.shape[1], jnp.int32))

    def _forward(self, input_ids_bt, mask_bt, positions_bt, offset_b, kv=None, cache_mask_bts=None, keep_new_kv=False):
        """The scanned layers over `T` new tokens that follow `offset_b` earlier ones (whose keys/values
        `kv`, `[L, B, S, Hkv, Dh]` each, are read under `cache_mask_bts`): final-norm hidden states and, with
        `keep_new_kv`, the new tokens' keys/values `[L, B, T, Hkv, Dh]` (else None)."""
        cfg = self.config
        t = input_ids_bt.shape[1]
        mask_btt = jnp.tril(jnp.ones((t, t), bool))[None] & mask_bt[:, None, :]
        if positions_bt is None:
            positions_bt = jnp.maximum(offset_b[:, None] + jnp.cumsum(mask_bt, axis=-1) - 1, 0)
        cos_btd, sin_btd = rope_tables(positions_bt, inverse_frequencies(cfg))

        x_btd = jnp.take(self.embed[...], input_ids_bt, axis=0).astype(cfg.dtype)
        x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        block_def, block_state = nnx.split(self.layers)

        def layer(x_btd, layer_inputs):
            layer_state, layer_kv = layer_inputs
            block = nnx.merge(block_def, layer_state)
            x_btd, new_kv = block(x_btd, cos_btd, sin_btd, mask_btt, layer_kv, cache_mask_bts)
            x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
            return x_btd, (new_kv if keep_new_kv else None)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
        x_btd, new_kv = jax.lax.scan(layer, x_btd, (block_state, kv))
        return self.final_norm(x_btd), new_kv


def abstract_model(config: LlamaConfig) -> Llama:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes, dtypes and axis names, no memory."""
    return nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))


def create_model(config: LlamaConfig, *, mesh=None, seed: int = 0, rules=None) -> Llama:
    """A randomly initialised model whose weights are created directly in their shardings on `mesh`."""
    mesh = mesh or sharding.single_device_mesh()
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(Llama(config, rngs=nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, init())
