"""Where each aft_jax parameter lives in a Hugging Face checkpoint of the Llama, Mistral and Qwen families
(they share tensor names), and how its layout differs.

HF stores `nn.Linear` weights as `[out, in]`; aft_jax stores `[in, out]` with heads split out
(`q_proj`: `[D, H, Dh]`, its bias `[H, Dh]`). RoPE uses the same rotate-half layout on both sides, so no
q/k permutation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from aft_jax.model.config import ModelConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    path: tuple[str, ...]  # path in the aft_jax parameter state
    hf_name: str  # HF tensor name; `{i}` is the layer index for stacked weights
    hf_shape: tuple[int, ...]
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name


def _same(w):
    return w


def _transpose(w):
    return w.T


def weight_specs(cfg: ModelConfig) -> list[WeightSpec]:
    """Every tensor of a checkpoint of `cfg`: the common ones, then those of its options (q/k/v biases,
    q/k norms)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    h, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def in_proj(heads):  # HF [heads*hd, d] <-> ours [d, heads, hd]
        return (
            lambda w: w.reshape(heads, hd, d).transpose(2, 0, 1),
            lambda w: w.transpose(1, 2, 0).reshape(heads * hd, d),
        )

    layer = "model.layers.{i}."
    specs = [
        WeightSpec(("embed",), "model.embed_tokens.weight", (v, d), _same, _same),
        WeightSpec(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", (d,), _same, _same),
        WeightSpec(("layers", "attn", "q_proj"), layer + "self_attn.q_proj.weight", (h * hd, d), *in_proj(h)),
        WeightSpec(("layers", "attn", "k_proj"), layer + "self_attn.k_proj.weight", (kv * hd, d), *in_proj(kv)),
        WeightSpec(("layers", "attn", "v_proj"), layer + "self_attn.v_proj.weight", (kv * hd, d), *in_proj(kv)),
        WeightSpec(
            ("layers", "attn", "o_proj"),
            layer + "self_attn.o_proj.weight",
            (d, h * hd),
            lambda w: w.reshape(d, h, hd).transpose(1, 2, 0),
            lambda w: w.transpose(2, 0, 1).reshape(d, h * hd),
        ),
        WeightSpec(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (d,), _same, _same),
        WeightSpec(("layers", "mlp", "gate_proj"), layer + "mlp.gate_proj.weight", (f, d), _transpose, _transpose),
        WeightSpec(("layers", "mlp", "up_proj"), layer + "mlp.up_proj.weight", (f, d), _transpose, _transpose),
        WeightSpec(("layers", "mlp", "down_proj"), layer + "mlp.down_proj.weight", (d, f), _transpose, _transpose),
        WeightSpec(("final_norm", "scale"), "model.norm.weight", (d,), _same, _same),
    ]
    if cfg.qkv_bias:
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            specs.append(
                WeightSpec(
                    ("layers", "attn", f"{name}_bias"),
                    layer + f"self_attn.{name}_proj.bias",
                    (heads * hd,),
                    lambda w, heads=heads: w.reshape(heads, hd),
                    lambda w: w.reshape(-1),
                )
            )
    if cfg.qk_norm:
        for name in ("q", "k"):
            specs.append(
                WeightSpec(
                    ("layers", "attn", f"{name}_norm", "scale"),
                    layer + f"self_attn.{name}_norm.weight",
                    (hd,),
                    _same,
                    _same,
                )
            )
    if not cfg.tie_word_embeddings:
        specs.append(WeightSpec(("lm_head",), "lm_head.weight", (v, d), _transpose, _transpose))
    return specs


def hf_names(spec: WeightSpec, cfg: ModelConfig) -> list[str]:
    return [spec.hf_name.format(i=i) for i in range(cfg.num_layers)] if spec.stacked else [spec.hf_name]
