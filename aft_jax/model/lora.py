"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections and QLoRA's quantized frozen base
(Dettmers et al. 2023): the one place that knows either.

A projection `y = einsum(spec, x, W)`, `W` `[*in, *out]` (`q_proj` `[D, H, Dh]` under `btd,dhk->bthk`),
with an adapter becomes `y = einsum(spec, x, W) + scale * (x A) B`, `A` `[*in, r]`, `B` `[r, *out]`,
`scale = alpha / r`; stacked layers add a leading `layers` axis to all three. As in PEFT, `A` starts
uniform in `+-1/sqrt(fan_in)` (kaiming-uniform with a = sqrt(5)) and `B` at zero, so a new adapter leaves
the model's outputs exactly as they were. Adapters are float32 `LoraParam`s, the only weights a LoRA run
trains (`trainable`).

With `quantize`, the frozen base projections are stored as `QuantizedParam` codes and float32 scales
(`<name>` and `<name>_scale`) and dequantized to the compute dtype in each forward:
- `int8`: `W ~ codes * scale`, codes in [-127, 127], one scale (absmax / 127) per output channel;
- `nf4`: QLoRA's 4-bit NormalFloat: blocks of 64 consecutive inputs along the last input axis (fewer
  where that axis is shorter) share a scale (the block's absmax); each weight is the nearest of the 16
  `NF4_CODE` values times it; two codes per byte. No double quantization of the scales.
Embeddings, the LM head and the norms stay in `param_dtype`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aft_jax.model.config import ModelConfig

# The 16 values of NF4 (QLoRA, appendix E; bitsandbytes' table).
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip
NF4_BLOCK = 64

# target -> (module in the block, weight name, number of input axes, einsum spec)
PROJECTIONS: dict[str, tuple[str, str, int, str]] = {
    "q": ("attn", "q_proj", 1, "btd,dhk->bthk"),
    "k": ("attn", "k_proj", 1, "btd,dgk->btgk"),
    "v": ("attn", "v_proj", 1, "btd,dgk->btgk"),
    "o": ("attn", "o_proj", 2, "bthk,hkd->btd"),
    "gate": ("mlp", "gate_proj", 1, "btd,df->btf"),
    "up": ("mlp", "up_proj", 1, "btd,df->btf"),
    "down": ("mlp", "down_proj", 1, "btf,fd->btd"),
}


class LoraParam(nnx.Param):
    """An adapter weight (`A` or `B`)."""


class QuantizedParam(nnx.Param):
    """A frozen base projection stored quantized: its codes, or their scales."""


def trainable(config: ModelConfig):
    """The filter of the weights a run trains: the adapters of a LoRA model, else every parameter."""
    return LoraParam if config.lora else nnx.Param


# ---------------------------------------------------------------------------------------------- quantization


def nf4_block(size: int) -> int:
    """The NF4 block along an input axis of `size`: 64, or the largest divisor of 64 that divides `size`."""
    return math.gcd(size, NF4_BLOCK)


def quantize(w: jax.Array, in_axes: tuple[int, ...], kind: str) -> tuple[jax.Array, jax.Array]:
    """`(codes, scale)` of `w` in `kind` ('int8' or 'nf4', see the module docstring), `in_axes` being the
    weight's input axes (the NF4 blocks run along the last of them)."""
    w = w.astype(jnp.float32)
    if kind == "int8":
        scale = jnp.max(jnp.abs(w), axis=in_axes, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale
    axis = in_axes[-1]
    n = w.shape[axis]
    block = nf4_block(n)
    blocks = w.reshape(*w.shape[:axis], n // block, block, *w.shape[axis + 1 :])
    absmax = jnp.max(jnp.abs(blocks), axis=axis + 1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    codes = jnp.argmin(jnp.abs((blocks / absmax)[..., None] - NF4_CODE), axis=-1).astype(jnp.uint8)
    pairs = codes.reshape(*w.shape[:axis], n // 2, 2, *w.shape[axis + 1 :])
    low, high = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
    return low | (high << 4), jnp.squeeze(absmax, axis + 1)


def dequantize(codes: jax.Array, scale: jax.Array, in_axes: tuple[int, ...], dtype) -> jax.Array:
    """The weight that `quantize(w, in_axes, kind)` stored as `(codes, scale)`, in `dtype`."""
    if codes.dtype == jnp.int8:
        return (codes.astype(jnp.float32) * scale).astype(dtype)
    axis = in_axes[-1]
    pairs = jnp.stack([codes & 15, codes >> 4], axis=axis + 1)
    n = 2 * codes.shape[axis]
    values = jnp.asarray(NF4_CODE)[pairs.astype(jnp.int32)]
    blocks = values.reshape(*codes.shape[:axis], scale.shape[axis], -1, *codes.shape[axis + 1 :])
    w = blocks * jnp.expand_dims(scale, axis + 1)
    return w.reshape(*codes.shape[:axis], n, *codes.shape[axis + 1 :]).astype(dtype)


# ------------------------------------------------------------------------------------------ module side


def init_projection(module: nnx.Module, target: str, weight: nnx.Param, config: ModelConfig, rngs, stacked: bool):
    """Sets `module.<name>` to the base `weight` of projection `target` (`PROJECTIONS`), quantized as
    `config.lora.quantize` says, and, when `target` is adapted, `<name>_lora_a` and `<name>_lora_b`."""
    _, name, n_in, _ = PROJECTIONS[target]
    lora = config.lora
    if lora is None:
        setattr(module, name, weight)
        return
    lead = 1 if stacked else 0
    in_axes = tuple(range(lead, lead + n_in))
    axes = weight.get_metadata()["axes"]
    w = weight.get_value()
    if lora.quantize == "none":
        setattr(module, name, weight)
    else:
        codes, scale = quantize(w, in_axes, lora.quantize)
        setattr(module, name, QuantizedParam(codes, axes=axes))
        setattr(module, name + "_scale", QuantizedParam(scale, axes=axes))
    if target in lora.targets:
        a, b = new_adapter(rngs.params(), w.shape, in_axes, lora.rank)
        setattr(module, name + "_lora_a", LoraParam(a, axes=(*axes[: lead + n_in], "lora_rank")))
        setattr(module, name + "_lora_b", LoraParam(b, axes=(*axes[:lead], "lora_rank", *axes[lead + n_in :])))


def new_adapter(key, shape: tuple[int, ...], in_axes: tuple[int, ...], rank: int) -> tuple[jax.Array, jax.Array]:
    """PEFT's initial `(A, B)` for a weight of `shape`: `A` uniform in +-1/sqrt(fan_in), `B` zero."""
    lead, last = shape[: in_axes[0]], in_axes[-1] + 1
    fan_in = math.prod(shape[in_axes[0] : last])
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (*shape[:last], rank), jnp.float32, -bound, bound)
    return a, jnp.zeros((*lead, rank, *shape[last:]), jnp.float32)


@functools.lru_cache(maxsize=None)
def adapter_specs(spec: str) -> tuple[str, str]:
    """The einsums `x, A -> xA` and `xA, B -> y` of a projection's `x, W -> y` spec."""
    inputs, out = spec.split("->")
    x, w = inputs.split(",")
    contracted = "".join(c for c in w if c in x)
    produced = "".join(c for c in w if c not in x)
    kept = "".join(c for c in x if c not in w)
    return f"{x},{contracted}r->{kept}r", f"{kept}r,r{produced}->{out}"


def project(module: nnx.Module, target: str, x, dtype) -> jax.Array:
    """Projection `target` of `x` in `dtype` through `module`'s (possibly quantized) base weight and its
    adapter, if any; weights are one layer's (no `layers` axis)."""
    _, name, n_in, spec = PROJECTIONS[target]
    weight = getattr(module, name)[...]
    scale = getattr(module, name + "_scale", None)
    if scale is None:
        weight = weight.astype(dtype)
    else:
        weight = dequantize(weight, scale[...], tuple(range(n_in)), dtype)
    y = jnp.einsum(spec, x, weight)
    lora_a = getattr(module, name + "_lora_a", None)
    if lora_a is None:
        return y
    return y + _adapter_delta(
        spec, module.lora_scale, x, lora_a[...].astype(dtype), getattr(module, name + "_lora_b")[...].astype(dtype)
    )


@functools.partial(jax.checkpoint, static_argnums=(0, 1), policy=jax.checkpoint_policies.nothing_saveable)
def _adapter_delta(spec: str, scale: float, x, lora_a, lora_b):
    """`scale * (x A) B`, recomputed in the backward pass: under a remat policy that saves matmul outputs
    (`dots_no_batch`) its full-size output would otherwise be kept beside the projection's own, for a
    product that costs about 2 r / min(in, out) of the projection's."""
    to_rank, from_rank = adapter_specs(spec)
    return scale * jnp.einsum(from_rank, jnp.einsum(to_rank, x, lora_a), lora_b)
