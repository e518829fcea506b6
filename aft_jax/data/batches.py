"""Training batches: tokenisation of candidate groups with a logged truncation policy, their arrays in one of
two layouts, and a resumable, seeded iterator over them.

Both layouts have per-candidate arrays `[B, K]` (`CANDIDATE_SCHEMA`). Their tokens are either packed rows
`[R, L]` (`aft_jax.data.packing`: each prompt once, no padding to the longest candidate; the default) or
right-padded `[B, K, T]` arrays (`PADDED_SCHEMA`: every candidate a whole sequence; the reference layout)."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np

from aft_jax.data import packing
from aft_jax.data.groups import Candidate, DataError, Group
from aft_jax.data.layout_cost import LayoutCost
from aft_jax.errors import SettingError
from aft_jax.io.hf_files import CheckpointError

log = logging.getLogger(__name__)
TRUNCATION = ("completion", "drop")
LAYOUTS = ("packed", "padded")
CANDIDATE_SCHEMA = {  # [B, K]; collate and the plan read these tables
    "valid": np.bool_,
    "is_pos": np.bool_,
    "is_neg": np.bool_,
    "is_reference": np.bool_,
    "levels": np.int32,
    "ref_logp_sum": np.float32,
    "completion_tokens": np.int32,
}
PADDED_SCHEMA = {"input_ids": np.int32, "attention_mask": np.int32, "completion_mask": np.int32}  # [B, K, T]


@dataclasses.dataclass
class EncodedGroup:
    tokens: list[list[int]]  # prompt + completion + EOS, one list per kept candidate
    prompt_lengths: list[int]
    candidates: list[Candidate]


class GroupEncoder:
    """Tokenises groups with the model's tokenizer. Keeps the reference first and at most `group_size`
    candidates; sequences over `max_length` have their completion cut (`truncation="completion"`) or are
    dropped (`"drop"`); a prompt that leaves no room for any completion token is always dropped.
    `counts` tallies every such decision so it can be logged."""

    COUNTS = (
        "candidates_kept",
        "candidates_over_group_size",
        "candidates_truncated",
        "candidates_dropped_too_long",
        "groups_dropped_long_prompt",
        "groups_dropped_empty",
    )

    def __init__(
        self, tokenizer, max_length: int, group_size: int, truncation: str = "completion", only_reference: bool = False
    ):
        if truncation not in TRUNCATION:
            raise SettingError(f"data.truncation={truncation!r}: expected one of {', '.join(TRUNCATION)}")
        if tokenizer.eos_token_id is None:
            raise CheckpointError(
                f"{getattr(tokenizer, 'name_or_path', '') or 'the tokenizer'}: the tokenizer has no EOS token "
                "(eos_token); completions must end with one: set model.tokenizer to a tokenizer with one"
            )
        self.tokenizer, self.max_length, self.group_size = tokenizer, max_length, group_size
        self.truncation, self.only_reference = truncation, only_reference
        self.counts: Counter[str] = Counter()

    def counts_array(self) -> np.ndarray:
        """`counts` in the order of `COUNTS`."""
        return np.array([self.counts[k] for k in self.COUNTS], np.int64)

    def encode(self, group: Group) -> EncodedGroup | None:
        candidates = sorted(group.candidates, key=lambda c: not c.reference)
        if self.only_reference:
            candidates = [c for c in candidates if c.reference]
        if len(candidates) > self.group_size:
            self.counts["candidates_over_group_size"] += len(candidates) - self.group_size
            candidates = candidates[: self.group_size]
        prompt = self.tokenizer(group.prompt)["input_ids"]
        if len(prompt) >= self.max_length:
            self.counts["groups_dropped_long_prompt"] += 1
            return None
        encoded = EncodedGroup([], [], [])
        for candidate in candidates:
            completion = self.tokenizer(candidate.text, add_special_tokens=False)["input_ids"]
            tokens = prompt + completion + [self.tokenizer.eos_token_id]
            if len(tokens) > self.max_length:
                if self.truncation == "drop":
                    self.counts["candidates_dropped_too_long"] += 1
                    continue
                self.counts["candidates_truncated"] += 1
                tokens = tokens[: self.max_length]
            encoded.tokens.append(tokens)
            encoded.prompt_lengths.append(len(prompt))
            encoded.candidates.append(candidate)
        self.counts["candidates_kept"] += len(encoded.tokens)
        if not encoded.tokens:
            self.counts["groups_dropped_empty"] += 1
            return None
        return encoded


def candidate_arrays(groups: list[EncodedGroup], group_size: int) -> dict[str, np.ndarray]:
    """The `[B, K]` arrays of `CANDIDATE_SCHEMA`; slots past a group's candidates are not `valid`."""
    out = {name: np.zeros((len(groups), group_size), dtype) for name, dtype in CANDIDATE_SCHEMA.items()}
    for g, group in enumerate(groups):
        for k, (tokens, prompt_len, cand) in enumerate(zip(group.tokens, group.prompt_lengths, group.candidates)):
            out["valid"][g, k] = True
            out["is_pos"][g, k] = cand.correct
            out["is_neg"][g, k] = not cand.correct
            out["is_reference"][g, k] = cand.reference
            out["levels"][g, k] = cand.level
            out["ref_logp_sum"][g, k] = cand.logp_sum if cand.logp_sum is not None else 0.0
            out["completion_tokens"][g, k] = len(tokens) - prompt_len
    return out


