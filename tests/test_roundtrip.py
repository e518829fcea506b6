"""HF -> aft_jax -> HF is lossless, the export loads in transformers, and Orbax conversion round-trips."""

import numpy as np
import pytest
from hf_reference import FAMILY_CONFIGS, hf_logits, padded_batch, save_tiny
from safetensors.numpy import load_file

import aft_jax
from aft_jax import cli


def _hf_tensors(directory):
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("name", ["mha_untied", "gqa_tied", *FAMILY_CONFIGS])
def test_hf_roundtrip_is_bit_identical(tmp_path, name):
    save_tiny(name, tmp_path / "src")
    model, _ = aft_jax.from_pretrained(tmp_path / "src")
    aft_jax.save_pretrained(model, None, tmp_path / "out")
    src, out = _hf_tensors(tmp_path / "src"), _hf_tensors(tmp_path / "out")
    src.pop("lm_head.weight", None) if model.config.tie_word_embeddings else None
    assert sorted(src) == sorted(out)
    for key in src:
        assert src[key].dtype == out[key].dtype
        np.testing.assert_array_equal(src[key], out[key], err_msg=key)


def test_export_loads_in_transformers_with_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("llama3_rope", tmp_path / "src")
    model, _ = aft_jax.from_pretrained(tmp_path / "src")
    aft_jax.save_pretrained(model, None, tmp_path / "out", max_shard_bytes=40_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").exists(), "small shards force an index"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = padded_batch(np.random.default_rng(0), 97, [9, 5], "left")
    np.testing.assert_array_equal(
        hf_logits(reloaded, ids, mask),
        hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval(), ids, mask),
    )


def test_convert_cli_orbax_roundtrip(tmp_path, smollm2_dir):
    cli.main(["convert", "--to", "orbax", str(smollm2_dir), str(tmp_path / "orbax")])
    assert (tmp_path / "orbax" / "params").is_dir() and (tmp_path / "orbax" / "tokenizer.json").exists()
    restored, tokenizer = aft_jax.from_pretrained(tmp_path / "orbax")
    assert tokenizer is not None
    cli.main(["convert", "--to", "hf", str(tmp_path / "orbax"), str(tmp_path / "hf")])
    src, out = _hf_tensors(smollm2_dir), _hf_tensors(tmp_path / "hf")
    assert sorted(src) == sorted(out)
    for key in src:
        np.testing.assert_array_equal(src[key], out[key], err_msg=key)


def test_convert_cli_keeps_the_family(tmp_path):
    """A Qwen2 checkpoint (biases, sliding layers) through an Orbax model folder and back."""
    save_tiny("qwen2_window", tmp_path / "src")
    cli.main(["convert", "--to", "orbax", str(tmp_path / "src"), str(tmp_path / "orbax")])
    restored, _ = aft_jax.from_pretrained(tmp_path / "orbax")
    source, _ = aft_jax.from_pretrained(tmp_path / "src")
    assert restored.config == source.config and restored.config.family == "qwen2"
    cli.main(["convert", "--to", "hf", str(tmp_path / "orbax"), str(tmp_path / "hf")])
    src, out = _hf_tensors(tmp_path / "src"), _hf_tensors(tmp_path / "hf")
    assert sorted(src) == sorted(out) and any(name.endswith("q_proj.bias") for name in out)
    for key in src:
        np.testing.assert_array_equal(src[key], out[key], err_msg=key)
