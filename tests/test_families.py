"""The families beyond Llama (Qwen2's q/k/v biases and mixed sliding layers, Qwen3's q/k norms and head_dim,
Mistral's window) against transformers: greedy sampling, the window itself, the export, sharding, and the
errors for options a family does not have. Logits with left and right padding are in test_hf_parity, the KV
cache in test_kv_cache, the round trip in test_roundtrip, an unknown family in test_errors; all run every
family."""

import json

import jax
import numpy as np
import pytest
from hf_reference import FAMILY_CONFIGS, hf_logits, padded_batch, save_tiny

import aft_jax
from aft_jax.model import families
from aft_jax.parallel import sharding
from aft_jax.sampling.continuous import sample_continuous
from aft_jax.sampling.next_token import SamplingParams
from aft_jax.sampling.static import sample_token_ids


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_greedy_sampling_equals_transformers_generate(tmp_path, name):
    """Prompts of 6 and 3 tokens and 10 new ones: the windows (4, 3 and 5) slide in the prefill and in decoding,
    over the prompt and over the generated tokens, in both sampling loops (Qwen3: 3, on its first layer only)."""
    import torch

    hf_model = save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    ids, mask = padded_batch(np.random.default_rng(7), 97, [6, 3], "left")
    params = SamplingParams(max_new_tokens=10, eos_ids=(), pad_id=0)
    with torch.no_grad():
        out = hf_model.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=10, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )  # fmt: skip
    expected = out[:, ids.shape[1] :].numpy()
    static, _ = sample_token_ids(model, ids, mask, params, jax.random.key(0))
    np.testing.assert_array_equal(static, expected)
    # two rows for two prompts: the second prompt's slot starts once the first is done (ring columns reused)
    continuous = sample_continuous(model, ids, mask, params, jax.random.key(0), rows=1)
    np.testing.assert_array_equal(continuous.tokens, expected)


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_the_window_changes_logits_beyond_it_and_matches_transformers(tmp_path, name):
    hf_model = save_tiny(name, tmp_path)
    model, _ = aft_jax.from_pretrained(tmp_path)
    window = model.config.sliding_window
    ids, mask = padded_batch(np.random.default_rng(8), 97, [12, 9], "right")
    windowed = np.asarray(model(ids, mask))
    causal_model, _ = aft_jax.from_pretrained(tmp_path, sliding_window=None, sliding_layers=())
    causal = np.asarray(causal_model(ids, mask))
    np.testing.assert_allclose(windowed[:, :window], causal[:, :window], atol=1e-5, rtol=0)
    assert np.abs(windowed[:, window:] - causal[:, window:]).max() > 1e-2, "the window must change later logits"
    real = mask.astype(bool)
    assert np.abs(windowed[real] - hf_logits(hf_model, ids, mask)[real]).max() <= 1e-4


