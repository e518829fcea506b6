"""The causal LM of every family in `aft_jax.model.families` in Flax NNX, with scanned (optionally
rematerialised) layers and a KV cache.

`CausalLM(input_ids, attention_mask)` returns float32 logits `[B, T, V]`. Passing `cache=` (see
`init_cache`) also returns the updated cache: a prefill followed by one-token steps equals the full
forward (`CausalLM.prefill` builds the cache of a batch of prompts in one pass). Default positions come from
the attention mask (`cumsum(mask) - 1`), so left padding does not shift positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.attention import causal_mask, packed_mask, window_mask
from aft_jax.model.config import ModelConfig
from aft_jax.model.layers import Block, RMSNorm, make_param
from aft_jax.model.rope import inverse_frequencies, rope_tables
from aft_jax.parallel import sharding

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


def init_cache(config: ModelConfig, batch_size: int, max_length: int, dtype=None) -> KVCache:
    shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
    dtype = jnp.dtype(dtype or config.dtype)
    return KVCache(
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros((batch_size, max_length), bool),
        jnp.zeros((), jnp.int32),
    )


class CausalLM(nnx.Module):
    """Token embedding, `num_layers` scanned decoder blocks, final RMSNorm, (tied or untied) LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
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

    def embed_tokens(self, input_ids_bt) -> jnp.ndarray:
        """Token embeddings `[B, T, D]` in the compute dtype."""
        return jnp.take(self.embed[...], input_ids_bt, axis=0).astype(self.config.dtype)

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None, cache=None):
        """Final-norm hidden states `[B, T, D]` in the compute dtype, and the updated cache (or None)."""
        b, t = input_ids_bt.shape
        mask_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        offset_b = jnp.zeros((b,), jnp.int32) if cache is None else jnp.sum(cache.valid_bs, axis=-1, dtype=jnp.int32)
        if positions_bt is None:
            positions_bt = jnp.maximum(offset_b[:, None] + jnp.cumsum(mask_bt, axis=-1) - 1, 0)
        if cache is None:
            return self._forward(input_ids_bt, causal_mask(mask_bt), positions_bt)[0], None
        # The cache is read layer by layer; only this call's new slots come out of the scan, and are
        # written into the cache with one update (in place inside a decode loop).
        kv, cache_mask_bts = (cache.keys, cache.values), cache.valid_bs[:, None, :]
        cache_positions_bs = jnp.cumsum(cache.valid_bs, axis=-1, dtype=jnp.int32) - 1
        hidden_btd, new_kv = self._forward(
            input_ids_bt, causal_mask(mask_bt), positions_bt, kv, cache_mask_bts, cache_positions_bs, keep_new_kv=True
        )
        start = (0, 0, cache.end, 0, 0)
        keys = jax.lax.dynamic_update_slice(cache.keys, new_kv[0].astype(cache.keys.dtype), start)
        values = jax.lax.dynamic_update_slice(cache.values, new_kv[1].astype(cache.values.dtype), start)
        valid_bs = jax.lax.dynamic_update_slice(cache.valid_bs, mask_bt, (0, cache.end))
        return hidden_btd, KVCache(keys, values, valid_bs, cache.end + t)

    def packed_hidden_states(self, input_ids_rt, positions_rt, segment_ids_rt, branch_ids_rt):
        """Final-norm hidden states `[R, T, D]` of packed rows (`aft_jax.data.packing`) under `packed_mask`,
        each token at its position in its own unpacked sequence."""
        return self._forward(input_ids_rt, packed_mask(segment_ids_rt, branch_ids_rt), positions_rt)[0]

    def prefill(self, input_ids_bt, attention_mask_bt):
        """Hidden states `[B, T, D]` of prompts and a cache of exactly their T slots: what `hidden_states`
        gives with an empty `init_cache(config, B, T)`, without attending to the empty slots."""
        mask_bt = attention_mask_bt.astype(bool)
        positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0)
        hidden_btd, new_kv = self._forward(input_ids_bt, causal_mask(mask_bt), positions_bt, keep_new_kv=True)
        return hidden_btd, KVCache(new_kv[0], new_kv[1], mask_bt, jnp.asarray(mask_bt.shape[1], jnp.int32))

    def _forward(
        self, input_ids_bt, mask_btt, positions_bt, kv=None, cache_mask_bts=None, cache_positions_bs=None,
        keep_new_kv=False,
    ):  # fmt: skip
        """The scanned layers over `T` new tokens at `positions_bt`, attending to each other under `mask_btt`
        and to earlier tokens' keys/values `kv` (`[L, B, S, Hkv, Dh]` each, at `cache_positions_bs`) under
        `cache_mask_bts`, within the window in the config's sliding layers: final-norm hidden states and,
        with `keep_new_kv`, the new tokens' keys/values `[L, B, T, Hkv, Dh]` (else None)."""
        cfg = self.config
        cos_btd, sin_btd = rope_tables(positions_bt, inverse_frequencies(cfg))
        full = windowed = (mask_btt, cache_mask_bts)
        if cfg.sliding_layers:
            w = cfg.sliding_window
            windowed = (
                mask_btt & window_mask(positions_bt, positions_bt, w),
                None if kv is None else cache_mask_bts & window_mask(positions_bt, cache_positions_bs, w),
            )
        mixed = len(cfg.sliding_layers) not in (0, cfg.num_layers)
        sliding_l = jnp.asarray([cfg.window_of(i) is not None for i in range(cfg.num_layers)])

        x_btd = self.embed_tokens(input_ids_bt)
        x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        block_def, block_state = nnx.split(self.layers)

        def layer(x_btd, layer_inputs):
            layer_state, layer_kv, sliding = layer_inputs
            self_mask, cache_mask = windowed  # every layer's (both are `full` without a window)
            if mixed:  # this layer's
                self_mask, cache_mask = jax.tree.map(lambda f, w: jnp.where(sliding, w, f), full, windowed)
            block = nnx.merge(block_def, layer_state)
            x_btd, new_kv = block(x_btd, cos_btd, sin_btd, self_mask, layer_kv, cache_mask)
            x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
            return x_btd, (new_kv if keep_new_kv else None)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
        x_btd, new_kv = jax.lax.scan(layer, x_btd, (block_state, kv, sliding_l))
        return self.final_norm(x_btd), new_kv


def abstract_model(config: ModelConfig) -> CausalLM:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes, dtypes and axis names, no memory."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))


def create_model(config: ModelConfig, *, mesh=None, seed: int = 0, rules=None) -> CausalLM:
    """A randomly initialised model whose weights are created directly in their shardings on `mesh`."""
    mesh = mesh or sharding.single_device_mesh()
    graphdef, abstract_state = nnx.split(abstract_model(config))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    @functools.partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(CausalLM(config, rngs=nnx.Rngs(seed)))[1]

    return nnx.merge(graphdef, init())
