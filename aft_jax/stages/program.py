"""The training program, built in one place for `run_training`, `aft-jax plan` and the tests: the optimizer,
the pure `train_step(state, batch, frozen) -> (state, metrics)`, the state's shardings (from abstract shapes
and the logical-axis rules, so no weights are needed) and the step under one `jax.jit`, traced inside
`sharding.use_mesh` so the model's activation constraints are active.

The state holds the weights the run trains (`aft_jax.model.lora.trainable`: every parameter, or a LoRA
model's adapters) and their optimizer state; the rest of the model (a LoRA model's frozen, possibly
quantized base) is the step's `frozen` argument: read, never differentiated, updated or checkpointed."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from aft_jax.data.batches import CANDIDATE_SCHEMA, PADDED_SCHEMA
from aft_jax.data.packing import TOKEN_SCHEMA
from aft_jax.errors import SettingError
from aft_jax.method.objective import finalize_metrics, normalisers, objective
from aft_jax.model.causal_lm import abstract_model
from aft_jax.model.lora import trainable
from aft_jax.parallel import sharding


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar
    params: dict  # nnx.to_pure_dict of the trained parameters (all, or a LoRA model's adapters)
    opt_state: Any
    rng: jax.Array  # uint32 [2], raw key data


def build_optimizer(optim_cfg, total_steps: int):
    """AdamW with linear warmup and cosine decay, after global-norm gradient clipping; no decay on norms."""
    warmup = max(1, int(round(optim_cfg.warmup_ratio * total_steps))) if optim_cfg.warmup_ratio > 0 else 0
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else optim_cfg.lr,
        peak_value=optim_cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )

    def decay_mask(params):
        return jax.tree.map_with_path(lambda path, _: not any(getattr(k, "key", None) == "scale" for k in path), params)

    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(
            schedule,
            b1=optim_cfg.b1,
            b2=optim_cfg.b2,
            eps=optim_cfg.eps,
            weight_decay=optim_cfg.weight_decay,
            mask=decay_mask,
        ),
    )
    return tx, schedule


def make_train_step(graphdef, loss_cfg, tx, schedule, grad_accum: int):
    """The pure step: gradients summed over `grad_accum` micro-batches (each normalised by the global
    batch's totals, so the sum is the full-batch gradient), then one optimizer update."""

    def gradients(params, frozen, batch, norm):
        """Summed statistics and gradients, accumulated over micro-batches when grad_accum > 1."""

        def loss_fn(params, micro, norm):
            return objective(nnx.merge(graphdef, params, frozen), micro, norm, loss_cfg)

        if grad_accum == 1:
            (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, norm)
            return grads, sums
        micro = jax.tree.map(
            lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
        )

        def accumulate(carry, micro_batch):
            (_, micro_sums), micro_grads = jax.value_and_grad(loss_fn, has_aux=True)(params, micro_batch, norm)
            return jax.tree.map(jnp.add, carry, (micro_grads, micro_sums)), None

        zero_sums = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), norm)[1])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (params, zero_sums))
        return jax.lax.scan(accumulate, zeros, micro)[0]

    def train_step(state: TrainState, batch: dict, frozen: dict):
        grads, sums = gradients(state.params, frozen, batch, normalisers(batch, loss_cfg))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = finalize_metrics(sums) | {"grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return train_step


def check_batch(batch_size: int, grad_accum: int, mesh) -> None:
    """Every device needs whole groups of every micro-batch."""
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % (grad_accum * data_ways):
        raise SettingError(
            f"train.batch_size={batch_size} must be a multiple of train.grad_accum x the mesh's data x fsdp "
            f"devices = {grad_accum} x {mesh.shape['data']} x {mesh.shape['fsdp']}: every device needs whole groups"
        )


def batch_spec(mesh, batch_size: int, group_size: int, length: int, rows: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract arrays like real batches, split over (data, fsdp): `[B, K]` per-candidate arrays, and packed
    `[rows, length]` token arrays (with `rows`) or padded `[B, K, length]` ones."""
    token_shape, token_schema = (rows, length), TOKEN_SCHEMA
    if not rows:
        token_shape, token_schema = (batch_size, group_size, length), PADDED_SCHEMA
    shapes = {name: (token_shape, dtype) for name, dtype in token_schema.items()}
    shapes |= {name: ((batch_size, group_size), dtype) for name, dtype in CANDIDATE_SCHEMA.items()}
    return {
        name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for name, (shape, dtype) in shapes.items()
    }


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    graphdef: Any
    mesh: Any
    tx: Any
    abstract_state: TrainState  # ShapeDtypeStructs carrying the state's shardings
    abstract_frozen: dict  # ShapeDtypeStructs of the frozen weights (empty: all are trained)
    step: Any  # the jitted train step; call through `__call__` / `lower`, inside the mesh

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda x: x.sharding, self.abstract_state)

    def frozen(self, model) -> dict:
        """The model's weights this program does not train, in their shardings (the step's `frozen`)."""
        _, _, frozen = nnx.split(model, trainable(model.config), ...)
        shardings = jax.tree.map(lambda x: x.sharding, self.abstract_frozen)
        return jax.device_put(nnx.to_pure_dict(frozen), shardings)

    def model(self, state: TrainState, frozen: dict):
        """The model of a state and the frozen weights."""
        return nnx.merge(self.graphdef, state.params, frozen)

    def init_state(self, model, seed: int) -> TrainState:
        """Step 0: the model's trained parameters and the optimizer state in the program's shardings."""
        shardings = self.state_shardings
        params = jax.device_put(nnx.to_pure_dict(nnx.state(model, trainable(model.config))), shardings.params)
        opt_state = jax.jit(self.tx.init, out_shardings=shardings.opt_state)(params)
        step, rng = jnp.zeros((), jnp.int32), jax.random.key_data(jax.random.key(seed))
        step, rng = (sharding.put_global(x, sharding.replicated(self.mesh)) for x in (step, rng))
        return TrainState(step, params, opt_state, rng)

    def __call__(self, state: TrainState, batch: dict, frozen: dict | None = None):
        """One step; `frozen` (`frozen(model)`) may be left out when the program trains every weight."""
        with sharding.use_mesh(self.mesh):
            return self.step(state, batch, {} if frozen is None else frozen)

    def lower(self, state: TrainState, batch: dict, frozen: dict | None = None):
        """The step lowered for concrete or abstract `(state, batch, frozen)` (`abstract_frozen` when left
        out); `.compile()` it, or read `.as_text()`."""
        with sharding.use_mesh(self.mesh):
            return self.step.lower(state, batch, self.abstract_frozen if frozen is None else frozen)


def build_train_program(model_config, mesh, loss_cfg, optim_cfg, total_steps: int, grad_accum: int) -> TrainProgram:
    """The program for a model of `model_config` on `mesh`: state shardings from the logical-axis rules,
    optimizer-state shardings from those of the parameters, batches over (data, fsdp), state donated."""
    graphdef, abstract, abstract_frozen = nnx.split(abstract_model(model_config), trainable(model_config), ...)

    def with_shardings(state):
        shardings = nnx.to_pure_dict(sharding.state_shardings(state, mesh))
        return jax.tree.map(
            lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), nnx.to_pure_dict(state), shardings
        )

    params, frozen = with_shardings(abstract), with_shardings(abstract_frozen)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    tx, schedule = build_optimizer(optim_cfg, total_steps)
    replicated = sharding.replicated(mesh)
    opt_shapes = jax.eval_shape(tx.init, params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, opt_shapes, param_shardings, transform_non_params=lambda _: replicated
    )
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shapes, opt_shardings)
    state = TrainState(
        jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
        params,
        opt_state,
        jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated),
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    step = jax.jit(
        make_train_step(graphdef, loss_cfg, tx, schedule, grad_accum),
        # the batch's sharding is a prefix: every batch array's leading axis
        in_shardings=(shardings, sharding.batch_sharding(mesh, 1), jax.tree.map(lambda x: x.sharding, frozen)),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )
    return TrainProgram(graphdef, mesh, tx, state, frozen, step)
