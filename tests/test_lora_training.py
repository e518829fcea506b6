"""Training with LoRA adapters (`aft_jax.stages.program`: the state holds the adapters, the frozen base is the
step's argument): a step moves only the adapters, also over an NF4 base; the adapters' gradients equal the
chain rule through the merged weight; a QLoRA step on a 2 x 4 mesh equals one device; a killed LoRA run
resumes with the same losses and adapter, its checkpoints holding only adapters and their optimizer state.
The model-level checks are in test_lora."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_cli
from flax import nnx
from train_helpers import killed_and_resumed, loss_config, random_batch, tiny_model

from aft_jax.config.defaults import default_config
from aft_jax.method.objective import normalisers, objective
from aft_jax.model.adapters import adapter_arrays, merge_adapters, with_adapters
from aft_jax.model.config import LoraConfig
from aft_jax.model.lora import LoraParam
from aft_jax.parallel import sharding
from aft_jax.stages.program import build_train_program
from aft_jax.stages.train import shard_batch

# target -> (module, weight, number of input axes), written out here rather than read from the code under test
WEIGHTS = {"q": ("attn", "q_proj", 1), "k": ("attn", "k_proj", 1), "v": ("attn", "v_proj", 1),
           "o": ("attn", "o_proj", 2), "gate": ("mlp", "gate_proj", 1), "up": ("mlp", "up_proj", 1),
           "down": ("mlp", "down_proj", 1)}  # fmt: skip
LOSS = loss_config(method="aft", constraint="boundary")


def flat(tree) -> dict[str, np.ndarray]:
    """`{"layers/attn/q_proj": array}` of a pure dict, copied to NumPy."""
    return {"/".join(str(k.key) for k in path): np.array(x) for path, x in jax.tree.leaves_with_path(tree)}


def params_of(model) -> dict[str, np.ndarray]:
    return flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def random_adapters(model, rank, seed) -> dict:
    """`{target: (A, B)}` for `model`'s projections, B non-zero, so that A has gradients too."""
    rng = np.random.default_rng(seed)
    out = {}
    for target, (module, name, n_in) in WEIGHTS.items():
        w = getattr(getattr(model.layers, module), name)[...]
        a = rng.uniform(-0.3, 0.3, (*w.shape[: 1 + n_in], rank))
        b = rng.normal(0, 0.05, (w.shape[0], rank, *w.shape[1 + n_in :]))
        out[target] = (jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    return out


def program_for(model, mesh, steps=10):
    optim = default_config().optim
    optim.lr, optim.warmup_ratio = 1e-2, 0.0
    return build_train_program(model.config, mesh, LOSS, optim, total_steps=steps, grad_accum=1)


def two_steps(quantize, mesh, adapters_seed=None):
    """Two steps on `tiny_model` with adapters, new ones (B = 0) or with `adapters_seed` random ones (B
    non-zero), its base stored as `quantize` says: the weights before, the state's and the frozen dict's
    keys, the trained model's weights and the metrics after each step, and the frozen weights."""
    base = tiny_model(mesh)
    lora = LoraConfig(rank=4, quantize=quantize)
    if adapters_seed is None:
        model = with_adapters(base, lora, seed=1)
    else:
        model = with_adapters(base, lora, adapters=random_adapters(base, 4, seed=adapters_seed))
    before = params_of(model)
    program = program_for(model, mesh)
    frozen = program.frozen(model)
    state = program.init_state(model, seed=0)
    keys = set(flat(state.params)), set(flat(frozen))
    after, history = [], []
    for step in range(2):
        state, metrics = program(state, shard_batch(random_batch(step), mesh), frozen)
        after.append(params_of(program.model(state, frozen)))
        history.append({k: float(v) for k, v in metrics.items()})
    return before, keys, after, history, frozen


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_a_step_moves_only_the_adapters(quantize):
    """From new adapters (B = 0): the first step moves every B and leaves A exactly (its gradient,
    scale G B^T, is zero); the second moves A. The state holds the adapters only; every other weight of
    the trained model (the base, NF4 codes and scales under nf4, embeddings, norms) is bit-identical."""
    before, (state_keys, frozen_keys), (first, second), history, _ = two_steps(quantize, sharding.single_device_mesh())
    adapters = {k for k in before if k.endswith(("_lora_a", "_lora_b"))}
    assert len(adapters) == 2 * len(WEIGHTS)
    if quantize == "nf4":
        assert before["layers/mlp/gate_proj"].dtype == np.uint8 and "layers/mlp/gate_proj_scale" in before
    assert state_keys == adapters and frozen_keys == set(before) - adapters
    assert all(np.isfinite(m["loss"]) for m in history)
    assert set(second) == set(before)
    for key, value in before.items():
        if key in adapters:
            continue
        assert np.array_equal(second[key], value), key
        assert second[key].dtype == value.dtype, key
    for key in adapters:
        if key.endswith("_lora_b"):
            assert not before[key].any() and np.all(first[key] != 0), key
        else:
            np.testing.assert_array_equal(first[key], before[key], err_msg=key)
            assert not np.array_equal(second[key], before[key]), key


def test_adapter_gradients_are_the_chain_rule_through_the_merged_weight():
    """With W' = W + s A B and G = dL/dW' from the merged model reshaped to [in, out] per layer (the AFT
    objective of a random batch): dL/dA = s G B^T and dL/dB = s A^T G, against `jax.grad` through the
    adapters (B non-zero)."""
    rank, scale = 4, 2.0
    base = tiny_model()
    lora = LoraConfig(rank=rank, alpha=8.0)
    model = with_adapters(base, lora, adapters=random_adapters(base, rank, seed=2))
    merged = merge_adapters(model)
    batch = random_batch(0)
    norm = normalisers(batch, LOSS)

    def grads(model, wrt):
        graphdef, params, rest = nnx.split(model, wrt, ...)
        loss = lambda params: objective(nnx.merge(graphdef, params, rest), batch, norm, LOSS)[0]  # noqa: E731
        return flat(nnx.to_pure_dict(jax.jit(jax.grad(loss))(params)))

    got = grads(model, LoraParam)
    merged_grads = grads(merged, nnx.Param)
    for target, (a, b) in adapter_arrays(model).items():
        module, name, _ = WEIGHTS[target]
        g = merged_grads[f"layers/{module}/{name}"].astype(np.float64)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        n_layers = len(a)
        g = g.reshape(n_layers, a[0].size // rank, -1)
        a_flat, b_flat = a.reshape(n_layers, -1, rank), b.reshape(n_layers, rank, -1)
        want_a = (scale * g @ b_flat.transpose(0, 2, 1)).reshape(a.shape)
        want_b = (scale * a_flat.transpose(0, 2, 1) @ g).reshape(b.shape)
        for key, want in ((f"layers/{module}/{name}_lora_a", want_a), (f"layers/{module}/{name}_lora_b", want_b)):
            assert np.abs(want).max() > 1e-4, key
            np.testing.assert_allclose(got[key], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=key)


def test_qlora_sharded_step_equals_one_device():
    """Two steps of an NF4 QLoRA model on fsdp=2 x tensor=4 (the codes split over both) and on one device:
    the same losses and gradient norms, the same adapters after each step. The adapters start with B
    non-zero, so that A has gradients from the first step: Adam's first update of a weight is about
    lr * sign(g) and would magnify rounding in the tiny gradients of a weight's first step."""
    _, _, single_params, single, _ = two_steps("nf4", sharding.single_device_mesh(), adapters_seed=3)
    _, _, sharded_params, sharded, frozen = two_steps("nf4", sharding.make_mesh((1, 2, 4)), adapters_seed=3)
    codes = frozen["layers"]["mlp"]["gate_proj"]  # [L, D / 2, F] uint8
    assert codes.dtype == jnp.uint8 and codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert codes.addressable_shards[0].data.shape == (codes.shape[0], codes.shape[1] // 2, codes.shape[2] // 4)
    for got, want in zip(sharded, single):
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    for got, want in zip(sharded_params, single_params):
        for key, value in want.items():
            if key.endswith(("_lora_a", "_lora_b")):
                np.testing.assert_allclose(got[key], value, rtol=0, atol=2e-6, err_msg=key)


# ------------------------------------------------------------------------------------------ the CLI run


def lora_run(run_dir, groups):
    return tiny_cli("aft", run_dir, f"data.train_file={groups}", "train.max_steps=8", "model.lora.rank=4")


def checkpointed_sizes(step_dir) -> dict[str, int]:
    """The number of values in each top-level entry of a checkpoint's train state, from Orbax's metadata."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.metadata(step_dir / "state").item_metadata
    sizes = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        top = str(getattr(path[0], "key", getattr(path[0], "name", path[0])))
        sizes[top] = sizes.get(top, 0) + int(np.prod(leaf.shape))
    return sizes


def test_a_killed_lora_run_resumes_with_identical_losses_and_adapter(tmp_path, groups_file):
    """The tiny preset with rank-4 adapters on every projection, killed with SIGKILL after its fifth step and
    run again: the same per-step losses and the same final adapter (PEFT tensors) as a run straight through.
    Its checkpoints hold the adapters and their Adam moments only (2 layers x rank 4 x (in + out) summed over
    the seven projections, thrice), none of the base's weights."""
    from safetensors.numpy import load_file

    # hidden 64, intermediate 128, 4 heads and 2 kv heads of 16: q, o 64 -> 64; k, v 64 -> 32; gate, up, down
    # 64 <-> 128; rank 4, 2 layers
    adapter_values = 2 * 4 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))

    def check_killed(run_dir, step):
        sizes = checkpointed_sizes(run_dir / "checkpoints" / str(step))
        assert sizes["params"] == adapter_values, sizes
        assert sizes["opt_state"] == 2 * adapter_values + 2, sizes  # Adam's mu and nu, and two step counts

    straight, interrupted = killed_and_resumed(lambda run_dir: lora_run(run_dir, groups_file), tmp_path, check_killed)
    config = json.loads((interrupted / "model" / "adapter_config.json").read_text())
    assert config["r"] == 4 and len(config["target_modules"]) == 7
    want = load_file(straight / "model" / "adapter_model.safetensors")
    got = load_file(interrupted / "model" / "adapter_model.safetensors")
    assert got.keys() == want.keys() and len(want) == 2 * 7 * 2
    assert sum(v.size for v in want.values()) == adapter_values
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in want.items() if "lora_B" in k), "training moved B"
