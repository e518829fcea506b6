"""The sampler's cache path equals the full forward: `CausalLM.prefill` gives the forward's hidden states, and
a prefill followed by one-token decode steps (`aft_jax.sampling.decode`: a prompt cache read by its rows, own
caches per row, unstacked layers) gives each row the logits of a full forward over its prompt plus
continuation, for every family (the sliding windows of 4, 3 and 5 slide over prompt and own slots here;
Qwen3's decode against `generate` is in test_families)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_reference import FAMILY_CONFIGS, padded_batch, save_tiny

import aft_jax
from aft_jax.sampling.decode import decode_cache, decode_step, grow_decode_cache, unstack_layers


def decoded_logits(model, prompt_ids, prompt_mask, continuation, rows_per_prompt, grow_at=None):
    """float32 logits `[B, steps, V]` of decoding `continuation` (`[B, steps]`, B = Q * rows_per_prompt) after
    prefilling the prompts, compiled with the layers unstacked as the sampler runs it; the own caches start
    with `grow_at` slots (all `steps` when None) and grow to `steps` before step `grow_at`."""
    steps = continuation.shape[1]
    _, cache = model.prefill(prompt_ids, prompt_mask)
    cache = decode_cache(cache, rows_per_prompt, grow_at or steps)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, token_b, cache):
        model = nnx.merge(graphdef, state)
        return decode_step(model, unstack_layers(model), token_b, cache)

    decoded = []
    for j in range(steps):
        if j == grow_at:
            cache = grow_decode_cache(cache, steps)
        logits, cache = step(state, jnp.asarray(continuation[:, j]), cache)
        decoded.append(np.asarray(logits))
    return np.stack(decoded, axis=1)


def full_logits(model, prompt_ids, prompt_mask, continuation, rows_per_prompt):
    """The full forward's logits at the continuation's positions, each row its prompt plus continuation."""
    row_ids = np.concatenate([np.repeat(prompt_ids, rows_per_prompt, 0), continuation], axis=1)
    row_mask = np.concatenate([np.repeat(prompt_mask, rows_per_prompt, 0), np.ones_like(continuation)], axis=1)
    return np.asarray(model(row_ids, row_mask))[:, prompt_ids.shape[1] :]


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", *FAMILY_CONFIGS])
def test_prefill_then_decode_equals_full_forward(tmp_path, name):
    """Three left-padded prompts (7, 4 and 1 tokens), one row each, 6 decode steps."""
    save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    prompt_ids, prompt_mask = padded_batch(rng, 97, [7, 4, 1], "left")
    continuation = rng.integers(0, 97, (3, 6)).astype(np.int32)
    decoded = decoded_logits(model, prompt_ids, prompt_mask, continuation, rows_per_prompt=1)
    np.testing.assert_allclose(decoded, full_logits(model, prompt_ids, prompt_mask, continuation, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope", "qwen2_window", "mistral_window"])
def test_shared_prompt_decode_equals_full_forward(tmp_path, name):
    """Three rows continue each of two left-padded prompts with their own tokens, reading one prompt copy;
    their own caches grow midway (as the sampler's do) from 2 to 5 slots."""
    save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    rng = np.random.default_rng(5)
    prompt_ids, prompt_mask = padded_batch(rng, 97, [7, 4], "left")
    continuation = rng.integers(0, 97, (2 * 3, 5)).astype(np.int32)
    decoded = decoded_logits(model, prompt_ids, prompt_mask, continuation, rows_per_prompt=3, grow_at=2)
    np.testing.assert_allclose(decoded, full_logits(model, prompt_ids, prompt_mask, continuation, 3), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gqa_tied", "qwen3_head_dim"])
def test_prefill_equals_the_forward(tmp_path, name):
    """The prefill's hidden states are the forward's (the same program: bit for bit), its keys and values one
    `[L, B, T, Hkv, Dh]` block per prompt token, its mask the attention mask."""
    save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    ids, mask = padded_batch(np.random.default_rng(4), 97, [9, 3, 6], "left")
    hidden = model.hidden_states(ids, mask)
    prefill_hidden, cache = model.prefill(ids, mask)
    real = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(prefill_hidden)[real], np.asarray(hidden)[real])
    cfg = model.config
    assert cache.keys.shape == cache.values.shape == (cfg.num_layers, 3, ids.shape[1], cfg.num_kv_heads, cfg.head_dim)
    np.testing.assert_array_equal(cache.valid_bs, real)
