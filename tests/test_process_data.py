"""Each process tokenises only its share: together, two processes' rows are exactly one process's batches."""

import dataclasses
import threading

import numpy as np
import pytest
from train_helpers import write_arithmetic_groups
from transformers import AutoTokenizer

from aft_jax.data.batches import GroupBatcher, GroupEncoder
from aft_jax.data.groups import read_groups


class RecordingEncoder(GroupEncoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def encode(self, group):
        self.seen.append(group.id)
        return super().encode(group)


def _batcher(groups, tokenizer, layout, **process):
    encoder = RecordingEncoder(tokenizer, max_length=40, group_size=4, truncation="drop")
    batcher = GroupBatcher(
        groups,
        encoder,
        batch_size=6,
        group_size=4,
        max_length=40,
        pad_id=0,
        seed=3,
        layout=layout,
        tokens_per_row=64,
        shards=2,  # one per process
        **process,
    )
    return batcher, encoder


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_two_processes_collate_their_halves_of_the_same_batches(tmp_path, smollm2_dir, layout):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    write_arithmetic_groups(tmp_path / "groups.jsonl", n=31)
    groups = read_groups(tmp_path / "groups.jsonl")
    groups[4] = dataclasses.replace(groups[4], prompt=groups[4].prompt * 20)  # too long: one survey drops it

    single, _ = _batcher(groups, tokenizer, layout)
    surveys, barrier = [None, None], threading.Barrier(2)
    pair = [None, None]

    def start(p):
        def combine(x):  # what jax's process all-gather + sum does across real processes
            surveys[p] = x
            barrier.wait()
            return surveys[0] + surveys[1]

        pair[p] = _batcher(
            groups, tokenizer, layout, rows=slice(3 * p, 3 * p + 3), process_index=p, process_count=2, combine=combine
        )

    threads = [threading.Thread(target=start, args=(p,)) for p in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 4 not in {groups[i].id for i in single.usable}
    np.testing.assert_array_equal(pair[0][0].usable, single.usable)

    needed = [set(), set()]
    for _ in range(2 * single.steps_per_epoch + 1):  # over an epoch boundary
        whole = single.next_batch()
        parts = [batcher.next_batch() for batcher, _ in pair]
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key], err_msg=key)
        assert pair[0][0].global_tokens == pair[1][0].global_tokens == single.global_tokens
        if layout == "padded":
            assert single.global_tokens == whole["attention_mask"].sum()
        else:
            assert whole["input_ids"].shape[1] <= 64 and len(whole["input_ids"]) % 2 == 0
        for p in range(2):
            order = single._order(single.epoch)[(single.index - 1) * 6 : single.index * 6]
            needed[p] |= {groups[i].id for i in single.usable[order][3 * p : 3 * p + 3]}
    for p, (_, encoder) in enumerate(pair):
        share = {g.id for g in groups[p::2]}
        assert encoder.seen[: len(share)] == [g.id for g in groups[p::2]], "the survey encodes every 2nd group"
        assert set(encoder.seen) == share | needed[p], "beyond the survey, only the process's own rows"
        assert len(set(encoder.seen)) < len(groups)
