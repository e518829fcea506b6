"""Sampling with the KV cache: a jitted prefill and a jitted `lax.while_loop` decode.

Each row stops on its own at any EOS id (later positions are `pad_id`); the loop exits as soon as every
row has stopped. Each row's own keys/values live in a cache that grows in up to four steps
(`own_cache_sizes`), so that early steps do not read the empty end of it. Prompts are left-padded;
positions come from the attention mask, so padding does not change what a row generates. `filter_logits`
and `sample_next` are pure and tested on their own; the decode step is `aft_jax.sampling.decode`.

`Sampler(model, tokenizer)` is what the stages receive: `sample` (texts in, texts out) and `sample_ids`
(prompt ids and mask in, tokens and lengths out); `generate` is the one-call form of `Sampler.sample`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aft_jax.parallel import sharding
from aft_jax.sampling.decode import decode_cache, decode_step, grow_decode_cache, unstack_layers


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


def sample_next(logits_bv, rng, params: SamplingParams):
    """The next token per row: argmax at temperature 0, else a draw from softmax(filtered logits / T) by
    inverting the CDF with one uniform number per row (token i covers `[cdf_{i-1}, cdf_i)`, so a token of
    probability 0 is never drawn)."""
    if params.temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = filter_logits(logits_bv.astype(jnp.float32) / params.temperature, params.top_k, params.top_p)
    cdf_bv = jnp.cumsum(jax.nn.softmax(logits_bv, axis=-1), axis=-1)
    u_b1 = jax.random.uniform(rng, (logits_bv.shape[0], 1)) * cdf_bv[:, -1:]
    token_b = jnp.sum(cdf_bv <= u_b1, axis=-1)
    return jnp.minimum(token_b, logits_bv.shape[-1] - 1).astype(jnp.int32)


def _decode(
    graphdef, params: SamplingParams, num_samples: int, state, layer_states, prompt_ids_qt, prompt_mask_qt, rng
):
    """Prefill each of Q prompts once, then decode `num_samples` rows per prompt (which read the prompt's
    keys/values from one copy, and the weights from `layer_states`, see `decode_layers`) until every row has
    emitted an EOS or `max_new_tokens` are done. Returns `tokens_bn` (B = Q * num_samples, pad after EOS)
    and `lengths_b` (tokens generated, EOS included)."""
    model = nnx.merge(graphdef, state)
    q = prompt_ids_qt.shape[0]
    b, n = q * num_samples, params.max_new_tokens
    hidden_qtd, cache = model.prefill(prompt_ids_qt, prompt_mask_qt)
    last_logits = jnp.repeat(model.logits(hidden_qtd[:, -1]), num_samples, axis=0)
    sizes = own_cache_sizes(n)
    cache = decode_cache(cache, num_samples, sizes[0])
    layers = unstack_layers(model, layer_states)
    eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)

    def cond(carry, size):
        step, _, _, _, done_b, _ = carry
        return (step < size) & ~jnp.all(done_b)

    def body(carry):
        step, cache, last_logits, tokens_bn, done_b, rng = carry
        rng, key = jax.random.split(rng)
        token_b = jnp.where(done_b, params.pad_id, sample_next(last_logits, key, params))
        tokens_bn = jax.lax.dynamic_update_slice(tokens_bn, token_b[:, None], (0, step))
        done_b = done_b | jnp.isin(token_b, eos)
        logits_bv, cache = decode_step(model, layers, token_b, cache)
        return step + 1, cache, logits_bv, tokens_bn, done_b, rng

    tokens = jnp.full((b, n), params.pad_id, jnp.int32)
    carry = (jnp.zeros((), jnp.int32), cache, last_logits, tokens, jnp.zeros((b,), bool), rng)
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


@functools.lru_cache(maxsize=8)
def _compiled_unstack(graphdef):
    return jax.jit(lambda state: [nnx.state(layer) for layer in unstack_layers(nnx.merge(graphdef, state))])


def decode_layers(model) -> list:
    """A copy of the decoder weights one array per layer (`decode.unstack_layers`), for `sample_token_ids`:
    made once and passed to every batch, where each call would otherwise copy them again."""
    graphdef, state = nnx.split(model)
    return _compiled_unstack(graphdef)(state)


def sample_token_ids(
    model, prompt_ids_qt, prompt_mask_qt, params: SamplingParams, rng, num_samples: int = 1, layers=None
):
    """Runs the jitted sampler on left-padded prompts; returns NumPy `(tokens [Q * num_samples, N],
    lengths [Q * num_samples])`, the samples of prompt q in rows `q * num_samples ...`. `layers` is
    `decode_layers(model)`, made here when not given."""
    graphdef, state = nnx.split(model)
    mesh = sharding.mesh_of(state)
    ids, mask = (sharding.shard_rows(np.asarray(x, np.int32), mesh) for x in (prompt_ids_qt, prompt_mask_qt))
    layers = decode_layers(model) if layers is None else layers
    tokens, lengths = _compiled_decode(graphdef, params, num_samples)(state, layers, ids, mask, rng)
    return np.asarray(tokens), np.asarray(lengths)


class Sampler:
    """Samples completions from `model`, made once per model and tokenizer and passed to what samples
    (`aft_jax.stages.sample`, `aft_jax.stages.evaluate`). Stops at the model's and the tokenizer's EOS ids and
    pads with the tokenizer's pad id (else the first EOS id). Texts are decoded `batch_size // num_samples`
    prompts (at least one) at a time, left-padded to a multiple of `pad_multiple`; the samples of a prompt
    share one prefill. Each call copies the decoder weights once (`decode_layers`), so the model may change
    between calls."""

    def __init__(self, model, tokenizer, *, batch_size: int = 32, pad_multiple: int = 64):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.pad_multiple = batch_size, pad_multiple

    def params(self, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
        """The `SamplingParams` of these settings with this sampler's EOS and pad ids."""
        return sampling_params(self.model, self.tokenizer, max_new_tokens, temperature, top_k, top_p)

    def sample(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """`num_samples` completions per prompt (text after the prompt, without the EOS), seeded; prompts are
        tokenised as the tokenizer does by default (BOS included where it adds one)."""
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        params = self.params(max_new_tokens, temperature, top_k, top_p)
        per_batch = max(1, self.batch_size // num_samples)
        rng = jax.random.key(seed)
        layers = decode_layers(self.model)
        results: list[list[str]] = []
        for start in range(0, len(prompts), per_batch):
            chunk = encoded[start : start + per_batch]
            ids, mask = left_pad(chunk, per_batch, params.pad_id, self.pad_multiple)
            key = jax.random.fold_in(rng, start)
            tokens, lengths = sample_token_ids(self.model, ids, mask, params, key, num_samples, layers)
            for q in range(len(chunk)):
                rows = range(q * num_samples, (q + 1) * num_samples)
                texts = [decode_completion(self.tokenizer, tokens[r], lengths[r], params.eos_ids) for r in rows]
                results.append(texts)
        return results

    def sample_ids(
        self,
        prompt_ids_qt,
        prompt_mask_qt,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ):
        """`sample_token_ids` on left-padded prompts as one batch, with this sampler's EOS and pad ids and the
        key `jax.random.key(seed)`: NumPy `(tokens [Q * num_samples, N], lengths [Q * num_samples])`."""
        params = self.params(max_new_tokens, temperature, top_k, top_p)
        return sample_token_ids(self.model, prompt_ids_qt, prompt_mask_qt, params, jax.random.key(seed), num_samples)


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    pad_multiple: int = 64,
) -> list[list[str]]:
    """`num_samples` completions per prompt, seeded: `Sampler(model, tokenizer, ...).sample(prompts, ...)`."""
    sampler = Sampler(model, tokenizer, batch_size=batch_size, pad_multiple=pad_multiple)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return sampler.sample(prompts, num_samples=num_samples, seed=seed, **settings)


def sampling_params(model, tokenizer, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
    eos_ids = tuple(sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return SamplingParams(int(max_new_tokens), float(temperature), int(top_k), float(top_p), eos_ids, int(pad_id))


def left_pad(sequences: list[list[int]], rows: int, pad_id: int, multiple: int = 1):
    """`(ids [rows, T], mask [rows, T])`, each sequence right-aligned; missing rows are a single pad token
    (masked out), so the batch shape, and the compiled program, stay fixed."""
    longest = max(len(s) for s in sequences)
    t = -(-longest // multiple) * multiple
    ids = np.full((rows, t), pad_id, np.int32)
    mask = np.zeros((rows, t), np.int32)
    for r, seq in enumerate(sequences):
        ids[r, t - len(seq) :] = seq
        mask[r, t - len(seq) :] = 1
    mask[len(sequences) :, -1] = 1  # a filler row still needs one visible token
    return ids, mask


def decode_completion(tokenizer, tokens_n, length: int, eos_ids) -> str:
    kept = [int(t) for t in tokens_n[:length] if int(t) not in eos_ids]
    return tokenizer.decode(kept, skip_special_tokens=True)