def test_a_window_longer_than_the_sequence_is_causal_attention(tmp_path):
    save_tiny("mistral_window", tmp_path)
    wide, _ = aft_jax.from_pretrained(tmp_path, sliding_window=12)
    causal, _ = aft_jax.from_pretrained(tmp_path, sliding_window=None, sliding_layers=())
    ids, mask = padded_batch(np.random.default_rng(9), 97, [12, 5], "left")
    np.testing.assert_array_equal(np.asarray(wide(ids, mask)), np.asarray(causal(ids, mask)))


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_export_keeps_the_family_and_loads_in_transformers_with_identical_logits(tmp_path, name):
    from transformers import AutoModelForCausalLM

    hf_model = save_tiny(name, tmp_path / "src")
    model, _ = aft_jax.from_pretrained(tmp_path / "src")
    aft_jax.save_pretrained(model, None, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(hf_model)
    for key in ("sliding_window", "layer_types", "num_key_value_heads", "tie_word_embeddings"):
        assert getattr(reloaded.config, key, None) == getattr(hf_model.config, key, None), key
    ids, mask = padded_batch(np.random.default_rng(0), 97, [11, 6], "left")
    np.testing.assert_array_equal(hf_logits(reloaded, ids, mask), hf_logits(hf_model, ids, mask))
    assert families.config_from_hf(families.config_to_hf(model.config)) == model.config


@pytest.mark.parametrize("name", FAMILY_CONFIGS)
def test_sharded_forward_equals_one_device(tmp_path, name):
    save_tiny(name, tmp_path)
    single, _ = aft_jax.from_pretrained(tmp_path)
    mesh = sharding.make_mesh((1, 2, 4))
    sharded, _ = aft_jax.from_pretrained(tmp_path, mesh=mesh)
    if single.config.qkv_bias:  # 4 query heads split over the 4-way tensor axis, like q_proj's
        assert sharded.layers.attn.q_bias[...].sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    ids, mask = padded_batch(np.random.default_rng(1), 97, [9, 4, 7, 2, 9, 5, 8, 3], "left")
    batch = sharding.batch_sharding(mesh, 2)
    with sharding.use_mesh(mesh):
        got = np.asarray(sharded(jax.device_put(ids, batch), jax.device_put(mask, batch)))
    np.testing.assert_allclose(got, np.asarray(single(ids, mask)), atol=1e-5, rtol=0)


def test_eos_ids_come_from_config_and_generation_config(tmp_path):
    """config.json's ids first, then generation_config.json's new ones (an instruct model's `<|im_end|>`
    and its base's `<|endoftext|>`)."""
    save_tiny("qwen3_head_dim", tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config, "eos_token_id": [11, 5]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 11]}))
    model, _ = aft_jax.from_pretrained(tmp_path)
    assert model.config.eos_token_ids == (11, 5, 2)


def test_keys_left_out_take_the_familys_transformers_defaults():
    """A config.json without EOS, head_dim or sliding keys reads as transformers' config class would."""
    import transformers

    sizes = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    for name in ("llama", "mistral", "qwen2", "qwen3"):
        expected = transformers.AutoConfig.for_model(name, **sizes)
        cfg = families.config_from_hf({"model_type": name, **sizes})
        assert cfg.eos_token_ids == families.eos_ids(expected.eos_token_id), name
        assert cfg.bos_token_id == expected.bos_token_id, name
        assert cfg.head_dim == (getattr(expected, "head_dim", None) or 8), name
        assert cfg.max_position_embeddings == expected.max_position_embeddings, name
        assert cfg.sliding_window == (4096 if name == "mistral" else None), name
    qwen = {"model_type": "qwen2", **sizes, "use_sliding_window": True}
    assert families.config_from_hf({**qwen, "max_window_layers": 2}).sliding_window is None  # no layer slides
    assert families.config_from_hf(qwen).sliding_window is None  # max_window_layers 28 > 2 layers
    assert families.config_from_hf({**qwen, "max_window_layers": 1}).sliding_layers == (1,)


def test_options_a_family_does_not_have_are_refused():
    base = families.config_to_hf(
        aft_jax.ModelConfig(
            vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
        )
    )
    with pytest.raises(aft_jax.ConfigError, match="attention_bias=true"):
        families.config_from_hf({**base, "attention_bias": True})
    qwen3 = {**base, "model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]}
    with pytest.raises(aft_jax.ConfigError, match="q/k/v/o"):
        families.config_from_hf({**qwen3, "attention_bias": True})
    with pytest.raises(aft_jax.ConfigError, match="layer_types"):
        families.config_from_hf({**qwen3, "use_sliding_window": True, "layer_types": ["full_attention"]})
    mixed = families.config_from_hf({**qwen3, "use_sliding_window": True, "max_window_layers": 1})
    assert mixed.sliding_layers == (1,) and mixed.sliding_window == 4096
    with pytest.raises(aft_jax.ConfigError, match="every layer"):
        families.config_to_hf(mixed.replace(family="mistral"))
    with pytest.raises(aft_jax.ConfigError, match="needs the layers it slides over"):
        mixed.replace(sliding_layers=())
    with pytest.raises(aft_jax.ConfigError, match="not increasing layer indices"):
        mixed.replace(sliding_layers=(1, 1))
