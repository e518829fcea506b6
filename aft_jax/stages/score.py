"""Scoring candidate groups with a model (after sampling, and the held-out groups in evaluation): each
candidate's summed and mean completion log-prob, float32, from packed rows (each prompt once; the default)
or from padded sequences (the reference layout). `Scorer` is what the stages receive: a model, its
tokenizer and the layout, so that no stage reaches through a sampler to a model."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from flax import nnx

from aft_jax.data import packing
from aft_jax.data.batches import GroupEncoder
from aft_jax.data.groups import Candidate, Group
from aft_jax.method.scoring import sequence_scores, token_logprobs

PACKED_INPUTS = ("input_ids", "positions", "segment_ids", "branch_ids", "completion_mask")


@functools.lru_cache(maxsize=8)
def _compiled(graphdef, layout: str):
    """The layout's scoring function jitted once per model architecture, the weights an argument (not
    constants): padded `(ids, mask, completion) -> (mean [N], sum [N])`, packed `rows -> logp [R, T]`."""
    if layout == "padded":
        return jax.jit(lambda state, ids, att, comp: sequence_scores(nnx.merge(graphdef, state), ids, att, comp))

    def packed(state, rows):
        model = nnx.merge(graphdef, state)
        ids = rows["input_ids"]
        hidden = model.packed_hidden_states(ids, rows["positions"], rows["segment_ids"], rows["branch_ids"])
        return token_logprobs(model, hidden, ids, rows["completion_mask"])

    return jax.jit(packed)


@dataclasses.dataclass(frozen=True)
class Scorer:
    """`score(groups)`: `score_groups` of `model` with its `tokenizer`, sequences cut at `max_length`, in
    `layout` (`packed` rows of `tokens_per_row`, or `padded`), `batch_size` sequences' worth per call. The
    tokenizer is also the one prompts are formatted with (a chat template)."""

    model: Any
    tokenizer: Any
    max_length: int
    batch_size: int
    layout: str = "packed"
    tokens_per_row: int = 1024

    def score(self, groups: list[Group]) -> list[Group]:
        return score_groups(
            self.model,
            self.tokenizer,
            groups,
            max_length=self.max_length,
            batch_size=self.batch_size,
            layout=self.layout,
            tokens_per_row=self.tokens_per_row,
        )


def score_groups(
    model,
    tokenizer,
    groups: list[Group],
    *,
    max_length: int,
    batch_size: int,
    layout: str = "packed",
    tokens_per_row: int = 1024,
) -> list[Group]:
    """`groups` with each candidate's summed and mean completion log-prob under `model` (sequences cut at
    `max_length` tokens). Padded: `batch_size` sequences per call; packed: rows of `tokens_per_row`, as
    many per call as hold `batch_size` sequences of `max_length`."""
    encoder = GroupEncoder(tokenizer, max_length, group_size=10**6)
    encoded = [encoder.encode(g) for g in groups]
    slots = [(g, c) for g, e in enumerate(encoded) if e for c in range(len(e.tokens))]
    counts = np.array([len(encoded[g].tokens[c]) - encoded[g].prompt_lengths[c] for g, c in slots])
    graphdef, state = nnx.split(model)
    score = functools.partial(_compiled(graphdef, layout), state)
    if layout == "padded":
        sums = _padded_sums(score, encoded, slots, batch_size)
    else:
        sums = _packed_sums(score, encoded, tokens_per_row, max(1, batch_size * max_length // tokens_per_row))
        sums = sums.astype(np.float32)
    candidates = [list(g.candidates) for g in groups]
    for (g, c), total, count in zip(slots, sums, counts):
        cand = encoded[g].candidates[c]
        index = next(i for i, x in enumerate(candidates[g]) if x is cand)
        mean = float(total) / max(int(count), 1)
        candidates[g][index] = Candidate(cand.text, cand.correct, cand.level, cand.reference, float(total), mean)
    return [Group(g.id, g.prompt, g.answer, tuple(c)) for g, c in zip(groups, candidates)]


def _padded_sums(score, encoded, slots, batch_size: int) -> np.ndarray:
    sums = np.zeros(len(slots), np.float32)
    for start in range(0, len(slots), batch_size):
        chunk = [(encoded[g].tokens[c], encoded[g].prompt_lengths[c]) for g, c in slots[start : start + batch_size]]
        length = -(-max(len(tokens) for tokens, _ in chunk) // 64) * 64
        ids = np.zeros((batch_size, length), np.int32)
        att, comp = np.zeros_like(ids), np.zeros_like(ids)
        for i, (tokens, prompt_len) in enumerate(chunk):
            ids[i, : len(tokens)], att[i, : len(tokens)], comp[i, prompt_len : len(tokens)] = tokens, 1, 1
        sums[start : start + len(chunk)] = np.asarray(score(ids, att, comp)[1])[: len(chunk)]
    return sums


def _packed_sums(score, encoded, tokens_per_row: int, rows_per_call: int) -> np.ndarray:
    pieces, base = [], 0
    for e in encoded:
        if e:
            pieces += packing.group_pieces(e.tokens, e.prompt_lengths[0], tokens_per_row, slot_base=base)
            base += len(e.tokens)
    rows = [[pieces[i] for i in row] for row in packing.first_fit([p.length for p in pieces], tokens_per_row)]
    sums = np.zeros(base, np.float64)
    for start in range(0, len(rows), rows_per_call):
        chunk = rows[start : start + rows_per_call]
        fill = max(sum(p.length for p in row) for row in chunk)
        arrays = packing.pack_rows(chunk, rows_per_call, min(tokens_per_row, -(-fill // 64) * 64), pad_id=0)
        logp = np.asarray(score({k: arrays[k] for k in PACKED_INPUTS}))
        mine = arrays["completion_mask"] > 0
        np.add.at(sums, arrays["slot_ids"][mine], logp[mine])
    return sums
