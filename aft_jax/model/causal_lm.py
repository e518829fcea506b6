"""The causal LM of every family in `aft_jax.model.families` in Flax NNX, with scanned (optionally
rematerialised) layers.

`CausalLM(input_ids, attention_mask)` returns float32 logits `[B, T, V]`. Default positions come from the
attention mask (`cumsum(mask) - 1`), so left padding does not shift positions. For sampling,
`CausalLM.prefill` gives a batch of prompts' hidden states and keys/values (`KVCache`), and
`CausalLM.decode` runs one new token per row through the layers, each attending to a decode source
(`aft_jax.model.attention.SharedPrompt`, kept by `aft_jax.sampling.decode`): a prefill followed by decode
steps equals the full forward.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.attention import KVSource, OwnTokens, causal_mask, packed_mask, resolve_impl, window_mask
from aft_jax.model.config import ModelConfig
from aft_jax.model.layers import Block, RMSNorm, make_param
from aft_jax.model.packed_attention import packed_plan
from aft_jax.model.rope import inverse_frequencies, rope_tables
from aft_jax.parallel import sharding

_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class KVCache(NamedTuple):
    """What `CausalLM.prefill` keeps of its prompts: keys/values `[L, B, T, Hkv, Dh]`, and `valid_bs` `[B, T]`
    marking the real (non-pad) tokens."""

    keys: jnp.ndarray
    values: jnp.ndarray
    valid_bs: jnp.ndarray


class CausalLM(nnx.Module):
    """Token embedding, `num_layers` scanned decoder blocks, final RMSNorm, (tied or untied) LM head."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = make_param(rngs, config, (config.vocab_size, config.hidden_size), ("vocab", "embed"), None)
        self.layers = Block(config, rngs=rngs, stack=config.num_layers)
        self.final_norm = RMSNorm(config, rngs=rngs)
        if not config.tie_word_embeddings:
            self.lm_head = make_param(rngs, config, (config.hidden_size, config.vocab_size), ("embed", "vocab"), None)

    def __call__(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        return self.logits(self.hidden_states(input_ids_bt, attention_mask_bt, positions_bt))

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

    def hidden_states(self, input_ids_bt, attention_mask_bt=None, positions_bt=None):
        """Final-norm hidden states `[B, T, D]` in the compute dtype."""
        b, t = input_ids_bt.shape
        mask_bt = jnp.ones((b, t), bool) if attention_mask_bt is None else attention_mask_bt.astype(bool)
        if positions_bt is None:
            positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0)
        return self._forward(input_ids_bt, causal_mask(mask_bt), positions_bt)[0]

    def packed_hidden_states(self, input_ids_rt, positions_rt, segment_ids_rt, branch_ids_rt):
        """Final-norm hidden states `[R, T, D]` of packed rows (`aft_jax.data.packing`) under `packed_mask`,
        each token at its position in its own unpacked sequence."""
        mask_rtt = packed_mask(segment_ids_rt, branch_ids_rt)
        return self._forward(input_ids_rt, mask_rtt, positions_rt, packed_ids=(segment_ids_rt, branch_ids_rt))[0]

    def prefill(self, input_ids_bt, attention_mask_bt):
        """Hidden states `[B, T, D]` of left-padded prompts (as `hidden_states`) and their keys and values."""
        mask_bt = attention_mask_bt.astype(bool)
        positions_bt = jnp.maximum(jnp.cumsum(mask_bt, axis=-1) - 1, 0)
        hidden_btd, kv = self._forward(input_ids_bt, causal_mask(mask_bt), positions_bt, keep_kv=True)
        return hidden_btd, KVCache(kv[0], kv[1], mask_bt)

    def decode(self, layers: list[Block], token_b, positions_b, sources: list[KVSource]):
        """float32 logits `[B, V]` of one new token per row (`token_b` at `positions_b`, `[B]`) through `layers`
        (the decoder layers one module each, `aft_jax.sampling.decode.unstack_layers`), layer i attending to
        `sources[i]`; and what each source keeps, per layer."""
        cos_b1d, sin_b1d = rope_tables(positions_b[:, None], inverse_frequencies(self.config))
        x_b1d, kept = self.embed_tokens(token_b[:, None]), []
        for block, source in zip(layers, sources, strict=True):
            x_b1d, layer_kept = block(x_b1d, cos_b1d, sin_b1d, source)
            kept.append(layer_kept)
        return self.logits(self.final_norm(x_b1d)[:, 0]), kept

    def _forward(self, input_ids_bt, mask_btt, positions_bt, keep_kv=False, packed_ids=None):
        """The scanned layers over `T` tokens at `positions_bt`, attending to each other under `mask_btt`
        (within the window in the config's sliding layers): final-norm hidden states and, with `keep_kv`,
        the tokens' keys/values `[L, B, T, Hkv, Dh]` (else None). Packed rows also pass their
        `(segment_ids, branch_ids)`, which the block-sparse kernel takes instead of `mask_btt`."""
        cfg = self.config
        plans = None
        if packed_ids is not None and resolve_impl(cfg.attention, cfg.dtype, cfg.head_dim, packed=True) == "pallas":
            block = cfg.attention_block
            full = packed_plan(*packed_ids, positions_bt, None, block, block)
            windowed = (
                packed_plan(*packed_ids, positions_bt, cfg.sliding_window, block, block) if cfg.sliding_layers else full
            )
            plans = (windowed, full)
        cos_btd, sin_btd = rope_tables(positions_bt, inverse_frequencies(cfg))
        windowed_btt = mask_btt
        if cfg.sliding_layers:
            windowed_btt = mask_btt & window_mask(positions_bt, positions_bt, cfg.sliding_window)
        mixed = len(cfg.sliding_layers) not in (0, cfg.num_layers)
        sliding_l = jnp.asarray([cfg.window_of(i) is not None for i in range(cfg.num_layers)])

        x_btd = self.embed_tokens(input_ids_bt)
        x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
        block_def, block_state = nnx.split(self.layers)

        def layer(x_btd, layer_inputs):
            layer_state, sliding = layer_inputs
            # every layer's mask (`mask_btt` without a window), or this layer's
            block = nnx.merge(block_def, layer_state)
            if plans is None:
                layer_mask_btt = jnp.where(sliding, windowed_btt, mask_btt) if mixed else windowed_btt
                source = OwnTokens(layer_mask_btt, cfg.attention)
            else:  # the windowed plan or the full one, chosen as the masks are
                plan = jax.tree.map(lambda w, f: jnp.where(sliding, w, f), *plans) if mixed else plans[0]
                source = OwnTokens(None, cfg.attention, plan)
            x_btd, kv = block(x_btd, cos_btd, sin_btd, source)
            x_btd = sharding.constrain(x_btd, ("activation_batch", "activation_length", "activation_embed"))
            return x_btd, (kv if keep_kv else None)

        if cfg.remat_policy != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat_policy], prevent_cse=False)
        x_btd, kv = jax.lax.scan(layer, x_btd, (block_state, sliding_l))
        return self.final_norm(x_btd), kv


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
