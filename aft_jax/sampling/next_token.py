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
    softmax(filtered logits / T) by inverting the CDF with one uniform number from each row's key (token i
    covers `[cdf_{i-1}, cdf_i)`, so a token of probability 0 is never drawn)."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv.astype(jnp.float32) / params.temperature, params.top_k, params.top_p)
    cdf_bv = jnp.cumsum(jax.nn.softmax(logits_bv, axis=-1), axis=-1)
    u_b1 = jax.vmap(jax.random.uniform)(keys_b)[:, None] * cdf_bv[:, -1:]
    token_b = jnp.sum(cdf_bv <= u_b1, axis=-1)
    return jnp.minimum(token_b, logits_bv.shape[-1] - 1).astype(jnp.int32)
