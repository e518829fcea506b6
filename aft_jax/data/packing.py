"""The packed group layout: each question's prompt once, then its candidates, in rows of a fixed token budget.

A group becomes one or more *pieces*: the prompt without its last token, then one *branch* per candidate:
the prompt's last token, the completion and EOS. A branch sees the prompt and its own earlier tokens only
(`aft_jax.model.attention.packed_mask`), at the positions of its unpacked sequence, so every token gets the
log-prob it has unpacked; the prompt's last token starts every branch so that the next-token shift stays
inside the branch. A group whose piece would pass `tokens_per_row` is split into several pieces, each with
the prompt again; a branch is never cut. Pieces are packed into rows first-fit by decreasing length; given a
`LayoutCost` (`aft_jax.data.layout_cost`), `plan_rows` chooses the rows' length, up to `tokens_per_row`, by
the batch's estimated cost, or the padded layout when that is cheaper.

Token arrays `[R, L]` (`TOKEN_SCHEMA`): `input_ids`; `positions`; `segment_ids`, the piece within its row
(1, 2, ...; 0: filler); `branch_ids`, 0 for the prompt and k + 1 for candidate slot k; `completion_mask`;
`slot_ids`, the candidate `j * K + k` (group j of the batch, slot k) each completion token belongs to (0
elsewhere). Per-candidate arrays stay `[B, K]` as in the padded layout.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from aft_jax.data.layout_cost import LayoutCost, packed_cost, padded_cost
from aft_jax.errors import SettingError

TOKEN_SCHEMA = {
    "input_ids": np.int32,
    "positions": np.int32,
    "segment_ids": np.int32,
    "branch_ids": np.int32,
    "completion_mask": np.int32,
    "slot_ids": np.int32,
}


class Piece(NamedTuple):
    """One row segment: `shared`, the prompt without its last token, then each branch `(k, slot, tokens)`:
    candidate slot k of its group, its `slot_ids` value, and the prompt's last token + completion + EOS."""

    shared: list[int]
    branches: list[tuple[int, int, list[int]]]

    @property
    def length(self) -> int:
        return len(self.shared) + sum(len(tokens) for _, _, tokens in self.branches)


def group_pieces(tokens: list[list[int]], prompt_length: int, tokens_per_row: int, slot_base: int = 0) -> list[Piece]:
    """The pieces of one group (`tokens`: prompt + completion + EOS per candidate, in slot order): each takes
    candidates while it stays within `tokens_per_row`; candidate k's `slot_ids` value is `slot_base + k`."""
    shared = tokens[0][: prompt_length - 1]
    pieces: list[Piece] = []
    for k, seq in enumerate(tokens):
        branch = seq[prompt_length - 1 :]
        if len(shared) + len(branch) > tokens_per_row:
            raise SettingError(
                f"data.tokens_per_row={tokens_per_row}: a sequence of {len(seq)} tokens does not fit in a packed row; "
                "expected at least the sequence length (data.max_length, or plan's --seq-len)"
            )
        if not pieces or pieces[-1].length + len(branch) > tokens_per_row:
            pieces.append(Piece(shared, []))
        pieces[-1].branches.append((k, slot_base + k, branch))
    return pieces


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Items (indices into `lengths`) per bin: first-fit by decreasing length, ties by index."""
    bins: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(capacity - lengths[i])
    return bins


def pack_rows(rows_of_pieces: list[list[Piece]], rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Token arrays `[rows, length]`: row r holds the pieces `rows_of_pieces[r]` one after another (segment
    ids 1, 2, ...); rows past `len(rows_of_pieces)` and the ends of rows are filler."""
    out = {name: np.zeros((rows, length), dtype) for name, dtype in TOKEN_SCHEMA.items()}
    out["input_ids"][:] = pad_id
    for r, pieces in enumerate(rows_of_pieces):
        at = 0
        for segment, piece in enumerate(pieces, start=1):
            spans = [(0, piece.shared, None)] + [(k + 1, tokens, slot) for k, slot, tokens in piece.branches]
            for branch, tokens, slot in spans:
                end = at + len(tokens)
                start_position = 0 if branch == 0 else len(piece.shared)
                out["input_ids"][r, at:end] = tokens
                out["positions"][r, at:end] = np.arange(start_position, start_position + len(tokens))
                out["segment_ids"][r, at:end] = segment
                out["branch_ids"][r, at:end] = branch
                if branch:  # the completion: every branch token after the prompt's last one
                    out["completion_mask"][r, at + 1 : end] = 1
                    out["slot_ids"][r, at + 1 : end] = slot
                at = end
    return out


