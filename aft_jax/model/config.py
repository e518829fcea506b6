"""The decoder's configuration: shape, numerics and the module options a model family turns on.

The mapping to and from Hugging Face `config.json` is per family, in `aft_jax.model.families`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from aft_jax.errors import UserError
from aft_jax.model.attention import ATTENTION_IMPLS, CUDNN_DTYPES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections an adapter can sit on
QUANTIZATIONS = ("none", "int8", "nf4")  # how a LoRA model stores its frozen base projections
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


class ConfigError(UserError, ValueError):
    """A Hugging Face config that aft_jax cannot represent."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` divides every frequency by `factor`; `llama3` is Llama 3.1's."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type == "llama3":
            out.update(
                low_freq_factor=self.low_freq_factor,
                high_freq_factor=self.high_freq_factor,
                original_max_position_embeddings=self.original_max_position_embeddings,
            )
        return out


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (`aft_jax.model.lora`): each projection in `targets` adds `scale * x A B`, with `A`
    `[in, rank]` and `B` `[rank, out]`, `scale = alpha / rank` (PEFT's LoRA). `quantize` stores the frozen
    base projections as int8 (per output channel) or NF4 (blocks of 64 inputs), QLoRA's base."""

    rank: int
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS
    quantize: str = "none"

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora rank={self.rank}; expected a positive rank")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            raise ConfigError(f"lora targets={list(self.targets)}; expected distinct names among {LORA_TARGETS}")
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError(f"lora quantize={self.quantize!r}; expected one of {QUANTIZATIONS}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a pre-norm decoder with grouped-query attention, RoPE and SwiGLU, and the
    options by which the families of `aft_jax.model.families` differ:

    - `qkv_bias`: the q/k/v projections add a bias (Qwen2);
    - `qk_norm`: queries and keys are RMS-normalised per head before RoPE (Qwen3);
    - `sliding_window`: the layers in `sliding_layers` let a query at position p see keys at positions
      greater than p - sliding_window only (Mistral, Qwen when enabled); None is plain causal attention.

    `attention` is how the training forward and the prefill compute attention (`aft_jax.model.attention`:
    `auto`, `xla` everywhere, `cudnn` on NVIDIA GPUs in bfloat16 / float16, or `pallas`, the block-sparse
    kernel for packed rows, whose tiles are `attention_block` tokens square).

    `lora` adds low-rank adapters (`LoraConfig`), the only weights a LoRA run trains; None: no adapters.

    `param_dtype` is the storage dtype of the weights, `dtype` the compute dtype of activations;
    logits and scores are always float32. Hashable, so it can sit in a static graph definition.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "auto"
    attention_block: int = 128
    initializer_range: float = 0.02
    family: str = "llama"
    qkv_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ConfigError(f"remat_policy={self.remat_policy!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLS:
            raise ConfigError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLS}")
        if self.attention == "cudnn" and self.dtype not in CUDNN_DTYPES:
            raise ConfigError(f"attention='cudnn' needs a bfloat16 or float16 compute dtype, not dtype={self.dtype!r}")
        if self.attention_block < 8 or self.attention_block % 8:
            raise ConfigError(f"attention_block={self.attention_block}; expected a positive multiple of 8")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window={self.sliding_window}; expected a positive window or None")
        layers = list(self.sliding_layers)
        if bool(layers) != (self.sliding_window is not None):
            raise ConfigError(
                f"sliding_window={self.sliding_window}, sliding_layers={layers}: "
                "a window needs the layers it slides over, and sliding layers need a window"
            )
        if any(not 0 <= i < self.num_layers for i in layers) or layers != sorted(set(layers)):
            raise ConfigError(f"sliding_layers={layers}: not increasing layer indices below {self.num_layers}")

    def window_of(self, layer: int) -> int | None:
        """The attention window of `layer`: `sliding_window` for a sliding layer, else None (causal)."""
        return self.sliding_window if layer in self.sliding_layers else None

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
