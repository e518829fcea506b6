"""aft_jax: Alignment Fine-Tuning (arXiv 2309.02144) for Llama, Mistral and Qwen models in JAX/Flax NNX."""

from aft_jax.io.hf import from_pretrained, save_pretrained
from aft_jax.io.hf_files import CheckpointError
from aft_jax.method import losses
from aft_jax.method.scoring import sequence_scores
from aft_jax.model.causal_lm import CausalLM, KVCache, create_model
from aft_jax.model.config import ConfigError, ModelConfig, RopeScaling
from aft_jax.sampling.sampler import JaxSampler, Sampler, generate

__version__ = "0.1.0"

__all__ = [
    "CausalLM",
    "CheckpointError",
    "ConfigError",
    "JaxSampler",
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "Sampler",
    "create_model",
    "from_pretrained",
    "generate",
    "losses",
    "save_pretrained",
    "sequence_scores",
]
