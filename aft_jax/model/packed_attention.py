"""Block-sparse attention for packed rows: a Pallas kernel that computes only the tiles the packed mask lets
through (TPU; Pallas interpret mode elsewhere, for tests).

No mask tensor goes in: each token's segment id, branch id and position (`aft_jax.model.packed_blocks`)
do. `packed_plan` turns them, once per forward, into the tiles each kernel visits (`TileLists`); inside a
visited `block_q x block_k` tile the kernel evaluates the mask's predicate (`packed_blocks.visible`)
itself. Three kernels, flash-attention style with float32 statistics and accumulators:

- forward, per query tile over its visible key tiles: online softmax, out = acc / l, lse = m + log l;
- dq, per query tile over its visible key tiles: p = exp(s - lse), ds = p (do v^T - rowsum(do * out)),
  dq = scale ds k;
- dk/dv, per key tile over its visible query tiles, in transposed form (keys as rows): dv = p^T do,
  dk = scale ds^T q; computed per query head and summed over the heads of each key/value head (GQA).

A grid step past a tile list's end repeats the list's last tile, so Pallas fetches nothing new for it, and
skips the arithmetic. Per-token ids go in twice, laid out for either side of a score tile: broadcast over
128 lanes (`[B, T, 3 * 128]`, a tile's rows) and over 8 sublanes (`[B, 3 * 8, T]`, a tile's columns), the
layouts of the stock TPU flash-attention kernels' segment ids.

Why not the stock splash attention kernel with segment ids: splash skips tiles by a *static* mask known
when the kernel is built (`MaskInfo`); its segment ids are only compared inside tiles it visits anyway, so
a packing that changes every batch saves nothing; and a cascade of two splash calls merged by their
log-sum-exps cannot be differentiated (splash raises "Higher-order AD not supported" when its residuals are
asked for under a VJP).

This module holds the project's Pallas calls (`pl.pallas_call`, `pltpu.PrefetchScalarGridSpec`,
`pltpu.CompilerParams`), the version-sensitive API.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from aft_jax.model.packed_blocks import MASKED, NO_WINDOW, TileLists, tile_lists, tile_visibility, visible

LANES, SUBLANES = 128, 8
IDS = 3  # segment, branch, position
PAD_SEGMENT = -1  # rows are padded to whole tiles with tokens of their own segment, seen by no real token


class PackedPlan(NamedTuple):
    """What each layer's kernel call reads, built once per forward by `packed_plan`: the ids in both layouts,
    the tiles to visit, and the window (`[1]` int32; `NO_WINDOW` for none)."""

    ids_lanes: jnp.ndarray
    ids_rows: jnp.ndarray
    tiles: TileLists
    window: jnp.ndarray


def packed_plan(segment_ids_bt, branch_ids_bt, positions_bt, window: int | None, block_q: int, block_k: int):
    """The `PackedPlan` of packed rows `[B, T]` for tiles of `block_q x block_k` (rows padded to whole tiles)."""
    b, t = segment_ids_bt.shape
    padded = -(-t // block_q) * block_q
    padded = -(-padded // block_k) * block_k
    if padded % block_q:
        raise ValueError(f"block_q={block_q} and block_k={block_k}: one must divide the other")

    def pad(x, value):
        return jnp.pad(x.astype(jnp.int32), ((0, 0), (0, padded - t)), constant_values=value)

    ids = (pad(segment_ids_bt, PAD_SEGMENT), pad(branch_ids_bt, 0), pad(positions_bt, 0))
    window_arr = jnp.asarray([NO_WINDOW if window is None else window], jnp.int32)
    tiles = tile_lists(tile_visibility(*ids, window_arr[0], block_q, block_k))
    ids_lanes = jnp.concatenate([jnp.broadcast_to(x[:, :, None], (b, padded, LANES)) for x in ids], axis=-1)
    ids_rows = jnp.concatenate([jnp.broadcast_to(x[:, None, :], (b, SUBLANES, padded)) for x in ids], axis=1)
    return PackedPlan(ids_lanes, ids_rows, tiles, window_arr)


def packed_attention(q_bthk, k_btgk, v_btgk, plan: PackedPlan):
    """softmax(q k^T / sqrt(head_dim) under the packed mask) v, `[B, T, H, Dh]`, each key/value head serving
    `H / Hkv` query heads; the same as `attention.grouped_attention` with `packed_mask` (and `window_mask`)."""
    t = q_bthk.shape[1]
    padded = plan.ids_rows.shape[-1]

    def heads_first(x):  # [B, T, heads, Dh] -> [B, heads, padded, Dh]
        return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out_bhtk = _attention(heads_first(q_bthk), heads_first(k_btgk), heads_first(v_btgk), plan)
    return out_bhtk.transpose(0, 2, 1, 3)[:, :t]


def _interpret() -> bool:
    return jax.default_backend() != "tpu"


def _blocks(plan: PackedPlan) -> tuple[int, int]:
    """(block_q, block_k) of a plan, from its tile lists' shapes."""
    padded = plan.ids_rows.shape[-1]
    return padded // plan.tiles.key_tiles.shape[1], padded // plan.tiles.query_tiles.shape[1]