def batch_units(batch_size: int, shards: int, micro_batches: int) -> list[list[int]]:
    """The groups (indices into the global batch) of each (shard, micro-batch) unit, shard-major: a device
    holds the groups `[s B / S, (s + 1) B / S)` of shard s, and micro-batch m takes every group `b` with
    `b % M == m` (as `reshape(B / M, M)` does in the train step)."""
    per_shard = batch_size // shards
    return [
        [b for b in range(s * per_shard, (s + 1) * per_shard) if b % micro_batches == m]
        for s in range(shards)
        for m in range(micro_batches)
    ]


def bucket(rows: int) -> int:
    """`rows` rounded up to an eighth of its leading power of two (1-16, 18, 20, ..., 32, 36, 40, ...): at most
    12.5% filler rows, and few distinct batch shapes to compile."""
    step = 1 << max(rows.bit_length() - 4, 0)
    return -(-rows // step) * step


def unit_rows(lengths_per_unit: list[list[int]], tokens_per_row: int, pad_multiple: int) -> tuple[int, int]:
    """`(rows per unit, row length)` of a batch whose units hold pieces of these lengths: the most rows any
    unit fills (`bucket`ed), and the longest row rounded up to `pad_multiple` (at most `tokens_per_row`)."""
    rows, fill = 1, 1
    for lengths in lengths_per_unit:
        bins = first_fit(lengths, tokens_per_row)
        rows = max(rows, len(bins))
        fill = max([fill] + [sum(lengths[i] for i in b) for b in bins])
    return bucket(rows), min(tokens_per_row, -(-fill // pad_multiple) * pad_multiple)


class RowPlan(NamedTuple):
    """Packed rows of a batch: `rows_per_unit` rows per (shard, micro-batch) unit, each `length` tokens long,
    filled first-fit up to `capacity` tokens."""

    rows_per_unit: int
    length: int
    capacity: int


def plan_rows(
    lengths_per_unit: list[list[int]],
    tokens_per_row: int,
    pad_multiple: int,
    cost: LayoutCost | None = None,
    padded: tuple[int, int] | None = None,
) -> RowPlan | None:
    """The rows of a batch whose units hold pieces of these lengths. Without `cost`: rows of `tokens_per_row`
    (`unit_rows`). With it: the capacity, among multiples of `pad_multiple` from the longest piece up to
    `tokens_per_row`, whose rows cost least (`layout_cost.packed_cost`); None when the padded layout of the
    same batch, `padded` = (sequences, length), costs less still."""
    if cost is None:
        return RowPlan(*unit_rows(lengths_per_unit, tokens_per_row, pad_multiple), tokens_per_row)
    pieces = [n for lengths in lengths_per_unit for n in lengths]
    shortest_row = -(-max(pieces) // pad_multiple) * pad_multiple
    capacities = sorted({*range(shortest_row, tokens_per_row, pad_multiple), tokens_per_row})
    best, best_cost = None, float("inf")
    for capacity in capacities:
        rows, length = unit_rows(lengths_per_unit, capacity, pad_multiple)
        estimate = packed_cost(cost, rows * len(lengths_per_unit), length, pieces)
        if estimate < best_cost:
            best, best_cost = RowPlan(rows, length, capacity), estimate
    if padded is not None and padded_cost(cost, *padded) < best_cost:
        return None
    return best


def pack_units(
    units: list[list[Piece]], rows_per_unit: int, micro_batches: int, tokens_per_row: int, length: int, pad_id: int
):
    """Token arrays of consecutive units (shard-major, `batch_units` order), `length` tokens per row: each
    unit's pieces first-fit into `rows_per_unit` rows of `tokens_per_row` (the capacity `plan_rows` planned
    them with), which are the rows `r` of its shard's block with `r % M == m`."""
    per_shard = micro_batches * rows_per_unit
    rows_of_pieces: list[list[Piece]] = [[] for _ in range(len(units) * rows_per_unit)]
    for u, pieces in enumerate(units):
        shard, m = divmod(u, micro_batches)
        bins = first_fit([p.length for p in pieces], tokens_per_row)
        if len(bins) > rows_per_unit:
            raise ValueError(f"unit {u} needs {len(bins)} rows, more than the {rows_per_unit} planned")
        for i, members in enumerate(bins):
            rows_of_pieces[shard * per_shard + i * micro_batches + m] = [pieces[p] for p in members]
    return pack_rows(rows_of_pieces, len(rows_of_pieces), length, pad_id)
