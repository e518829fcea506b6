"""The forward on a 2x4 (fsdp x tensor) mesh equals one device, and the weights really are sharded."""

import jax
import numpy as np
from hf_reference import padded_batch, save_tiny

import aft_jax
from aft_jax.parallel import sharding


def test_sharded_forward_matches_single_device(tmp_path):
    save_tiny("gqa_tied", tmp_path)
    single, _ = aft_jax.from_pretrained(tmp_path)
    mesh = sharding.make_mesh((1, 2, 4))
    sharded, _ = aft_jax.from_pretrained(tmp_path, mesh=mesh)

    gate = sharded.layers.mlp.gate_proj[...]
    assert gate.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert gate.addressable_shards[0].data.shape == (3, 32 // 2, 64 // 4)
    assert len({s.device for s in gate.addressable_shards}) == 8
    q = sharded.layers.attn.q_proj[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    kv = sharded.layers.attn.k_proj[...]  # 2 kv heads do not split 4 ways: replicated on that axis
    assert kv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, None)
    # vocab 97 is prime: the table is split over fsdp only
    assert sharded.embed[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")

    ids, mask = padded_batch(np.random.default_rng(0), 97, [8, 5, 8, 2, 6, 8, 7, 3], "left")
    expected = np.asarray(single(ids, mask))
    ids_sharded = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    mask_sharded = jax.device_put(mask, sharding.batch_sharding(mesh, 2))

    @jax.jit
    def forward(model_state, ids, mask):
        from flax import nnx

        return nnx.merge(graphdef, model_state)(ids, mask)

    from flax import nnx

    graphdef, state = nnx.split(sharded)
    with sharding.use_mesh(mesh):
        got = forward(state, ids_sharded, mask_sharded)
    assert got.sharding.spec[0] == ("data", "fsdp") or got.sharding.spec[0] == "fsdp"
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=0)


def test_create_model_is_initialised_in_place():
    cfg = aft_jax.ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
    )
    mesh = sharding.make_mesh("fsdp_tensor4")
    model = aft_jax.create_model(cfg, mesh=mesh)
    down = model.layers.mlp.down_proj[...]
    assert down.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    assert down.addressable_shards[0].data.shape == (2, 12, 16)


def test_logical_rules_drop_axes_that_do_not_divide():
    mesh = sharding.make_mesh((2, 1, 4))
    spec = sharding.logical_to_spec(("batch", "kv_heads", "head_dim"), (6, 3, 64), mesh)
    assert spec == jax.sharding.PartitionSpec("data", None, None)
    spec = sharding.logical_to_spec(("batch", "mlp"), (3, 8), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "tensor")