def _lanes(x_r128, width: int):
    """A lane-broadcast `[rows, 128]` array as `[rows, width]`."""
    return jnp.tile(x_r128, (1, width // LANES)) if width >= LANES else x_r128[:, :width]


def _seen(row_ids_ref, col_ids_ref, row_start, col_start, window, rows_are_queries: bool):
    """`[rows, cols]` bool: the packed mask over one score tile whose rows' ids are lane-broadcast
    (`[rows, 3 * 128]`) and whose columns' ids are sublane-broadcast (`[3 * 8, cols]`)."""
    rows, cols = row_ids_ref.shape[0], col_ids_ref.shape[1]
    row_ids = [_lanes(row_ids_ref[:, LANES * x : LANES * (x + 1)], cols) for x in range(IDS)]
    col_ids = [col_ids_ref[SUBLANES * x : SUBLANES * x + 1, :] for x in range(IDS)]
    row_index = row_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0)
    col_index = col_start + jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 1)
    row_side, col_side = (row_index, *row_ids), (col_index, *col_ids)
    return visible(row_side, col_side, window) if rows_are_queries else visible(col_side, row_side, window)


def _dot(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _scores(row_ref, col_ref, row_ids_ref, col_ids_ref, row_start, col_start, window, rows_are_queries, scale):
    """float32 `scale * rows cols^T` of one tile (queries as rows, or keys as rows for the dk/dv kernel),
    `MASKED` where the packed mask hides the pair."""
    s = _dot(row_ref[...], col_ref[...], 1, 1) * scale
    seen = _seen(row_ids_ref, col_ids_ref, row_start, col_start, window, rows_are_queries)
    return jnp.where(seen, s, MASKED)


def _forward_kernel(key_tiles, key_counts, window, q_ref, k_ref, v_ref, q_ids_ref, k_ids_ref,
                    o_ref, lse_ref, m_scratch, l_scratch, acc_scratch, *, scale):  # fmt: skip
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k, head_dim = q_ref.shape[0], k_ref.shape[0], q_ref.shape[1]

    @pl.when(n == 0)
    def _start():
        m_scratch[...] = jnp.full(m_scratch.shape, -jnp.inf, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(n < key_counts[b, i])
    def _tile():
        j = key_tiles[b, i, n]
        s = _scores(q_ref, k_ref, q_ids_ref, k_ids_ref, i * block_q, j * block_k, window[0], True, scale)
        m_prev = m_scratch[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - _lanes(m_next, block_k))
        alpha = jnp.exp(m_prev - m_next)
        l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
        m_scratch[...] = m_next
        pv = _dot(p.astype(v_ref.dtype), v_ref[...], 1, 0)
        acc_scratch[...] = acc_scratch[...] * _lanes(alpha, head_dim) + pv

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        l_now = l_scratch[...]
        o_ref[...] = (acc_scratch[...] / _lanes(l_now, head_dim)).astype(o_ref.dtype)
        lse_ref[...] = m_scratch[...] + jnp.log(l_now)


def _dq_kernel(key_tiles, key_counts, window, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, q_ids_ref, k_ids_ref,
               dq_ref, dq_scratch, *, scale):  # fmt: skip
    b, i, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when(n == 0)
    def _start():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    @pl.when(n < key_counts[b, i])
    def _tile():
        j = key_tiles[b, i, n]
        s = _scores(q_ref, k_ref, q_ids_ref, k_ids_ref, i * block_q, j * block_k, window[0], True, scale)
        p = jnp.exp(s - lse_ref[0][:, None])
        dp = _dot(do_ref[...], v_ref[...], 1, 1)
        ds = p * (dp - di_ref[0][:, None])
        dq_scratch[...] += _dot(ds.astype(k_ref.dtype), k_ref[...], 1, 0) * scale

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_scratch[...].astype(dq_ref.dtype)


def _dkv_kernel(query_tiles, query_counts, window, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, k_ids_ref,
                q_ids_ref, dk_ref, dv_ref, dk_scratch, dv_scratch, *, scale):  # fmt: skip
    b, j, n = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]

    @pl.when(n == 0)
    def _start():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    @pl.when(n < query_counts[b, j])
    def _tile():
        i = query_tiles[b, j, n]
        # keys as rows: [block_k, block_q]
        s_t = _scores(k_ref, q_ref, k_ids_ref, q_ids_ref, j * block_k, i * block_q, window[0], False, scale)
        p_t = jnp.exp(s_t - lse_ref[...])
        dv_scratch[...] += _dot(p_t.astype(do_ref.dtype), do_ref[...], 1, 0)
        dp_t = _dot(v_ref[...], do_ref[...], 1, 1)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_scratch[...] += _dot(ds_t.astype(q_ref.dtype), q_ref[...], 1, 0) * scale

    @pl.when(n == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_scratch[...]
        dv_ref[...] = dv_scratch[...]


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, *args):
    """`pl.pallas_call` with three scalar-prefetched operands (a tile list, its counts, the window)."""
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
        ),
        out_shape=out_shape,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret(),
    )(*args)


