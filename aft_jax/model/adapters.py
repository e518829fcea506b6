"""Whole-model adapter transforms: a base model with new (or given) adapters and its quantized base
(`with_adapters`), and the merged model without them (`merge_adapters`). The arithmetic is
`aft_jax.model.lora`'s; each transform runs as one jitted function whose outputs land in their shardings.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from aft_jax.model.causal_lm import CausalLM, abstract_model
from aft_jax.model.config import LoraConfig, ModelConfig
from aft_jax.model.lora import PROJECTIONS, dequantize, new_adapter, quantize
from aft_jax.parallel import sharding


def _in_axes(n_in: int) -> tuple[int, ...]:
    return tuple(range(1, 1 + n_in))  # after the `layers` axis


def _place(config: ModelConfig, mesh, build, *args) -> CausalLM:
    """The model of `config` whose parameters `build(*args)` returns (a pure dict), in their shardings."""
    graphdef, abstract = nnx.split(abstract_model(config))
    shardings = nnx.to_pure_dict(sharding.state_shardings(abstract, mesh))
    params = jax.jit(build, out_shardings=shardings)(*args)
    nnx.replace_by_pure_dict(abstract, params)
    return nnx.merge(graphdef, abstract)


def with_adapters(model: CausalLM, lora: LoraConfig, *, seed: int = 0, adapters: dict | None = None, mesh=None):
    """`model` (without adapters) with adapters on `lora.targets`: `adapters` (`{target: (A, B)}`, stacked
    over layers, as `adapter_arrays` gives) or new ones from `seed` (B = 0: the outputs are unchanged),
    its base projections quantized as `lora.quantize` says; on `mesh` (default: the model's)."""
    if model.config.lora is not None:
        raise ValueError("the model already has adapters; merge_adapters first")
    base = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def build(base, adapters):
        params = jax.tree.map(lambda x: x, base)
        key = jax.random.key(seed)
        for index, (target, (module, name, n_in, _)) in enumerate(PROJECTIONS.items()):
            group = params["layers"][module]
            w = group[name]
            if lora.quantize != "none":
                group[name], group[name + "_scale"] = quantize(w, _in_axes(n_in), lora.quantize)
            if target in lora.targets:
                a, b = (
                    adapters[target]
                    if adapters
                    else new_adapter(jax.random.fold_in(key, index), w.shape, _in_axes(n_in), lora.rank)
                )
                group[name + "_lora_a"], group[name + "_lora_b"] = a.astype(jnp.float32), b.astype(jnp.float32)
        return params

    return _place(model.config.replace(lora=lora), mesh or sharding.mesh_of(model.embed[...]), build, base, adapters)


def adapter_arrays(model: CausalLM) -> dict[str, tuple[jax.Array, jax.Array]]:
    """`{target: (A [L, *in, r], B [L, r, *out])}` of the model's adapters."""
    layers = model.layers
    return {
        target: (getattr(getattr(layers, m), name + "_lora_a")[...], getattr(getattr(layers, m), name + "_lora_b")[...])
        for target, (m, name, _, _) in PROJECTIONS.items()
        if target in model.config.lora.targets
    }


def merged_weight(w, a, b, scale: float):
    """`W + scale * A B` of one stacked projection (`W` `[L, *in, *out]`) in float32."""
    lead = w.shape[0]
    a_flat = a.reshape(lead, -1, a.shape[-1]).astype(jnp.float32)
    b_flat = b.reshape(lead, b.shape[1], -1).astype(jnp.float32)
    delta = jnp.einsum("lir,lro->lio", a_flat, b_flat).reshape(w.shape)
    return w.astype(jnp.float32) + scale * delta


def merge_adapters(model: CausalLM, mesh=None) -> CausalLM:
    """The model without adapters whose projections are `W + scale * A B` (the base dequantized), in
    `param_dtype`: the same function as `model` up to rounding; on `mesh` (default: the model's)."""
    lora = model.config.lora
    if lora is None:
        return model
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    dtype = jnp.dtype(model.config.param_dtype)

    def build(params):
        out = jax.tree.map(lambda x: x, params)
        for target, (module, name, n_in, _) in PROJECTIONS.items():
            group = out["layers"][module]
            w = group.pop(name)
            if name + "_scale" in group:
                w = dequantize(w, group.pop(name + "_scale"), _in_axes(n_in), jnp.float32)
            if target in lora.targets:
                w = merged_weight(w, group.pop(name + "_lora_a"), group.pop(name + "_lora_b"), lora.scale)
            group[name] = w.astype(dtype)
        return out

    return _place(model.config.replace(lora=None), mesh or sharding.mesh_of(model.embed[...]), build, params)
