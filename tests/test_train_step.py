"""The pure train step: sharded equals single-device, accumulation equals the full batch, overfitting works."""

import jax
import numpy as np
import pytest
from train_helpers import loss_config, random_batch, tiny_model

from aft_jax.config.defaults import default_config
from aft_jax.parallel import sharding
from aft_jax.stages.program import build_train_program
from aft_jax.stages.train import shard_batch


def _step(mesh, loss_cfg, grad_accum=1, steps=1, batch_seed=0):
    model = tiny_model(mesh)
    program = build_train_program(model.config, mesh, loss_cfg, default_config().optim, 10, grad_accum)
    state = program.init_state(model, seed=0)
    adam = state.opt_state[1][0]  # (clip, adamw = (scale_by_adam, ...))
    for moments in (adam.mu, adam.nu):  # Adam's moments are sharded exactly like the parameters
        assert jax.tree.map(lambda m: m.sharding.spec, moments) == jax.tree.map(lambda p: p.sharding.spec, state.params)
    history = []
    for _ in range(steps):
        state, metrics = program(state, shard_batch(random_batch(batch_seed), mesh))
        history.append({k: float(v) for k, v in metrics.items()})
    return jax.device_get(state.params), history


@pytest.mark.parametrize("method,constraint", [("aft", "boundary"), ("dpo", "detach")])
def test_sharded_step_equals_single_device(method, constraint):
    cfg = loss_config(method=method, constraint=constraint)
    single_params, single = _step(sharding.single_device_mesh(), cfg)
    mesh = sharding.make_mesh((1, 2, 4))
    sharded_params, sharded = _step(mesh, cfg)
    np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-5)
    np.testing.assert_allclose(sharded[0]["grad_norm"], single[0]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_params), jax.tree.leaves(single_params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_gradient_accumulation_equals_full_batch():
    cfg = loss_config(method="aft", constraint="boundary")
    mesh = sharding.single_device_mesh()
    full_params, full = _step(mesh, cfg, grad_accum=1)
    accum_params, accum = _step(mesh, cfg, grad_accum=4)
    np.testing.assert_allclose(accum[0]["loss"], full[0]["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


@pytest.mark.parametrize("method", ["vft", "aft", "rrhf", "pro"])
def test_overfitting_one_batch_drives_the_loss_down(method):
    cfg = loss_config(method=method, constraint="none")
    optim = default_config().optim
    optim.lr, optim.warmup_ratio = 1e-2, 0.0
    model = tiny_model()
    mesh = sharding.single_device_mesh()
    program = build_train_program(model.config, mesh, cfg, optim, total_steps=1000, grad_accum=1)
    state = program.init_state(model, seed=0)
    batch = shard_batch(random_batch(3), mesh)
    losses = []
    for _ in range(25):
        state, metrics = program(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    if method != "vft":
        assert float(metrics["assess_micro"]) > 0.9, "after overfitting, positives outscore negatives"
