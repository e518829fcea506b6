"""Which tiles of a packed row's score matrix the packed mask lets through, and the tile lists the
block-sparse kernel (`aft_jax.model.packed_attention`) walks.

A packed row (`aft_jax.data.packing`) gives every token a segment id (its piece; 0 for filler), a branch id
(0 for the prompt, k + 1 for candidate k) and a position. Query t sees key s when

    s <= t  and  segment_s == segment_t  and  (branch_s == 0 or branch_s == branch_t)
            and  position_t - position_s < window

(`aft_jax.model.attention.packed_mask` and `window_mask`; no window is `NO_WINDOW`). The score matrix is cut
into `block_q x block_k` tiles; a tile is *visible* when at least one of its pairs is. `tile_visibility`
computes that exactly, one query tile at a time, so the `[T, T]` mask is never held whole; `TileLists` orders
each query tile's visible key tiles (the forward and dq kernels) and each key tile's visible query tiles
(the dk/dv kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

NO_WINDOW = 2**30  # a window no row reaches: plain causal attention
MASKED = float(jnp.finfo(jnp.float32).min)  # the logit of a masked-out key


def visible(query, key, window):
    """The packed mask's predicate: query `(index, segment, branch, position)` sees key `(...)`; the four
    arrays of each side broadcast against the other's."""
    q_index, q_segment, q_branch, q_position = query
    k_index, k_segment, k_branch, k_position = key
    return (
        (k_index <= q_index)
        & (k_segment == q_segment)
        & ((k_branch == 0) | (k_branch == q_branch))
        & (q_position - k_position < window)
    )


def tile_visibility(segment_ids_bt, branch_ids_bt, positions_bt, window, block_q: int, block_k: int):
    """`[B, T / block_q, T / block_k]` bool: tile (i, j) holds a pair that `visible` lets through. Exact, one
    query tile at a time (`[B, block_q, T]` at once)."""
    b, t = segment_ids_bt.shape
    index_t = jnp.arange(t, dtype=jnp.int32)
    key = (index_t[None, None], segment_ids_bt[:, None], branch_ids_bt[:, None], positions_bt[:, None])

    def one_query_tile(i):
        rows = jax.lax.dynamic_slice_in_dim
        query = (
            rows(index_t, i * block_q, block_q)[None, :, None],
            rows(segment_ids_bt, i * block_q, block_q, axis=1)[:, :, None],
            rows(branch_ids_bt, i * block_q, block_q, axis=1)[:, :, None],
            rows(positions_bt, i * block_q, block_q, axis=1)[:, :, None],
        )
        seen_bqt = visible(query, key, window)
        return seen_bqt.reshape(b, block_q, t // block_k, block_k).any(axis=(1, 3))

    return jax.lax.map(one_query_tile, jnp.arange(t // block_q)).transpose(1, 0, 2)


def visible_first(visible_bij):
    """For each (b, i): the j with `visible_bij[b, i, j]` in increasing order, then the last of them repeated
    to the end (a repeated tile index makes a kernel fetch nothing new); and how many there are. Returns
    `(tiles_bij int32, counts_bi int32)`."""
    n = visible_bij.shape[-1]
    order_bij = jnp.argsort(~visible_bij, axis=-1, stable=True).astype(jnp.int32)
    counts_bi = visible_bij.sum(-1).astype(jnp.int32)
    last_bi1 = jnp.take_along_axis(order_bij, jnp.maximum(counts_bi - 1, 0)[..., None], axis=-1)
    tiles_bij = jnp.where(jnp.arange(n) < counts_bi[..., None], order_bij, last_bi1)
    return tiles_bij, counts_bi


class TileLists(NamedTuple):
    """The tiles a block-sparse kernel visits: for query tile i, `key_tiles[b, i, :key_counts[b, i]]`; for key
    tile j, `query_tiles[b, j, :query_counts[b, j]]` (each padded with its last entry)."""

    key_tiles: jnp.ndarray
    key_counts: jnp.ndarray
    query_tiles: jnp.ndarray
    query_counts: jnp.ndarray


def tile_lists(visible_bij) -> TileLists:
    """Both walks of the visible tiles `[B, nq, nk]` (`tile_visibility`)."""
    return TileLists(*visible_first(visible_bij), *visible_first(visible_bij.transpose(0, 2, 1)))
