"""The packed group layout against the padded one: scores, every loss and the objective's gradients on real
GSM8K prompts (ragged K, a group that fills a row exactly, one split over rows), sharded and with
micro-batches, with attention by XLA under the packed mask and by the block-sparse Pallas kernel (interpret
mode); and the mask: no candidate sees another."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import loss_config, tiny_model

import aft_jax
from aft_jax.data import packing
from aft_jax.data.batches import GroupEncoder, collate, collate_packed
from aft_jax.data.groups import Candidate, Group
from aft_jax.data.tasks import get_task
from aft_jax.method import losses
from aft_jax.method.objective import alignment_terms, normalisers, objective, vft_rows
from aft_jax.method.scoring import candidate_logp_sums
from aft_jax.parallel import sharding

K = 5


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


VOCAB = 509  # token ids are taken modulo this: real lengths and layout, a cheap vocabulary projection


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, vocab=VOCAB)


@pytest.fixture(scope="module")
def kernel_model():
    """`model`'s weights with packed rows' attention by the block-sparse Pallas kernel, in 64-token tiles."""
    return tiny_model(seed=3, vocab=VOCAB, attention="pallas", attention_block=64)


@pytest.fixture(scope="module")
def encoded(tokenizer, fixture_data_dir):
    """8 GSM8K questions with the Alpaca prompt; 2 to K candidates each: the reference and other questions'
    references (cut to different lengths), labelled at random. The first 40 train records, from tests/data."""
    task = get_task("gsm8k")
    examples = task.load("train", data_dir=fixture_data_dir, limit=40)
    assert len(examples) == 40
    rng = np.random.default_rng(0)
    encoder = GroupEncoder(tokenizer, max_length=384, group_size=K)
    groups = []
    for g, example in enumerate(examples[:8]):
        others = [examples[8 + (3 * g + i) % 32].target for i in range(int(rng.integers(1, K)))]
        others = [text[: int(rng.integers(20, len(text) + 1))] for text in others]
        candidates = [Candidate(example.target, True, 1, True, logp_sum=-40.0)] + [
            Candidate(text, bool(rng.random() < 0.4), int(rng.integers(0, 2)), logp_sum=float(-rng.random() * 80))
            for text in others
        ]
        group = encoder.encode(Group(example.id, task.prompt(example, "alpaca"), example.answer, candidates))
        groups.append(dataclasses.replace(group, tokens=[[t % VOCAB for t in seq] for seq in group.tokens]))
    return groups


def unsplit_length(group) -> int:
    return packing.group_pieces(group.tokens, group.prompt_lengths[0], 10**6)[0].length


def layouts(encoded, tokens_per_row, shards=1, micro_batches=1):
    """`(padded, packed)` batches of the same groups, packed as `GroupBatcher` packs a global batch."""
    packed = collate_packed(
        encoded, K, tokens_per_row=tokens_per_row, pad_id=0, shards=shards, micro_batches=micro_batches, pad_multiple=16
    )
    longest = max(len(t) for g in encoded for t in g.tokens)
    return collate(encoded, K, longest, pad_id=0), packed


def exact_fill(encoded) -> int:
    """A row budget that one group's single piece fills exactly while a longer one must be split."""
    return sorted(unsplit_length(g) for g in encoded)[len(encoded) // 2]


def test_rows_hold_an_exact_fill_and_a_split_group(encoded):
    budget = exact_fill(encoded)
    _, packed = layouts(encoded, budget)
    used = (packed["segment_ids"] > 0).sum(axis=1)
    assert packed["input_ids"].shape[1] == budget and budget in used
    pieces = [packing.group_pieces(g.tokens, g.prompt_lengths[0], budget) for g in encoded]
    assert any(len(p) > 1 for p in pieces) and all(p.length <= budget for ps in pieces for p in ps)
    # every completion token appears once, in its own candidate's slot
    counts = np.bincount(packed["slot_ids"][packed["completion_mask"] > 0], minlength=len(encoded) * K)
    np.testing.assert_array_equal(counts.reshape(-1, K), packed["completion_tokens"])
    assert (packed["completion_tokens"] > 0).sum() == sum(len(g.tokens) for g in encoded)


@pytest.mark.parametrize("attention,rows", [("xla", 1), ("pallas", 2)])
def test_packed_scores_equal_padded(model, kernel_model, encoded, attention, rows):
    """`rows` exact fills per row: one group's piece, or several groups (the kernel at one fill: below)."""
    padded, packed = layouts(encoded, rows * exact_fill(encoded))
    want = candidate_logp_sums(model, padded, chunk_size=64)
    got = candidate_logp_sums(kernel_model if attention == "pallas" else model, packed, chunk_size=64)
    assert np.all(np.asarray(want)[padded["valid"]] < 0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_packed_scores_equal_padded_with_a_sliding_window(encoded, attention):
    """A window of 48 positions (prompts are about 100 tokens) on one layer of a model with q/k/v biases and
    q/k norms: in packed rows the window counts positions in each candidate's own sequence."""
    options = dict(qkv_bias=True, qk_norm=True, sliding_window=48, sliding_layers=(0,))
    model = tiny_model(seed=3, vocab=VOCAB, **options)
    packed_model = tiny_model(seed=3, vocab=VOCAB, **options, attention=attention, attention_block=32)
    padded, packed = layouts(encoded, exact_fill(encoded))
    want = candidate_logp_sums(model, padded, chunk_size=64)
    np.testing.assert_allclose(candidate_logp_sums(packed_model, packed, chunk_size=64), want, rtol=1e-5, atol=1e-5)
    causal = tiny_model(seed=3, vocab=VOCAB, qkv_bias=True, qk_norm=True)
    assert np.abs(np.asarray(candidate_logp_sums(causal, padded, chunk_size=64)) - np.asarray(want)).max() > 1e-2


METHODS = [("vft", "none"), ("rft", "none"), ("aft", "boundary"), ("aft", "detach"), ("aft", "none")]
METHODS += [("rrhf", "none"), ("pro", "none"), ("dpo", "boundary")]


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_every_loss_equals_padded(model, kernel_model, encoded, attention):
    """Each method's VFT and alignment terms from the packed layout's scores against the padded layout's."""
    padded, packed = layouts(encoded, exact_fill(encoded))
    sums = {
        "padded": candidate_logp_sums(model, padded, chunk_size=64),
        "packed": candidate_logp_sums(kernel_model if attention == "pallas" else model, packed, chunk_size=64),
    }
    np.testing.assert_allclose(sums["packed"], sums["padded"], rtol=1e-5, atol=1e-5)
    for method, constraint in METHODS:
        cfg = loss_config(method=method, constraint=constraint)
        terms = {}
        for name, batch in (("padded", padded), ("packed", packed)):
            scores = sums[name] / np.maximum(batch["completion_tokens"], 1)
            vft = losses.vft_loss(sums[name], vft_rows(batch, cfg), normalisers(batch, cfg)["vft_tokens"])
            terms[name] = (vft, alignment_terms(scores, sums[name], batch, cfg))
        for got, want in zip(terms["packed"], terms["padded"]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=method)


def _loss_and_grads(model, batch, cfg):
    graphdef, params = nnx.split(model)

    def loss(params, batch):
        return objective(nnx.merge(graphdef, params), batch, normalisers(batch, cfg), cfg)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params, batch)


@pytest.mark.parametrize(
    "method,constraint,attention", [("aft", "boundary", "xla"), ("dpo", "detach", "xla"), ("aft", "boundary", "pallas")]
)
def test_the_objective_and_its_gradients_equal_padded(model, kernel_model, encoded, method, constraint, attention):
    cfg = loss_config(method=method, constraint=constraint, logit_chunk=64)
    padded, packed = layouts(encoded, exact_fill(encoded))
    (want, want_sums), want_grads = _loss_and_grads(model, padded, cfg)
    (got, got_sums), got_grads = _loss_and_grads(kernel_model if attention == "pallas" else model, packed, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for key in want_sums:
        np.testing.assert_allclose(got_sums[key], want_sums[key], rtol=1e-5, atol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_sharded_and_accumulated_packed_steps_equal_padded(model, encoded):
    """One train step: packed on 8 devices (batch split over them) and on 4 with 2 micro-batches, against
    the padded batch on one device."""
    from aft_jax.config.defaults import default_config
    from aft_jax.stages.program import build_train_program

    cfg = loss_config(method="aft", constraint="boundary", logit_chunk=64)
    budget = exact_fill(encoded)

    def step(batch, mesh, accum=1):
        program = build_train_program(model.config, mesh, cfg, default_config().optim, 10, grad_accum=accum)
        batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
        state, metrics = program(program.init_state(tiny_model(mesh, seed=3, vocab=VOCAB), seed=0), batch)
        return jax.device_get(metrics), jax.device_get(state.params)

    padded, _ = layouts(encoded, budget)
    want, want_params = step(padded, sharding.single_device_mesh())
    for got, got_params in [
        step(layouts(encoded, budget, shards=8)[1], sharding.make_mesh((1, 8, 1))),
        step(
            layouts(encoded, budget, shards=4, micro_batches=2)[1], sharding.make_mesh((1, 4, 1), jax.devices()[:4]), 2
        ),
    ]:
        for key in ("loss", "vft_loss", "align_loss", "grad_norm", "margin"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
        for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_no_candidate_sees_another(model, encoded):
    """Changing one candidate's completion tokens leaves every other candidate's score bit-identical."""
    _, packed = layouts(encoded, 2 * exact_fill(encoded))  # several groups per row
    score = jax.jit(lambda batch: candidate_logp_sums(model, batch, chunk_size=64))
    before = np.asarray(score(packed))
    g, k = 1, 1
    changed = dict(packed)
    where = packed["completion_mask"].astype(bool) & (packed["slot_ids"] == g * K + k)
    assert np.any(where) and np.any((packed["segment_ids"] > 0) & ~where & (packed["slot_ids"] != g * K + k))
    ids = packed["input_ids"].copy()
    ids[where] = (ids[where] + 7) % VOCAB
    changed["input_ids"] = ids
    after = np.asarray(score(changed))
    assert after[g, k] != before[g, k]
    others = np.ones_like(before, bool)
    others[g, k] = False
    np.testing.assert_array_equal(after[others], before[others])
    # and the packed mask itself: a token of slot (g, k) is visible only to its own branch
    mask = np.asarray(
        aft_jax.model.attention.packed_mask(jnp.asarray(packed["segment_ids"]), jnp.asarray(packed["branch_ids"]))
    )
    row, col = np.nonzero(where)
    seen_by = mask[row[0], :, col[0]]
    assert np.all(packed["branch_ids"][row[0]][seen_by] == packed["branch_ids"][row[0], col[0]])
