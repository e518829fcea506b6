"""The static sampling loop: one batch of prompts prefilled together, then a jitted `lax.while_loop` decode
that runs until every row has stopped (the reference the continuous loop, `aft_jax.sampling.continuous`,
is tested against, and `Sampler.sample_ids`).

Each row stops on its own at any EOS id (later positions are `pad_id`); the loop exits as soon as every
row has stopped. Each row's own keys/values live in a cache that grows in up to four steps
(`own_cache_sizes`), so that early steps do not read the empty end of it. Prompts are left-padded;
positions come from the attention mask, so padding does not change what a row generates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aft_jax.parallel import sharding
from aft_jax.sampling.decode import decode_cache, decode_layers, decode_step, grow_decode_cache, unstack_layers
from aft_jax.sampling.next_token import SamplingParams, sample_keys, sample_next


def _decode(
    graphdef, params: SamplingParams, num_samples: int, state, layer_states, prompt_ids_qt, prompt_mask_qt,
    question_ids_q, key,
):  # fmt: skip
    """Prefill each of Q prompts once, then decode `num_samples` rows per prompt (which read the prompt's
    keys/values from one copy, and the weights from `layer_states`, see `decode_layers`) until every row has
    emitted an EOS or `max_new_tokens` are done; draw `(question, sample, step)` uses
    `sample_keys(key, question_ids_q[question], ...)`. Returns `tokens_bn` (B = Q * num_samples, pad after
    EOS) and `lengths_b` (tokens generated, EOS included)."""
    model = nnx.merge(graphdef, state)
    q = prompt_ids_qt.shape[0]
    b, n = q * num_samples, params.max_new_tokens
    hidden_qtd, cache = model.prefill(prompt_ids_qt, prompt_mask_qt)
    last_logits = jnp.repeat(model.logits(hidden_qtd[:, -1]), num_samples, axis=0)
    sizes = own_cache_sizes(n)
    cache = decode_cache(cache, num_samples, sizes[0])
    layers = unstack_layers(model, layer_states)
    eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)
    question_b = jnp.repeat(question_ids_q, num_samples)
    sample_b = jnp.arange(b, dtype=jnp.int32) % num_samples

    def cond(carry, size):
        step, _, _, _, done_b = carry
        return (step < size) & ~jnp.all(done_b)

    def body(carry):
        step, cache, last_logits, tokens_bn, done_b = carry
        keys_b = sample_keys(key, question_b, sample_b, jnp.full((b,), step))
        token_b = jnp.where(done_b, params.pad_id, sample_next(last_logits, keys_b, params))
        tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
        done_b = done_b | jnp.isin(token_b, eos)
        logits_bv, cache = decode_step(model, layers, token_b, cache)
        return step + 1, cache, logits_bv, tokens_bn, done_b

    tokens = jnp.full((b, n), params.pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), cache, last_logits, tokens, jnp.zeros((b,), bool))
    for size in sizes:  # one loop per own-cache size, each until its slots are full
        carry = (carry[0], grow_decode_cache(carry[1], size), *carry[2:])
        carry = jax.lax.while_loop(functools.partial(cond, size=size), body, carry)
    tokens = carry[3]
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
    return tokens, first_eos


def own_cache_sizes(max_new_tokens: int, segments: int = 4, multiple: int = 32) -> list[int]:
    """The sizes each row's own cache grows through while decoding: `max_new_tokens / segments` more at a
    time, rounded up to a multiple of `multiple`. Each step attends to every slot of the current size, so
    early steps read fewer empty ones (at 256 new tokens a step reads 160 slots on average instead of 256);
    each size is one more loop in the compiled program."""
    sizes = (-(-max_new_tokens * i // segments // multiple) * multiple for i in range(1, segments + 1))
    return sorted({min(size, max_new_tokens) for size in sizes})


@functools.lru_cache(maxsize=32)
def _compiled_decode(graphdef, params: SamplingParams, num_samples: int):
    return jax.jit(functools.partial(_decode, graphdef, params, num_samples))


def sample_token_ids(
    model, prompt_ids_qt, prompt_mask_qt, params: SamplingParams, key, num_samples: int = 1, layers=None,
    question_ids=None,
):  # fmt: skip
    """Runs the static loop on left-padded prompts; returns NumPy `(tokens [Q * num_samples, N],
    lengths [Q * num_samples])`, the samples of prompt q in rows `q * num_samples ...`. `question_ids`
    (default `0 ... Q - 1`) name the prompts in the draws' keys; `layers` is `decode_layers(model)`, made
    here when not given."""
    graphdef, state = nnx.split(model)
    mesh = sharding.mesh_of(state)
    ids, mask = (sharding.shard_rows(np.asarray(x, np.int32), mesh) for x in (prompt_ids_qt, prompt_mask_qt))
    question_ids = np.arange(len(prompt_ids_qt)) if question_ids is None else question_ids
    question_ids = sharding.shard_rows(np.asarray(question_ids, np.int32), mesh)
    layers = decode_layers(model) if layers is None else layers
    tokens, lengths = _compiled_decode(graphdef, params, num_samples)(state, layers, ids, mask, question_ids, key)
    return np.asarray(tokens), np.asarray(lengths)
