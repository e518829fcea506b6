"""Prefill plus one-token-at-a-time decoding through the KV cache equals the full forward (every family; the
sliding windows of 4, 3 and 5 slide over cache slots here; Qwen3's decode against `generate` is in
test_families)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import FAMILY_CONFIGS, padded_batch, save_tiny

import aft_jax
from aft_jax.sampling.decode import decode_cache, decode_step, grow_decode_cache, unstack_layers


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", *FAMILY_CONFIGS])
def test_prefill_then_incremental_equals_full_forward(tmp_path, name):
    save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    ids, mask = padded_batch(np.random.default_rng(3), 97, [10, 6, 4], "left")
    full = np.asarray(model(ids, mask))

    prompt_len = 5
    cache = aft_jax.init_cache(model.config, batch_size=3, max_length=16)
    logits, cache = model(ids[:, :prompt_len], mask[:, :prompt_len], cache=cache)
    steps = [np.asarray(logits)]
    for t in range(prompt_len, ids.shape[1]):
        logits, cache = model(ids[:, t : t + 1], mask[:, t : t + 1], cache=cache)
        steps.append(np.asarray(logits))
    incremental = np.concatenate(steps, axis=1)
    assert int(cache.end) == ids.shape[1]
    real = mask.astype(bool)
    np.testing.assert_allclose(incremental[real], full[real], atol=1e-5, rtol=0)


def test_prefill_equals_hidden_states_with_an_empty_cache(tmp_path):
    save_tiny("gqa_tied", tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    ids, mask = padded_batch(np.random.default_rng(4), 97, [9, 3, 6], "left")
    empty = aft_jax.init_cache(model.config, batch_size=3, max_length=ids.shape[1])
    hidden, cache = model.hidden_states(ids, mask, cache=empty)
    prefill_hidden, prefill_cache = model.prefill(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(prefill_hidden)[real], np.asarray(hidden)[real], atol=1e-5, rtol=0)
    for got, want in ((prefill_cache.keys, cache.keys), (prefill_cache.values, cache.values)):
        np.testing.assert_allclose(np.asarray(got)[:, real], np.asarray(want)[:, real], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(prefill_cache.valid_bs, cache.valid_bs)
    assert int(prefill_cache.end) == int(cache.end) == ids.shape[1]


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", "qwen2_window", "mistral_window"])
def test_shared_prompt_decode_equals_full_forward(tmp_path, name):
    """Three rows continue each of two left-padded prompts with their own tokens; the decode path (one
    prompt cache read by its rows, own caches per row that grow midway, unstacked layers) gives each row the
    logits of a full forward over its prompt plus continuation."""
    save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(5)
    prompt_ids, prompt_mask = padded_batch(rng, 97, [7, 4], "left")
    rows_per_prompt, steps = 3, 5
    continuation = rng.integers(0, 97, (2 * rows_per_prompt, steps)).astype(np.int32)

    _, cache = model.prefill(prompt_ids, prompt_mask)
    cache = decode_cache(cache, rows_per_prompt, 2)
    graphdef, state = nnx.split(model)

    @jax.jit  # as the sampler runs it: compiled, the layers unstacked
    def step(state, token_b, cache):
        model = nnx.merge(graphdef, state)
        return decode_step(model, unstack_layers(model), token_b, cache)

    decoded = []
    for j in range(steps):
        if j == 2:  # the own caches grow (as the sampler's do) from 2 to `steps` slots
            cache = grow_decode_cache(cache, steps)
        logits, cache = step(state, jnp.asarray(continuation[:, j]), cache)
        decoded.append(np.asarray(logits))
    decoded = np.stack(decoded, axis=1)

    row_ids = np.concatenate([np.repeat(prompt_ids, rows_per_prompt, 0), continuation], axis=1)
    row_mask = np.concatenate([np.repeat(prompt_mask, rows_per_prompt, 0), np.ones_like(continuation)], axis=1)
    full = np.asarray(model(row_ids, row_mask))[:, prompt_ids.shape[1] :]
    np.testing.assert_allclose(decoded, full, atol=1e-5, rtol=0)