def collate(groups: list[EncodedGroup], group_size: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """The padded layout: right-padded token arrays `[B, K, T]` and the per-candidate arrays `[B, K]`."""
    b = len(groups)
    out = {name: np.zeros((b, group_size, length), dtype) for name, dtype in PADDED_SCHEMA.items()}
    out["input_ids"][:] = pad_id
    for g, group in enumerate(groups):
        for k, (tokens, prompt_len) in enumerate(zip(group.tokens, group.prompt_lengths)):
            n = len(tokens)
            out["input_ids"][g, k, :n] = tokens
            out["attention_mask"][g, k, :n] = 1
            out["completion_mask"][g, k, prompt_len:n] = 1
    return out | candidate_arrays(groups, group_size)


def collate_packed(
    groups: list[EncodedGroup],
    group_size: int,
    *,
    tokens_per_row: int,
    pad_id: int,
    shards: int = 1,
    micro_batches: int = 1,
    first_group: int = 0,
    rows_per_unit: int | None = None,
    length: int | None = None,
    pad_multiple: int = 64,
    capacity: int | None = None,
) -> dict[str, np.ndarray]:
    """The packed layout of `shards` whole shards of a batch, starting at group `first_group` of it: token
    arrays `[shards * M * rows_per_unit, length]` (`packing.pack_units`, rows filled up to `capacity`, default
    `tokens_per_row`) and the per-candidate arrays. Without `rows_per_unit` and `length`, `groups` is the whole
    batch and they are planned from it (`packing.unit_rows`, rows `pad_multiple` aligned); a process holding
    part of a batch passes the whole batch's."""
    units = packing.batch_units(len(groups), shards, micro_batches)
    pieces = [
        [
            piece
            for i in unit
            for piece in packing.group_pieces(
                groups[i].tokens,
                groups[i].prompt_lengths[0],
                tokens_per_row,
                slot_base=(first_group + i) // micro_batches * group_size,
            )
        ]
        for unit in units
    ]
    capacity = capacity or tokens_per_row
    if rows_per_unit is None or length is None:
        lengths = [[p.length for p in unit] for unit in pieces]
        rows_per_unit, length = packing.unit_rows(lengths, capacity, pad_multiple)
    tokens = packing.pack_units(pieces, rows_per_unit, micro_batches, capacity, length, pad_id)
    return tokens | candidate_arrays(groups, group_size)


def collate_planned(
    groups: list[EncodedGroup],
    group_size: int,
    *,
    cost: LayoutCost,
    tokens_per_row: int,
    max_length: int,
    pad_id: int,
    shards: int = 1,
    micro_batches: int = 1,
    pad_multiple: int = 64,
) -> dict[str, np.ndarray]:
    """A whole batch in the layout `cost` estimates cheaper (`packing.plan_rows`): packed rows of the cheapest
    length up to `tokens_per_row`, or padded to its longest sequence; as `GroupBatcher` collates with a cost."""
    units = packing.batch_units(len(groups), shards, micro_batches)
    lengths = [
        [
            p.length
            for i in unit
            for p in packing.group_pieces(groups[i].tokens, groups[i].prompt_lengths[0], tokens_per_row)
        ]
        for unit in units
    ]
    longest = max(len(t) for g in groups for t in g.tokens)
    padded_length = min(max_length, -(-longest // pad_multiple) * pad_multiple)
    plan = packing.plan_rows(lengths, tokens_per_row, pad_multiple, cost, (len(groups) * group_size, padded_length))
    if plan is None:
        return collate(groups, group_size, padded_length, pad_id)
    return collate_packed(
        groups, group_size, tokens_per_row=tokens_per_row, pad_id=pad_id, shards=shards,
        micro_batches=micro_batches, rows_per_unit=plan.rows_per_unit, length=plan.length, capacity=plan.capacity,
    )  # fmt: skip


class GroupBatcher:
    """Seeded, epoch-shuffled batches of whole groups (a short last batch is dropped), the same global
    batches on every process. Each process tokenises and collates only `rows` of each global batch (its
    devices' share); which groups are usable and how long they are is surveyed once, each process
    encoding every `process_count`-th group, and combined with `combine` (an elementwise sum over
    processes; identity for one). Its position, `state()`, is saved with each checkpoint and
    `restore(state)` continues exactly there. `layout="packed"` packs each batch into rows of
    `tokens_per_row` per (shard, micro-batch) unit: `shards` is the mesh's data x fsdp size and
    `micro_batches` the train step's gradient accumulation; each process holds whole shards. With `cost` (a
    `LayoutCost`) each packed batch's row length, and whether to pack it at all, follow the estimated cost
    (`packing.plan_rows`). `source`, the groups' file (`data.train_file`), starts the message of the error for
    too few usable groups."""

    def __init__(
        self,
        groups: list[Group],
        encoder: GroupEncoder,
        *,
        batch_size: int,
        group_size: int,
        max_length: int,
        pad_id: int,
        seed: int = 0,
        pad_multiple: int = 64,
        shuffle: bool = True,
        rows: slice = slice(None),
        process_index: int = 0,
        process_count: int = 1,
        combine=lambda x: x,
        layout: str = "packed",
        tokens_per_row: int = 1024,
        shards: int = 1,
        micro_batches: int = 1,
        source: str = "",
        cost: LayoutCost | None = None,
    ):
        if layout not in LAYOUTS:
            raise SettingError(f"data.layout={layout!r}: expected one of {', '.join(LAYOUTS)}")
        held = len(range(batch_size)[rows])
        if batch_size % (shards * micro_batches) or held * shards % batch_size:
            raise SettingError(
                f"train.batch_size={batch_size} in {shards} shards (the mesh's data x fsdp devices) x "
                f"train.grad_accum={micro_batches} micro-batches, this process holding {held} groups: every shard "
                "needs whole micro-batches and every process whole shards"
            )
        self.groups, self.encoder, self.batch_size, self.group_size = groups, encoder, batch_size, group_size
        self.max_length, self.pad_id, self.seed = max_length, pad_id, seed
        self.pad_multiple, self.shuffle, self.rows = pad_multiple, shuffle, rows
        self.layout, self.tokens_per_row, self.shards, self.micro_batches = (
            layout,
            tokens_per_row,
            shards,
            micro_batches,
        )
        self.cost = cost
        self._encoded: dict[int, EncodedGroup] = {}
        # per group: longest sequence (0: unusable), tokens, then its packed pieces' lengths (0: none)
        survey = np.zeros((2 + group_size, len(groups)), np.int64)
        for i in range(process_index, len(groups), process_count):
            encoded = encoder.encode(groups[i])
            if encoded is not None:
                self._encoded[i] = encoded
                survey[:2, i] = max(map(len, encoded.tokens)), sum(map(len, encoded.tokens))
                if layout == "packed":
                    pieces = packing.group_pieces(encoded.tokens, encoded.prompt_lengths[0], tokens_per_row)
                    survey[2 : 2 + len(pieces), i] = [p.length for p in pieces]
        survey = combine(survey)
        self.longest, self.tokens, self.piece_lengths = survey[0], survey[1], survey[2:]
        self.split_groups = int(np.sum(self.piece_lengths[1:].any(axis=0)))  # packed groups over one row
        self.usable = np.flatnonzero(self.longest > 0)
        if len(self.usable) < batch_size:
            dropped = len(groups) - len(self.usable)
            raise DataError(
                f"{source or 'the training data'}: {len(self.usable)} usable groups (of {len(groups)}; {dropped} "
                f"dropped: a prompt of data.max_length={max_length} tokens or more, or no candidate left) is fewer "
                f"than one batch of train.batch_size={batch_size}: give more groups or a smaller train.batch_size"
            )
        self.epoch, self.index = 0, 0
        self.global_tokens = 0  # real tokens in the last global batch (its candidates' unpacked sequences)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.usable) // self.batch_size

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise SettingError(
                f"seed={self.seed}: the checkpoint being resumed was trained with seed={state['seed']}, whose "
                "data order differs: resume with its seed, or start a new run_dir"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.usable))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.usable))

    def _encode(self, i: int) -> EncodedGroup:
        if i not in self._encoded:
            self._encoded[i] = self.encoder.encode(self.groups[i])
        return self._encoded[i]

    def next_batch(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch: padded to the global batch's longest sequence, or
        packed into as many rows per (shard, micro-batch) unit as the fullest unit of the batch needs; with a
        `cost`, packed rows of the length it estimates cheapest, or padded where that is cheaper still."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        chosen = self.usable[order]
        self.index += 1
        self.global_tokens = int(self.tokens[chosen].sum())
        mine = [self._encode(i) for i in chosen[self.rows]]
        longest = int(self.longest[chosen].max())
        padded_length = min(self.max_length, -(-longest // self.pad_multiple) * self.pad_multiple)
        if self.layout == "packed":
            units = packing.batch_units(self.batch_size, self.shards, self.micro_batches)
            lengths = [[int(n) for b in unit for n in self.piece_lengths[:, chosen[b]] if n] for unit in units]
            padded = (self.batch_size * self.group_size, padded_length)
            plan = packing.plan_rows(lengths, self.tokens_per_row, self.pad_multiple, self.cost, padded)
            if plan is not None:
                return collate_packed(
                    mine,
                    self.group_size,
                    first_group=self.rows.start or 0,
                    shards=self.shards * len(mine) // self.batch_size,
                    micro_batches=self.micro_batches,
                    rows_per_unit=plan.rows_per_unit,
                    tokens_per_row=self.tokens_per_row,
                    length=plan.length,
                    capacity=plan.capacity,
                    pad_id=self.pad_id,
                )
        return collate(mine, self.group_size, padded_length, self.pad_id)