def _forward(q, k, v, plan: PackedPlan):
    """(out `[B, H, T, Dh]`, lse `[B, H, 1, T]`) of heads-first, tile-padded q, k, v."""
    b, h, t, head_dim = q.shape
    r = h // k.shape[1]
    block_q, block_k = _blocks(plan)
    tiles = plan.tiles
    grid = (b, h, t // block_q, tiles.key_tiles.shape[2])
    query_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, n, kt, kc, w: (b, h, i, 0))
    key_block = pl.BlockSpec(
        (None, None, block_k, head_dim), lambda b, h, i, n, kt, kc, w: (b, jax.lax.div(h, r), kt[b, i, n], 0)
    )
    in_specs = [
        query_block, key_block, key_block,
        pl.BlockSpec((None, block_q, IDS * LANES), lambda b, h, i, n, kt, kc, w: (b, i, 0)),
        pl.BlockSpec((None, IDS * SUBLANES, block_k), lambda b, h, i, n, kt, kc, w: (b, 0, kt[b, i, n])),
    ]  # fmt: skip
    out_specs = [query_block, pl.BlockSpec((None, None, block_q, LANES), lambda b, h, i, n, kt, kc, w: (b, h, i, 0))]
    out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t, LANES), jnp.float32)]
    scratch = [pltpu.VMEM((block_q, LANES), jnp.float32)] * 2 + [pltpu.VMEM((block_q, head_dim), jnp.float32)]
    kernel = functools.partial(_forward_kernel, scale=head_dim**-0.5)
    out, lse = _call(kernel, grid, in_specs, out_specs, out_shape, scratch,
                     tiles.key_tiles, tiles.key_counts, plan.window, q, k, v, plan.ids_lanes, plan.ids_rows)  # fmt: skip
    return out, lse[..., 0][:, :, None, :]


