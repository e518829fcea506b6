"""`aft-jax plan`: memory from an ahead-of-time compilation grows with batch and sequence length."""

import pytest
from conftest import REPO

from aft_jax.config.load import load_config
from aft_jax.stages.plan import plan_memory, recommend


@pytest.fixture(scope="module")
def config():
    # small logit chunks, so activations rather than one chunk of vocabulary logits dominate
    return load_config(REPO / "configs" / "tiny.py", ["train.mesh=1,4,2", "loss.method=aft", "loss.logit_chunk=16"])


def test_memory_grows_with_batch_and_sequence(config):
    small = plan_memory(config, batch_size=8, seq_len=128)
    longer = plan_memory(config, batch_size=8, seq_len=256)
    bigger = plan_memory(config, batch_size=16, seq_len=128)
    assert small.devices == 8 and "fsdp=4" in small.mesh
    assert longer.temporaries_gb > 1.3 * small.temporaries_gb
    assert bigger.temporaries_gb > 1.3 * small.temporaries_gb
    assert small.params_gb == longer.params_gb == bigger.params_gb > 0
    # Adam keeps two moments per parameter, sharded like the parameters
    assert small.optimizer_gb == pytest.approx(2 * small.params_gb, rel=0.01)
    assert recommend(small, 80.0, config).startswith("fits")
    assert recommend(small, small.total_gb / 2, config).startswith("does not fit")


def test_the_packed_plan_counts_each_prompt_once(config):
    """K = 4 candidates of 128 tokens, 64 of them the prompt: a packed group is 63 + 4 x 65 = 323 tokens; each of
    the 4 batch shards packs its 2 groups into one row of 646 tokens, rounded up to a multiple of pad_multiple."""
    assert config.data.group_size == 4 and config.data.tokens_per_row >= 646
    padded = plan_memory(config.replace(data={"layout": "padded"}), batch_size=8, seq_len=128, prompt_len=64)
    packed = plan_memory(config, batch_size=8, seq_len=128, prompt_len=64)
    assert padded.computed_tokens == 8 * 4 * 128
    multiple = config.data.pad_multiple
    assert packed.layout == "packed" and packed.computed_tokens == 4 * (-(-646 // multiple) * multiple)
    assert packed.temporaries_gb > 0  # (more than padded here: this tiny model's attention outweighs the rest)


@pytest.mark.parametrize(
    "hub_name, billions",
    [
        ("Qwen/Qwen2.5-0.5B-Instruct", 0.494),
        ("Qwen/Qwen2.5-1.5B-Instruct", 1.54),
        ("Qwen/Qwen2.5-7B-Instruct", 7.62),
        ("Qwen/Qwen3-8B", 8.19),
        ("meta-llama/Llama-2-7b-hf", 6.74),
        ("meta-llama/Llama-3.2-1B", 1.24),
    ],
)
def test_known_models_have_their_model_cards_parameter_counts(hub_name, billions):
    """The shapes `plan` uses for a hub id without downloading it give the count its model card states."""
    import jax
    from flax import nnx

    from aft_jax.model.causal_lm import abstract_model
    from aft_jax.model.config import ModelConfig
    from aft_jax.stages.plan import KNOWN_MODELS

    params = nnx.state(abstract_model(ModelConfig(**KNOWN_MODELS[hub_name])), nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert count / 1e9 == pytest.approx(billions, rel=0.005)
