"""Training batches: tokenisation of candidate groups with a logged truncation policy, right-padded
`[B, K, T]` arrays, and a resumable, seeded iterator over them."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter

import numpy as np

from aft_jax.data.groups import Candidate, Group

log = logging.getLogger(__name__)
TRUNCATION = ("completion", "drop")
BATCH_SCHEMA = {  # name -> ("token": [B, K, T] or "candidate": [B, K], dtype); collate and the plan read it
    "input_ids": ("token", np.int32),
    "attention_mask": ("token", np.int32),
    "completion_mask": ("token", np.int32),
    "valid": ("candidate", np.bool_),
    "is_pos": ("candidate", np.bool_),
    "is_neg": ("candidate", np.bool_),
    "is_reference": ("candidate", np.bool_),
    "levels": ("candidate", np.int32),
    "ref_logp_sum": ("candidate", np.float32),
}


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
            raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATION}")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token; completions must end with one")
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


def collate(groups: list[EncodedGroup], group_size: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-padded arrays: token arrays `[B, K, T]`, per-candidate arrays `[B, K]`."""
    b = len(groups)
    out = {
        name: np.zeros((b, group_size, length) if per == "token" else (b, group_size), dtype)
        for name, (per, dtype) in BATCH_SCHEMA.items()
    }
    out["input_ids"][:] = pad_id
    for g, group in enumerate(groups):
        for k, (tokens, prompt_len, cand) in enumerate(zip(group.tokens, group.prompt_lengths, group.candidates)):
            n = len(tokens)
            out["input_ids"][g, k, :n] = tokens
            out["attention_mask"][g, k, :n] = 1
            out["completion_mask"][g, k, prompt_len:n] = 1
            out["valid"][g, k] = True
            out["is_pos"][g, k] = cand.correct
            out["is_neg"][g, k] = not cand.correct
            out["is_reference"][g, k] = cand.reference
            out["levels"][g, k] = cand.level
            out["ref_logp_sum"][g, k] = cand.logp_sum if cand.logp_sum is not None else 0.0
    return out


class GroupBatcher:
    """Seeded, epoch-shuffled batches of whole groups (a short last batch is dropped), the same global
    batches on every process. Each process tokenises and collates only `rows` of each global batch (its
    devices' share); which groups are usable and how long they are is surveyed once, each process
    encoding every `process_count`-th group, and combined with `combine` (an elementwise sum over
    processes; identity for one). Its position, `state()`, is saved with each checkpoint and
    `restore(state)` continues exactly there."""

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
    ):
        self.groups, self.encoder, self.batch_size, self.group_size = groups, encoder, batch_size, group_size
        self.max_length, self.pad_id, self.seed = max_length, pad_id, seed
        self.pad_multiple, self.shuffle, self.rows = pad_multiple, shuffle, rows
        self._encoded: dict[int, EncodedGroup] = {}
        survey = np.zeros((2, len(groups)), np.int64)  # longest sequence (0: unusable), tokens
        for i in range(process_index, len(groups), process_count):
            encoded = encoder.encode(groups[i])
            if encoded is not None:
                self._encoded[i] = encoded
                survey[:, i] = max(map(len, encoded.tokens)), sum(map(len, encoded.tokens))
        self.longest, self.tokens = combine(survey)
        self.usable = np.flatnonzero(self.longest > 0)
        if len(self.usable) < batch_size:
            raise ValueError(f"{len(self.usable)} usable groups is fewer than one batch of {batch_size}")
        self.epoch, self.index = 0, 0
        self.global_tokens = 0  # real tokens in the last global batch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.usable) // self.batch_size

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"checkpoint data seed {state['seed']} differs from the configured {self.seed}")
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
        """This process's rows of the next global batch, padded to the global batch's length."""
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)[self.index * self.batch_size : (self.index + 1) * self.batch_size]
        chosen = self.usable[order]
        self.index += 1
        self.global_tokens = int(self.tokens[chosen].sum())
        longest = int(self.longest[chosen].max())
        length = min(self.max_length, -(-longest // self.pad_multiple) * self.pad_multiple)
        return collate([self._encode(i) for i in chosen[self.rows]], self.group_size, length, self.pad_id)
