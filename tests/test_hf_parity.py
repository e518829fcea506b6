"""Logits of aft_jax against transformers' LlamaForCausalLM (torch, float32) on tiny random checkpoints."""

import numpy as np
import pytest
from hf_reference import TINY_CONFIGS, hf_logits, padded_batch, save_tiny

import aft_jax
from aft_jax.model import families


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers(tmp_path, name, side):
    hf_model = save_tiny(name, tmp_path)
    model, tokenizer = aft_jax.from_pretrained(tmp_path)
    assert tokenizer is None
    ids, mask = padded_batch(np.random.default_rng(1), 97, [11, 7, 3], side)
    expected = hf_logits(hf_model, ids, mask)
    got = np.asarray(model(ids, mask))
    assert got.dtype == np.float32 and got.shape == expected.shape
    real = mask.astype(bool)
    assert np.max(np.abs(got[real] - expected[real])) <= 1e-4


def test_config_fields_come_from_hf(tmp_path):
    save_tiny("llama3_rope", tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    cfg = model.config
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 1, 8)
    assert cfg.eos_token_ids == (5, 7)
    assert cfg.rope_scaling.rope_type == "llama3" and cfg.rope_scaling.factor == 8.0
    assert families.config_from_hf(families.config_to_hf(cfg)) == cfg


def test_bfloat16_parameters_and_compute(tmp_path):
    hf_model = save_tiny("gqa_tied", tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path, dtype="bfloat16")
    assert model.embed[...].dtype == np.dtype("bfloat16") and model.config.dtype == "bfloat16"
    ids, mask = padded_batch(np.random.default_rng(2), 97, [9, 6], "right")
    got = np.asarray(model(ids, mask))
    assert got.dtype == np.float32, "logits stay float32"
    expected = hf_logits(hf_model, ids, mask)
    real = mask.astype(bool)
    scale = np.abs(expected[real]).max()
    assert np.max(np.abs(got[real] - expected[real])) <= 0.05 * scale  # bfloat16 has 8 bits of mantissa
    mixed, _ = aft_jax.from_pretrained(tmp_path, dtype="float32", compute_dtype="bfloat16")
    assert mixed.embed[...].dtype == np.float32 and np.asarray(mixed(ids, mask)).dtype == np.float32
