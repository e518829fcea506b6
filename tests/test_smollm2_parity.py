"""The real SmolLM2-135M checkpoint: aft_jax logits against transformers on real GSM8K questions."""

import numpy as np
import pytest

import aft_jax


@pytest.fixture(scope="module")
def both_models(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    model, tokenizer = aft_jax.from_pretrained(smollm2_dir)
    return hf_model, model, tokenizer


def test_real_checkpoint_logits_and_argmax(both_models, gsm8k_test_questions):
    from hf_reference import hf_logits

    hf_model, model, tokenizer = both_models
    assert model.config.num_layers == 30 and model.config.tie_word_embeddings
    texts = [q["question"] for q in gsm8k_test_questions[:4]]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1], "the batch should contain padding"
    expected = hf_logits(hf_model, ids, mask)
    got = np.asarray(model(ids, mask))
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - expected[real])) <= 1e-3
    np.testing.assert_array_equal(got[real].argmax(-1), expected[real].argmax(-1))
