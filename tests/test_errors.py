"""Bad checkpoints fail with errors that name the file or tensor."""

import json

import numpy as np
import pytest
from hf_reference import save_tiny
from safetensors.numpy import load_file, save_file

import aft_jax


def test_missing_config(tmp_path):
    with pytest.raises(aft_jax.CheckpointError, match=r"config\.json: not found"):
        aft_jax.from_pretrained(tmp_path)


def test_not_a_folder_nor_hub_name(tmp_path):
    with pytest.raises(aft_jax.CheckpointError, match="no such folder"):
        aft_jax.from_pretrained(tmp_path / "nope")


def test_unsupported_family_is_refused_naming_the_supported_ones(tmp_path):
    save_tiny("mha_untied", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(aft_jax.ConfigError, match=r"config\.json: unsupported model family.*gemma2") as err:
        aft_jax.from_pretrained(tmp_path)
    for family in ("llama", "mistral", "qwen2", "qwen3 (Qwen3ForCausalLM)"):
        assert family in str(err.value)


def _rewrite(tmp_path, edit):
    file = tmp_path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_wrong_shape_names_file_and_tensor(tmp_path):
    save_tiny("mha_untied", tmp_path)
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, np.zeros((63, 32), np.float32)))
    with pytest.raises(
        aft_jax.CheckpointError,
        match=rf"model\.safetensors: tensor '{name}' has shape \[63, 32\], "
        r"expected \[64, 32\]",
    ):
        aft_jax.from_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_tiny("mha_untied", tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(aft_jax.CheckpointError, match=r"missing tensor 'model\.layers\.2\.self_attn\.k_proj\.weight'"):
        aft_jax.from_pretrained(tmp_path)


def test_pickled_weights_are_refused_unless_allowed(tmp_path):
    import torch

    hf_model = save_tiny("gqa_tied", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(aft_jax.CheckpointError, match=r"pytorch_model\.bin.*allow_pickle=True"):
        aft_jax.from_pretrained(tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path, allow_pickle=True)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), hf_model.model.embed_tokens.weight.detach().numpy())


def test_truncated_safetensors_names_the_file(tmp_path):
    save_tiny("mha_untied", tmp_path)
    file = tmp_path / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(aft_jax.CheckpointError, match=r"model\.safetensors: "):
        aft_jax.from_pretrained(tmp_path)
