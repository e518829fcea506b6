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


def test_a_lora_plan_counts_adapters_optimizer_state_and_the_nf4_base():
    """On one device, per-device bytes are the model's: a LoRA plan's optimizer state is Adam's two float32
    moments of the adapters only (plus its step counts), and an NF4 base holds each projection weight in
    half a byte with a float32 scale per 64 of them, the embeddings and norms staying in param_dtype."""
    d, f, heads, kv, dh, layers, vocab, rank = 64, 128, 2, 1, 64, 2, 320, 4
    shape = dict(hidden_size=d, intermediate_size=f, num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=dh)
    overrides = ["train.mesh=1,1,1", "loss.method=aft", *(f"model.random.{k}={v}" for k, v in shape.items())]

    def config(*more: str):
        return load_config(REPO / "configs" / "tiny.py", [*overrides, *more])

    full_config, lora_config = config(), config(f"model.lora.rank={rank}")
    qlora_config = config(f"model.lora.rank={rank}", "model.lora.quantize=nf4")
    full, adapters, qlora = (plan_memory(c, batch_size=2, seq_len=64) for c in (full_config, lora_config, qlora_config))
    gb = 1024**3
    # rank x (inputs + outputs) of each projection: q, k, v, o, gate, up, down
    q, k = heads * dh, kv * dh
    adapter_count = layers * rank * ((d + q) + 2 * (d + k) + (q + d) + 2 * (d + f) + (f + d))
    assert adapters.trained_params == qlora.trained_params == adapter_count
    counts = full.optimizer_gb * gb - 2 * full.params_gb * gb  # the optimizer's int32 step counts
    assert 0 < counts <= 16 and full.frozen_gb == 0
    assert adapters.optimizer_gb * gb == qlora.optimizer_gb * gb == 2 * 4 * adapter_count + counts
    assert adapters.optimizer_gb < full.optimizer_gb / 10
    projections = layers * (d * q + 2 * d * k + q * d + 3 * d * f)
    others = 4 * (vocab * d + layers * 2 * d + d)  # tied embedding, two norms a layer and the final one: float32
    assert full.params_gb * gb == 4 * projections + others
    assert adapters.frozen_gb * gb == 4 * projections + others
    assert qlora.frozen_gb * gb == projections // 2 + 4 * (projections // 64) + others
    assert qlora.params_gb * gb == qlora.frozen_gb * gb + 4 * adapter_count
    assert full.cpu_upcast_gb == adapters.cpu_upcast_gb == 0  # float32 weights: XLA:CPU multiplies them as they are
    # bfloat16 weights: XLA:CPU multiplies in float32 with float32 copies of them, which the plan leaves out
    bf16_config = config(f"model.lora.rank={rank}", "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16")
    bf16 = plan_memory(bf16_config, batch_size=2, seq_len=64)
    assert bf16.frozen_gb * gb == 2 * projections + others // 2
    assert 4 * projections <= bf16.cpu_upcast_gb * gb <= 2 * bf16.frozen_gb * gb
    # where the weights and their optimizer state dominate, plan suggests LoRA and QLoRA until they are on
    advice = recommend(full, full.params_gb, full_config)
    assert "model.lora.rank=16" in advice and "model.lora.quantize=nf4" in advice
    advice = recommend(adapters, adapters.params_gb, lora_config)
    assert "model.lora.rank=16" not in advice and "model.lora.quantize=nf4" in advice
    assert "lora" not in recommend(qlora, qlora.params_gb, qlora_config)


def test_the_qwen_lora_presets_train_adapters_in_bfloat16_at_the_qlora_rate():
    from aft_jax.config.presets import OPEN_MODELS

    for model in OPEN_MODELS:
        lora, qlora = (load_config(f"{REPO}/configs/qwen.py:{model}-gsm8k-{v}") for v in ("lora", "qlora"))
        for c in (lora, qlora):
            assert (c.model.lora.rank, c.model.lora.alpha, c.optim.lr) == (16, 32.0, 2e-4)
            assert c.model.lora.lora_config().targets == ("q", "k", "v", "o", "gate", "up", "down")
            assert c.model.param_dtype == c.model.compute_dtype == "bfloat16" and c.task.template == "chat"
        assert (lora.model.lora.quantize, qlora.model.lora.quantize) == ("none", "nf4")
    assert load_config(f"{REPO}/configs/qwen.py:qwen2.5_7b-gsm8k").model.lora.rank == 0
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(f"{REPO}/configs/qwen.py:qwen2.5_7b-gsm8k-dora")