def _backward(q, k, v, out, lse, do, plan: PackedPlan):
    """(dq, dk, dv) of heads-first, tile-padded inputs; dk/dv summed over each key/value head's query heads."""
    b, h, t, head_dim = q.shape
    g = k.shape[1]
    r = h // g
    block_q, block_k = _blocks(plan)
    tiles, scale = plan.tiles, head_dim**-0.5
    di = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)[:, :, None, :]  # [B, H, 1, T]

    # dq: per query tile over its visible key tiles
    query_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, n, kt, kc, w: (b, h, i, 0))
    key_block = pl.BlockSpec(
        (None, None, block_k, head_dim), lambda b, h, i, n, kt, kc, w: (b, jax.lax.div(h, r), kt[b, i, n], 0)
    )
    row_block = pl.BlockSpec((None, None, 1, block_q), lambda b, h, i, n, kt, kc, w: (b, h, 0, i))
    in_specs = [
        query_block, key_block, key_block, query_block, row_block, row_block,
        pl.BlockSpec((None, block_q, IDS * LANES), lambda b, h, i, n, kt, kc, w: (b, i, 0)),
        pl.BlockSpec((None, IDS * SUBLANES, block_k), lambda b, h, i, n, kt, kc, w: (b, 0, kt[b, i, n])),
    ]  # fmt: skip
    dq = _call(
        functools.partial(_dq_kernel, scale=scale), (b, h, t // block_q, tiles.key_tiles.shape[2]), in_specs,
        query_block, jax.ShapeDtypeStruct(q.shape, q.dtype), [pltpu.VMEM((block_q, head_dim), jnp.float32)],
        tiles.key_tiles, tiles.key_counts, plan.window, q, k, v, do, lse, di, plan.ids_lanes, plan.ids_rows,
    )  # fmt: skip

    # dk, dv: per key tile (and query head) over its visible query tiles
    query_block = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, j, n, qt, qc, w: (b, h, qt[b, j, n], 0))
    key_block = pl.BlockSpec(
        (None, None, block_k, head_dim), lambda b, h, j, n, qt, qc, w: (b, jax.lax.div(h, r), j, 0)
    )
    row_block = pl.BlockSpec((None, None, 1, block_q), lambda b, h, j, n, qt, qc, w: (b, h, 0, qt[b, j, n]))
    in_specs = [
        query_block, key_block, key_block, query_block, row_block, row_block,
        pl.BlockSpec((None, block_k, IDS * LANES), lambda b, h, j, n, qt, qc, w: (b, j, 0)),
        pl.BlockSpec((None, IDS * SUBLANES, block_q), lambda b, h, j, n, qt, qc, w: (b, 0, qt[b, j, n])),
    ]  # fmt: skip
    per_head_block = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, n, qt, qc, w: (b, h, j, 0))
    per_head = jax.ShapeDtypeStruct((b, h, t, head_dim), jnp.float32)
    dk_h, dv_h = _call(
        functools.partial(_dkv_kernel, scale=scale), (b, h, t // block_k, tiles.query_tiles.shape[2]), in_specs,
        [per_head_block] * 2, [per_head] * 2, [pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2,
        tiles.query_tiles, tiles.query_counts, plan.window, q, k, v, do, lse, di, plan.ids_lanes, plan.ids_rows,
    )  # fmt: skip
    dk = dk_h.reshape(b, g, r, t, head_dim).sum(2).astype(k.dtype)
    dv = dv_h.reshape(b, g, r, t, head_dim).sum(2).astype(v.dtype)
    return dq, dk, dv


@jax.custom_vjp
def _attention(q, k, v, plan: PackedPlan):
    return _forward(q, k, v, plan)[0]


def _attention_fwd(q, k, v, plan):
    out, lse = _forward(q, k, v, plan)
    return out, (q, k, v, out, lse, plan)


def _attention_bwd(residuals, do):
    q, k, v, out, lse, plan = residuals
    dq, dk, dv = _backward(q, k, v, out, lse, do, plan)
    return dq, dk, dv, jax.tree.map(lambda _: None, plan)


_attention.defvjp(_attention_fwd, _attention_bwd)
