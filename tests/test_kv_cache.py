"""Prefill plus one-token-at-a-time decoding through the KV cache equals the full forward."""

import numpy as np
import pytest

import aft_jax
from hf_reference import padded_batch, save_tiny


@pytest.mark.parametrize("name", ["gqa_tied", "llama3_rope"])
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
