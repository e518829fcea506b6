"""The block-sparse Pallas attention for packed rows (interpret mode on CPU) against the dense XLA reference
(`grouped_attention` under `packed_mask` and `window_mask`): output and dq, dk, dv on rows from the real
packer (ragged groups, several groups per row, a group split over rows, GQA, a window); the tiles it visits
against a brute-force scan of the mask; hidden tiles never touched; and its lowering for TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aft_jax.data import packing
from aft_jax.data.batches import EncodedGroup, collate_packed
from aft_jax.data.groups import Candidate
from aft_jax.model import packed_attention as kernel
from aft_jax.model.attention import grouped_attention, packed_mask, resolve_impl, window_mask
from aft_jax.model.packed_blocks import tile_visibility

B_Q, B_K = 8, 16  # small tiles, so that a row has many and most are hidden
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16


def packed_rows(seed=0, groups=6, tokens_per_row=48):
    """Packed rows of random groups (prompts of 4-12 tokens, 1-4 candidates of 3-16; the first: 4 of 12-16)
    from the real packer; at least one group is split over rows and at least one row holds several groups."""
    rng = np.random.default_rng(seed)
    encoded = []
    for g in range(groups):
        prompt = list(rng.integers(1, 50, size=int(rng.integers(4, 13))))
        n, shortest = (4, 12) if g == 0 else (int(rng.integers(1, 5)), 3)
        tokens = [prompt + list(rng.integers(1, 50, size=int(rng.integers(shortest, 17)))) for _ in range(n)]
        encoded.append(EncodedGroup(tokens, [len(prompt)] * n, [Candidate("", True, 1)] * n))
    rows = collate_packed(encoded, 4, tokens_per_row=tokens_per_row, pad_id=0, pad_multiple=8)
    pieces = [packing.group_pieces(g.tokens, g.prompt_lengths[0], tokens_per_row) for g in encoded]
    assert any(len(p) > 1 for p in pieces), "no group split over rows"
    assert any(len(set(row[row > 0])) > 1 for row in rows["segment_ids"]), "no row with several groups"
    return {k: jnp.asarray(rows[k]) for k in ("segment_ids", "branch_ids", "positions")}


def dense_mask(ids, window):
    mask = packed_mask(ids["segment_ids"], ids["branch_ids"])
    return mask if window is None else mask & window_mask(ids["positions"], ids["positions"], window)


def qkv(ids, dtype=jnp.float32, seed=1):
    rng = np.random.default_rng(seed)
    b, t = ids["segment_ids"].shape
    shapes = [(b, t, HEADS, HEAD_DIM), (b, t, KV_HEADS, HEAD_DIM), (b, t, KV_HEADS, HEAD_DIM)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def plan_of(ids, window, block_q=B_Q, block_k=B_K):
    return kernel.packed_plan(ids["segment_ids"], ids["branch_ids"], ids["positions"], window, block_q, block_k)


@pytest.mark.parametrize("window", [None, 6])
def test_output_and_gradients_equal_the_dense_reference(window):
    ids = packed_rows()
    q, k, v = qkv(ids)
    mask = dense_mask(ids, window)
    plan = plan_of(ids, window)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)  # a random cotangent

    def loss_of(attend):
        return lambda q, k, v: jnp.sum(attend(q, k, v) * w)

    dense = loss_of(lambda q, k, v: grouped_attention(q, [(k, v, mask)]))
    blocked = loss_of(lambda q, k, v: kernel.packed_attention(q, k, v, plan))
    np.testing.assert_allclose(
        kernel.packed_attention(q, k, v, plan), grouped_attention(q, [(k, v, mask)]), atol=1e-5, rtol=1e-5
    )
    want = jax.grad(dense, argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(blocked, argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=name)


def test_bfloat16_inputs_match_the_reference_in_bfloat16():
    ids = packed_rows()
    q, k, v = qkv(ids, jnp.bfloat16)
    got = kernel.packed_attention(q, k, v, plan_of(ids, None))
    want = grouped_attention(q, [(k, v, dense_mask(ids, None))])
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("window", [None, 6])
def test_the_tiles_visited_are_exactly_those_the_mask_lets_through(window):
    ids = packed_rows()
    mask = np.asarray(dense_mask(ids, window))
    b, t, _ = mask.shape
    padded = -(-t // B_K) * B_K
    mask = np.pad(mask, ((0, 0), (0, padded - t), (0, padded - t)))  # padding tokens: seen by no real token
    scan = np.zeros((b, padded // B_Q, padded // B_K), bool)
    for i in range(padded // B_Q):
        for j in range(padded // B_K):
            scan[:, i, j] = mask[:, i * B_Q : (i + 1) * B_Q, j * B_K : (j + 1) * B_K].any(axis=(1, 2))
    plan = plan_of(ids, window)
    got = np.asarray(tile_visibility(*(plan.ids_rows[:, 8 * x] for x in range(3)), plan.window[0], B_Q, B_K))
    real = np.arange(padded // B_Q) * B_Q < t  # query tiles holding a real token; the rest see padding only
    np.testing.assert_array_equal(got[:, real], scan[:, real])
    assert 0.2 < 1 - scan.mean() < 0.8, "the test rows should hide some tiles and show others"
    tiles = plan.tiles
    for r in range(b):
        for i in range(padded // B_Q):
            n = int(tiles.key_counts[r, i])
            assert list(np.asarray(tiles.key_tiles[r, i, :n])) == list(np.flatnonzero(got[r, i]))
            assert set(np.asarray(tiles.key_tiles[r, i, n:])) <= {int(tiles.key_tiles[r, i, n - 1])}
        for j in range(padded // B_K):
            n = int(tiles.query_counts[r, j])
            assert list(np.asarray(tiles.query_tiles[r, j, :n])) == list(np.flatnonzero(got[r, :, j]))


def test_a_hidden_tile_is_never_computed():
    """NaN keys and values in one key tile: the query tiles the mask hides it from stay finite in the output
    and dq (a computed tile would spread the NaN through 0 * NaN), as do dk and dv of the key tiles seen by
    none of the query tiles that see it."""
    ids = packed_rows()
    block = 8
    plan = plan_of(ids, None, block, block)
    q, k, v = qkv(ids)
    visible = np.asarray(tile_visibility(*(plan.ids_rows[:, 8 * x] for x in range(3)), plan.window[0], block, block))
    t = q.shape[1]
    # a row and key tile j with query tiles that see it and that do not, and key tiles apart from it
    apart_bjj = ~np.einsum("bij,bik->bjk", visible, visible)  # no query tile sees both key tiles
    row, j = next((r, j) for r in range(visible.shape[0]) for j in range(visible.shape[2])
                  if 0 < visible[r, :, j].sum() < visible.shape[1] and apart_bjj[r, j].any())  # fmt: skip
    poison = np.zeros(t, bool)
    poison[j * block : (j + 1) * block] = True
    k = k.at[row, poison].set(jnp.nan)
    v = v.at[row, poison].set(jnp.nan)
    out, vjp = jax.vjp(lambda q, k, v: kernel.packed_attention(q, k, v, plan), q, k, v)
    dq, dk, dv = vjp(jnp.ones_like(out))
    sees_j = np.repeat(visible[row, :, j], block)[:t]
    assert np.isnan(np.asarray(out[row][sees_j])).any()
    assert np.isfinite(np.asarray(out[row][~sees_j])).all() and np.isfinite(np.asarray(dq[row][~sees_j])).all()
    apart = np.repeat(apart_bjj[row, j], block)[:t]
    assert np.isfinite(np.asarray(dk[row][apart])).all() and np.isfinite(np.asarray(dv[row][apart])).all()
    others = np.arange(q.shape[0]) != row
    for x in (out, dq, dk, dv):
        assert np.isfinite(np.asarray(x[others])).all()


def test_auto_takes_the_kernel_for_packed_rows_on_tpu_only(monkeypatch):
    assert resolve_impl("pallas", "float32", 64, packed=True) == "pallas"
    assert resolve_impl("pallas", "float32", 64, packed=False) == "xla"
    assert resolve_impl("auto", "bfloat16", 64, packed=True) == "xla"  # CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert resolve_impl("auto", "bfloat16", 64, packed=True) == "pallas"
    assert resolve_impl("auto", "bfloat16", 64, packed=False) == "xla"


def test_forward_and_backward_lower_for_tpu(monkeypatch):
    """The three kernels (forward, dq, dk/dv) lower to Mosaic for TPU in 128-token tiles, bfloat16, GQA and a
    window, exported from this CPU-only machine (Mosaic's own compile needs a TPU and is not run here)."""
    monkeypatch.setattr(kernel, "_interpret", lambda: False)
    b, t = 2, 320

    def loss(q, k, v, segment_ids, branch_ids, positions):
        plan = kernel.packed_plan(segment_ids, branch_ids, positions, 100, 128, 128)
        return jnp.sum(kernel.packed_attention(q, k, v, plan).astype(jnp.float32) ** 2)

    args = [jax.ShapeDtypeStruct((b, t, h, 64), jnp.bfloat16) for h in (HEADS, KV_HEADS, KV_HEADS)]
    args += [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 3
    exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(*args)
    assert exported.mlir_module().count("tpu_custom_call") == 3


@pytest.mark.parametrize("mesh_shape", [(2, 2, 1), (1, 2, 2)])
def test_the_kernel_on_a_mesh_equals_one_device(mesh_shape):
    """Under `use_mesh` the kernel runs per shard (`jax.shard_map`: rows over data x fsdp, heads over tensor
    where it divides both head counts): value and gradients equal the one-device result."""
    from aft_jax.model.attention import packed_attention_per_shard
    from aft_jax.parallel import sharding

    ids = {key: x[:4] for key, x in packed_rows().items()}  # rows that split over the mesh's data x fsdp
    q, k, v = qkv(ids)
    plan = plan_of(ids, 6)
    w = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)

    def value_and_grads(q, k, v, plan):
        loss = lambda q, k, v: jnp.sum(packed_attention_per_shard(q, k, v, plan) * w)  # noqa: E731
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    want = jax.jit(value_and_grads)(q, k, v, plan)
    mesh = sharding.make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    rows = lambda x: sharding.shard_rows(x, mesh)  # noqa: E731
    with sharding.use_mesh(mesh):
        assert sharding.active_spec(("activation_batch",), (4,))[0] is not None
        got = jax.jit(value_and_grads)(rows(q), rows(k), rows(v), jax.tree.map(rows, plan))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
