"""The packer's cost model: its FLOP counts against a hand count, and the choice it makes: full rows where
packing wins, shorter rows where long dense rows cost more than they save, the padded layout where packing
saves nothing; and the batches a `GroupBatcher` with a cost gives train to the same losses as padded ones."""

import numpy as np
import pytest
from train_helpers import loss_config, tiny_model

import aft_jax
from aft_jax.data import packing
from aft_jax.data.batches import EncodedGroup, GroupBatcher, collate, collate_planned
from aft_jax.data.groups import Candidate
from aft_jax.data.layout_cost import ATTENTION_FLOP_COST, LayoutCost, layout_cost, packed_cost, padded_cost
from aft_jax.method.objective import normalisers, objective


def test_the_flop_counts_by_hand():
    config = aft_jax.ModelConfig(
        vocab_size=100, hidden_size=8, intermediate_size=12, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=2
    )
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up 8x12 each, down 12x8 = 64 + 32 + 32 + 64 + 288 = 480
    per_token = 2 * (3 * 480 + 8 * 100)
    cost = layout_cost(config, "gpu")
    assert cost == LayoutCost(per_token, 4 * 8 * 3 * ATTENTION_FLOP_COST["gpu"], False)
    assert layout_cost(config, "cpu").per_pair == 4 * 8 * 3 * ATTENTION_FLOP_COST["cpu"]
    assert layout_cost(config, "tpu", "pallas").sparse
    # dense rows pay every pair of a row; the kernel only each piece's own
    assert packed_cost(cost, 2, 10, [4, 6, 10]) == per_token * 20 + cost.per_pair * 200
    assert packed_cost(cost._replace(sparse=True), 2, 10, [4, 6, 10]) == per_token * 20 + cost.per_pair * 152
    assert padded_cost(cost, 3, 10) == per_token * 30 + cost.per_pair * 300


def groups_of(prompt: int, completions: list[list[int]]) -> list[EncodedGroup]:
    """Groups with a `prompt`-token prompt and candidates of the given completion lengths."""
    out = []
    for lengths in completions:
        tokens = [[1] * prompt + [2] * n for n in lengths]
        out.append(EncodedGroup(tokens, [prompt] * len(tokens), [Candidate("", True, 1)] * len(tokens)))
    return out


def plan(groups, cost, tokens_per_row=1024, group_size=None):
    group_size = group_size or max(len(g.tokens) for g in groups)
    lengths = [[p.length for g in groups for p in packing.group_pieces(g.tokens, g.prompt_lengths[0], tokens_per_row)]]
    longest = -(-max(len(t) for g in groups for t in g.tokens) // 64) * 64
    return packing.plan_rows(lengths, tokens_per_row, 64, cost, (len(groups) * group_size, longest))


CHEAP_ATTENTION = LayoutCost(per_token=1e6, per_pair=10.0)
DEAR_ATTENTION = LayoutCost(per_token=1e6, per_pair=5e4)


SEVEN = [30, 40, 50, 60, 20, 35, 45]  # completion lengths: a group of 99 + 287 = 386 tokens packed


def test_packing_wins_with_a_shared_prompt():
    """Seven candidates after a 100-token prompt, two groups a 1024-token row where attention is cheap."""
    groups = groups_of(100, [SEVEN] * 8)
    got = plan(groups, CHEAP_ATTENTION)
    assert got is not None and (got.rows_per_unit, got.length) == (4, 832)
    # the padded layout would compute 8 x 7 sequences of 192 tokens
    assert packed_cost(CHEAP_ATTENTION, 4, 832, []) < padded_cost(CHEAP_ATTENTION, 56, 192)


def test_short_rows_win_where_attention_is_dear():
    """The same groups where an attention pair costs 1/20 of a token's projections: a row a group."""
    groups = groups_of(100, [SEVEN] * 8)
    got = plan(groups, DEAR_ATTENTION)
    assert got is not None and got.rows_per_unit == 8 and got.length == 448 and got.capacity < 772
    assert packed_cost(DEAR_ATTENTION, 4, 832, []) > packed_cost(DEAR_ATTENTION, 8, 448, [])


def test_padding_wins_when_packing_shares_nothing():
    """Seventeen one-candidate groups of 64 tokens and a 1-token prompt: packed rows would hold one sequence
    each and round 17 rows up to 18 (`packing.bucket`), or hold several and pay more attention."""
    groups = groups_of(1, [[63]] * 17)
    assert plan(groups, DEAR_ATTENTION) is None
    batch = collate_planned(groups, 1, cost=DEAR_ATTENTION, tokens_per_row=1024, max_length=512, pad_id=0)
    assert batch["input_ids"].shape == (17, 1, 64)


def test_without_a_cost_rows_are_tokens_per_row():
    groups = groups_of(1, [[63]] * 17)
    assert plan(groups, None) == packing.RowPlan(*packing.unit_rows([[64] * 17], 1024, 64), 1024)


def ragged_groups():
    rng = np.random.default_rng(0)
    return groups_of(12, [list(rng.integers(3, 30, size=int(rng.integers(1, 5)))) for _ in range(8)])


@pytest.mark.parametrize(
    "make_groups,cost,ndim",
    [(ragged_groups, CHEAP_ATTENTION, 2), (lambda: groups_of(1, [[15, 15, 15, 15]] * 8), DEAR_ATTENTION, 3)],
)
def test_a_batcher_with_a_cost_gives_the_padded_objective(make_groups, cost, ndim):
    """Ragged groups where attention is cheap are packed; full groups of 16-token sequences with no prompt
    to share where it is dear stay padded (8 x 4 x 16 tokens against one 64-token row a group); either way
    the batch gives the padded layout's objective."""
    encoded = make_groups()

    class Encoder:  # the groups are already encoded
        COUNTS = ()

        def encode(self, group):
            return group

    batcher = GroupBatcher(
        encoded, Encoder(), batch_size=8, group_size=4, max_length=64, pad_id=0, shuffle=False,
        tokens_per_row=128, pad_multiple=16, cost=cost,
    )  # fmt: skip
    planned = batcher.next_batch()
    assert planned["input_ids"].ndim == ndim
    padded = collate(encoded, 4, 48, 0)
    model, cfg = tiny_model(seed=1), loss_config(method="aft", constraint="boundary")
    got = float(objective(model, planned, normalisers(planned, cfg), cfg)[0])
    want = float(objective(model, padded, normalisers(padded, cfg), cfg)[0])
    np.testing.assert_allclose(got, want, rtol=1e-5)
