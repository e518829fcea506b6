"""The next token of each row, pure: filtering (top-k, top-p), the draw, and the key of every draw.

Every draw has its own key, `sample_keys(key, question_b, sample_b, step_b)`: the key of `(question,
sample index, step)` folded into the call's key. What a sample draws thus depends only on which sample it
is, never on the row it runs in, the batch it runs with or when it starts; the static and the continuous
loops (`aft_jax.sampling.static`, `aft_jax.sampling.continuous`) give the same samples.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingParams(NamedTuple):
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0


def filter_logits(logits_bv, top_k: int = 0, top_p: float = 1.0):
    """Sets to -inf every token outside the top `top_k` (exactly k, ties by index) and outside the smallest
    set of most probable tokens whose probability reaches `top_p`."""
    if top_k > 0 and top_k < logits_bv.shape[-1]:
        _, keep_idx = jax.lax.top_k(logits_bv, top_k)
        keep = jnp.zeros(logits_bv.shape, bool).at[jnp.arange(logits_bv.shape[0])[:, None], keep_idx].set(True)
        logits_bv = jnp.where(keep, logits_bv, -jnp.inf)
    if top_p < 1.0:
        order = jnp.argsort(-logits_bv, axis=-1, stable=True)
        sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = mass_before < top_p
        keep = jnp.zeros(logits_bv.shape, bool).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(keep_sorted)
        logits_bv = jnp.where(keep, logits_bv, -jnp.inf)
    return logits_bv


def sample_keys(key, question_b, sample_b, step_b):
    """The key of each row's draw: `fold_in(fold_in(fold_in(key, question), sample), step)`."""

    def one(question, sample, step):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, question), sample), step)

    return jax.vmap(one)(question_b, sample_b, step_b)


def sample_next(logits_bv, keys_b, params: SamplingParams):
    """The next token per row: argmax at temperature 0 (`keys_b` unused), else a draw from
    softmax(filtered logits / T) by inverting its CDF with one uniform number from each row's key
    (`inverse_cdf`)."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv.astype(jnp.float32) / params.temperature, params.top_k, params.top_p)
    return inverse_cdf(logits_bv, jax.vmap(jax.random.uniform)(keys_b))


def inverse_cdf(logits_bv, u_b, block: int = 256):
    """Token i of each row with `cdf_{i-1} <= u * cdf_V < cdf_i`, the CDF of `exp(logits - max)` in token
    order (so a token of weight 0, a logit of -inf, is never drawn), `u` in [0, 1).

    The search runs in two levels, so no pass over the vocabulary is a cumulative sum (a long scan in XLA):
    the block of `block` tokens where the cumulative block masses pass `u * cdf_V`, then the token within
    it by the cumulative sum of its `block` weights. The bounds of both searches are clamped to tokens of
    non-zero weight, which only a rounding at a block's edge could otherwise pass."""
    b, v = logits_bv.shape
    n = -(-v // block)
    top_b1 = jnp.max(logits_bv, axis=-1, keepdims=True)
    logits_bnc = jnp.pad(logits_bv, ((0, 0), (0, n * block - v)), constant_values=-jnp.inf).reshape(b, n, block)
    mass_bn = jnp.sum(jnp.exp(logits_bnc - top_b1[:, :, None]), axis=-1)
    cum_bn = jnp.cumsum(mass_bn, axis=-1)
    target_b1 = u_b[:, None] * cum_bn[:, -1:]
    block_b = jnp.minimum(jnp.sum(cum_bn <= target_b1, axis=-1), _last_nonzero(mass_bn))
    before_b1 = jnp.take_along_axis(jnp.pad(cum_bn, ((0, 0), (1, 0))), block_b[:, None], axis=-1)
    weights_bc = jnp.exp(jnp.take_along_axis(logits_bnc, block_b[:, None, None], axis=1)[:, 0] - top_b1)
    within_b = jnp.sum(jnp.cumsum(weights_bc, axis=-1) <= target_b1 - before_b1, axis=-1)
    return (block_b * block + jnp.minimum(within_b, _last_nonzero(weights_bc))).astype(jnp.int32)


def _last_nonzero(x_bn):
    """Index of the last positive entry of each row."""
    n = x_bn.shape[-1]
    return n - 1 - jnp.argmax(x_bn[:, ::-1] > 0, axis=-1)
