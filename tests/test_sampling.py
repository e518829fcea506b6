"""The KV-cache sampler: greedy parity with transformers on the real SmolLM2, distribution checks, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from train_helpers import tiny_model

import aft_jax
from aft_jax.data.tasks import format_prompt
from aft_jax.sampling.continuous import sample_continuous
from aft_jax.sampling.next_token import SamplingParams, filter_logits, inverse_cdf
from aft_jax.sampling.sampler import decode_completion, left_pad
from aft_jax.sampling.static import own_cache_sizes, sample_token_ids


def test_greedy_matches_transformers_generate(smollm2_dir, gsm8k_test_questions):
    import torch
    from transformers import AutoModelForCausalLM

    model, tokenizer = aft_jax.from_pretrained(smollm2_dir)
    prompts = [format_prompt(q["question"], "plain") for q in gsm8k_test_questions[:6]]
    ours = aft_jax.generate(model, tokenizer, prompts, max_new_tokens=40, batch_size=4)  # 2 batches, 1 `layers`

    hf_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = hf_model.generate(**batch, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    for row, [text] in enumerate(ours):
        hf_tokens = out[row, batch["input_ids"].shape[1] :].tolist()
        hf_text = tokenizer.decode([t for t in hf_tokens if t != tokenizer.eos_token_id], skip_special_tokens=True)
        assert text == hf_text, row
        assert (
            tokenizer(text, add_special_tokens=False)["input_ids"]
            == [t for t in hf_tokens if t != tokenizer.eos_token_id][
                : len(tokenizer(text, add_special_tokens=False)["input_ids"])
            ]
        )


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    logits = jnp.log(jnp.array([[0.05, 0.4, 0.1, 0.25, 0.2], [0.2, 0.2, 0.2, 0.2, 0.2]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2)))
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.6)))
    # 0.4 + 0.25 reaches 0.6; uniform row: three tokens are needed to reach 0.6
    np.testing.assert_array_equal(kept, [[0, 1, 0, 1, 0], [1, 1, 1, 0, 0]])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.65)))
    np.testing.assert_array_equal(kept[0], [0, 1, 0, 1, 0])
    kept = np.isfinite(np.asarray(filter_logits(logits, top_p=0.66)))
    np.testing.assert_array_equal(kept[0], [0, 1, 0, 1, 1])


@pytest.mark.parametrize("vocab,block", [(1000, 64), (50, 256), (4096, 256)])
def test_inverse_cdf_draws_the_token_whose_interval_holds_u(vocab, block):
    """Against NumPy's search of the whole CDF (float64): token i is drawn for u * cdf_V in
    [cdf_{i-1}, cdf_i), over vocabularies that are not a multiple of the block, smaller than one, and
    with a third of the tokens at weight 0 (never drawn, also at u = 0 and u just below 1)."""
    rng = np.random.default_rng(vocab)
    logits = (3 * rng.normal(size=(400, vocab))).astype(np.float32)
    logits[rng.random((400, vocab)) < 0.3] = -np.inf
    logits[:, 0] = -np.inf  # u = 0 must skip a leading zero-weight token
    u = rng.random(400).astype(np.float32)
    u[:2] = [0.0, np.nextafter(np.float32(1), np.float32(0))]
    drawn = np.asarray(inverse_cdf(jnp.asarray(logits), jnp.asarray(u), block))
    weights = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(weights, axis=1)
    expected = [np.searchsorted(cdf[r], u[r] * cdf[r, -1], side="right") for r in range(len(u))]
    np.testing.assert_array_equal(drawn, np.minimum(expected, vocab - 1))
    assert np.all(weights[np.arange(len(u)), drawn] > 0)


@pytest.mark.parametrize("loop", ["static", "continuous"])
@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_reproduces_softmax_probabilities(temperature, top_k, loop):
    model = tiny_model(seed=2)
    prompt = np.array([[3, 14, 15, 9, 2, 6]] * 2000, np.int32)
    mask = np.ones_like(prompt)
    logits = np.asarray(model(prompt[:1], mask[:1])[0, -1], np.float64) / temperature
    if top_k:
        logits[np.argsort(-logits)[top_k:]] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k, eos_ids=(0,), pad_id=0)
    counts = np.zeros_like(probs)
    for seed in range(5):
        if loop == "static":
            tokens, _ = sample_token_ids(model, prompt, mask, params, jax.random.key(seed))
        else:
            tokens = sample_continuous(model, prompt, mask, params, jax.random.key(seed), rows=500).tokens
        counts += np.bincount(tokens[:, 0], minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, "no token outside the top-k is ever drawn"
    # Pool rare tokens so every expected count is >= 5, then a chi-square test at the 0.1% level.
    expected = probs[support] * counts.sum()
    order = np.argsort(expected)
    observed, expected = counts[support][order], expected[order]
    cut = np.searchsorted(np.cumsum(expected), 5.0) + 1
    observed = np.concatenate([[observed[:cut].sum()], observed[cut:]])
    expected = np.concatenate([[expected[:cut].sum()], expected[cut:]])
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_rows_stop_at_eos_and_are_padded_after():
    model = tiny_model(seed=4)
    prompts = [[5, 7, 11], [13, 17, 19, 23, 29], [31, 37]]
    ids, mask = left_pad(prompts, 4, pad_id=0, multiple=8)
    free = SamplingParams(max_new_tokens=12, eos_ids=(), pad_id=0)
    greedy, _ = sample_token_ids(model, ids, mask, free, jax.random.key(0))
    stop_token = int(greedy[0, 3])  # make row 0's fourth token an EOS
    first_hits = [int(np.argmax(row == stop_token)) if (row == stop_token).any() else None for row in greedy]
    params = SamplingParams(max_new_tokens=12, eos_ids=(stop_token,), pad_id=60)
    tokens, lengths = sample_token_ids(model, ids, mask, params, jax.random.key(0))
    for row in range(3):
        hit = first_hits[row]
        if hit is None:
            np.testing.assert_array_equal(tokens[row], greedy[row])
            assert lengths[row] == 12
        else:
            np.testing.assert_array_equal(tokens[row, : hit + 1], greedy[row, : hit + 1])
            assert np.all(tokens[row, hit + 1 :] == 60) and lengths[row] == hit + 1
    assert first_hits[0] is not None and first_hits[0] <= 3


def _random_prompts(count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 60, size=rng.integers(2, 9)).tolist() for _ in range(count)]


def _simulated_steps(lengths_qk, slots: int, per_slot: int, width: int) -> int:
    """Decode steps of the continuous loop's schedule, step by step. Each slot holds a question, a share of
    its samples and `per_slot` rows; a stopped row starts its slot's next sample; a slot whose share has
    all started and whose rows have all stopped is free. The next `width` questions take the first free
    slots once that many are free (the last ones once all of them fit); with none pending, the first free
    slot takes the later half (rounded up) of the unstarted samples of the slot with the most."""
    questions, k = lengths_qk.shape
    held, share = [0] * slots, [[0, 0] for _ in range(slots)]  # share: [next sample, end]
    left = [[0] * per_slot for _ in range(slots)]  # steps left in each row's sample
    state = {"next": 0}

    def free(g):
        return share[g][0] >= share[g][1] and not any(left[g])

    def admit(count):
        for g in [g for g in range(slots) if free(g)][:count]:
            held[g], share[g], state["next"] = state["next"], [0, k], state["next"] + 1

    def start():
        for g in range(slots):
            for i in range(per_slot):
                if not left[g][i] and share[g][0] < share[g][1]:
                    left[g][i], share[g][0] = int(lengths_qk[held[g], share[g][0]]), share[g][0] + 1

    admit(min(slots, questions))
    start()
    steps = 0
    while state["next"] < questions or any(any(rows) for rows in left) or any(a < b for a, b in share):
        pending, free_count = questions - state["next"], sum(free(g) for g in range(slots))
        if pending and free_count >= min(width, pending):
            admit(min(width, free_count, pending))
        unstarted = [b - a for a, b in share]
        if not pending and free_count and max(unstarted) > 0:
            thief, victim = [g for g in range(slots) if free(g)][0], unstarted.index(max(unstarted))
            split = share[victim][1] - (unstarted[victim] + 1) // 2
            held[thief], share[thief], share[victim][1] = held[victim], [split, share[victim][1]], split
        start()
        left, steps = [[max(r - 1, 0) for r in rows] for rows in left], steps + 1
    return steps


@pytest.mark.parametrize("temperature, window", [(0.0, None), (1.0, 3)])
def test_continuous_batching_gives_the_static_loops_samples(temperature, window):
    """Samples stop at chosen steps (EOS ids taken from a free run), so rows free at very different times and
    start the next sample; at every layout of the rows each sample is the static loop's (same per-sample
    keys), in its place, and the loop runs the steps of its schedule. With a sliding window (on one of the
    two layers, with q/k/v biases and q/k norms), samples start at any column of the ring of own keys."""
    options = dict(sliding_window=window, sliding_layers=(1,), qkv_bias=True, qk_norm=True) if window else {}
    model = tiny_model(seed=4, **options)
    k, questions = 3, 7
    ids, mask = left_pad(_random_prompts(questions, 0), questions, 0, multiple=8)
    free = SamplingParams(max_new_tokens=12, temperature=temperature, pad_id=0)
    free_tokens, _ = sample_token_ids(model, ids, mask, free, jax.random.key(0), num_samples=k)
    stop_at = {0: 1, 5: 3, 9: 6, 13: 0, 19: 2}  # sample -> the step whose token becomes an EOS id
    params = free._replace(eos_ids=tuple(sorted({int(free_tokens[w, step]) for w, step in stop_at.items()})))
    expected, expected_lengths = sample_token_ids(model, ids, mask, params, jax.random.key(0), num_samples=k)
    assert all(expected_lengths[w] <= step + 1 for w, step in stop_at.items())
    assert expected_lengths.max() == 12 and expected_lengths.min() <= 2
    lengths_qk = expected_lengths.reshape(questions, k)
    for rows, per_slot, width in [(3, 3, 1), (4, 1, 1), (6, 2, 2), (16, 2, 2)]:
        out = sample_continuous(
            model, ids, mask, params, jax.random.key(0), k, rows=rows, rows_per_prompt=per_slot, prefill_width=width
        )
        np.testing.assert_array_equal(out.tokens, expected)
        np.testing.assert_array_equal(out.lengths, expected_lengths)
        assert out.steps == _simulated_steps(lengths_qk, rows // per_slot, per_slot, width), (rows, per_slot)


def test_one_row_per_prompt_keeps_rows_busy_where_samples_end_at_different_steps():
    """The schedule of 6 rows on 12 questions x 3 samples, a third of which run to the end: one row per prompt
    slot (every stopped row starts a sample, free ones help finish the last questions) takes fewer steps
    than 3 (each slot waits for its longest sample), and few more than a perfect split of the work."""
    rng = np.random.default_rng(0)
    lengths_qk = np.where(rng.random((12, 3)) < 1 / 3, 48, rng.integers(5, 24, (12, 3)))
    row_refill, group_refill = _simulated_steps(lengths_qk, 6, 1, 1), _simulated_steps(lengths_qk, 2, 3, 1)
    assert row_refill < 0.8 * group_refill and lengths_qk.sum() / 6 <= row_refill < 1.15 * lengths_qk.sum() / 6


def test_left_padding_does_not_change_the_output():
    model = tiny_model(seed=5)
    prompt = [[8, 9, 10, 11]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0, pad_id=0)
    outs = [
        sample_token_ids(model, *left_pad(prompt, 2, 0, multiple=m), params, jax.random.key(0))[0][0]
        for m in (1, 8, 16)
    ]
    for other in outs[1:]:
        np.testing.assert_array_equal(outs[0], other)


def _tiny_model_with_real_tokenizer(smollm2_dir, seed):
    """A tiny random model over SmolLM2's vocabulary, and its tokenizer: the text path, cheap to compile."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return tiny_model(seed=seed, vocab=len(tokenizer)), tokenizer


def test_seeded_sampling_is_reproducible(smollm2_dir):
    model, tokenizer = _tiny_model_with_real_tokenizer(smollm2_dir, seed=1)
    kwargs = {"max_new_tokens": 12, "temperature": 1.0, "num_samples": 3, "batch_size": 8}
    a = aft_jax.generate(model, tokenizer, ["Tom has 3 apples.", "Count to five:"], seed=7, **kwargs)
    b = aft_jax.generate(model, tokenizer, ["Tom has 3 apples.", "Count to five:"], seed=7, **kwargs)
    c = aft_jax.generate(model, tokenizer, ["Tom has 3 apples.", "Count to five:"], seed=8, **kwargs)
    assert a == b and a != c
    assert len(a) == 2 and all(len(samples) == 3 for samples in a)


def test_sharded_sampling_equals_single_device():
    from aft_jax.parallel import sharding

    prompts = [[5, 7, 11], [13, 17, 19, 23, 29], [31, 37], [41, 43, 47, 53]]
    ids, mask = left_pad(prompts, 4, pad_id=0, multiple=8)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_k=20, pad_id=0)
    single, _ = sample_token_ids(tiny_model(seed=6), ids, mask, params, jax.random.key(3), num_samples=2)
    mesh = sharding.make_mesh((2, 2, 2))
    sharded_model = tiny_model(mesh, seed=6)
    sharded, _ = sample_token_ids(sharded_model, ids, mask, params, jax.random.key(3), num_samples=2)
    np.testing.assert_array_equal(single, sharded)
    continuous = sample_continuous(sharded_model, ids, mask, params, jax.random.key(3), 2, rows=4)
    np.testing.assert_array_equal(single, continuous.tokens)
    assert continuous.row_shards == 2  # 2 slots of 2 rows: split over data (2), not over data x fsdp (4)
    spread = sample_continuous(sharded_model, ids, mask, params, jax.random.key(3), 2, rows=9, rows_per_prompt=1)
    np.testing.assert_array_equal(single, spread.tokens)
    assert spread.row_shards == 4  # 9 rows: 8 slots of 1 row, 2 on each of the 4 data x fsdp devices


def test_own_cache_grows_in_quarters_to_max_new_tokens():
    assert own_cache_sizes(256) == [64, 128, 192, 256]
    assert own_cache_sizes(100) == [32, 64, 96, 100]
    assert own_cache_sizes(40) == [32, 40]
    assert own_cache_sizes(12) == [12]


def test_sampler_texts_equal_its_token_ids(smollm2_dir):
    """`JaxSampler.sample` (texts, batched and padded here) and `JaxSampler.sample_ids` (ids given) agree greedily."""
    model, tokenizer = _tiny_model_with_real_tokenizer(smollm2_dir, seed=2)
    sampler = aft_jax.JaxSampler(model, tokenizer, batch_size=4)
    prompts = ["Tom has 3 apples.", "Count to five:", "The sky is"]
    texts = sampler.sample(prompts, max_new_tokens=10)
    params = sampler.params(10)
    ids, mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], 3, params.pad_id)
    tokens, lengths = sampler.sample_ids(ids, mask, max_new_tokens=10)
    assert texts == [[decode_completion(tokenizer, tokens[q], lengths[q], params.eos_ids)] for q in range(3)]
    assert texts == aft_jax.generate(model, tokenizer, prompts, max_new_tokens=10, batch_size=4)


class _RecordingSampler:
    """A stand-in sampler: every completion is the example's reference solution."""

    model = tokenizer = None

    def __init__(self, targets: dict[str, str]):
        self.targets, self.calls = targets, []

    def sample(self, prompts, *, num_samples=1, **params):
        self.calls.append((len(prompts), num_samples, params))
        return [[self.targets[p]] * num_samples for p in prompts]


def test_evaluation_generates_only_through_the_sampler_it_receives():
    from types import SimpleNamespace

    from aft_jax.data.tasks import get_task
    from aft_jax.stages.evaluate import greedy_correct, validation_accuracy

    task = get_task("synthetic", num_train=4, num_validation=3, num_test=3, seed=0)
    config = SimpleNamespace(
        task=SimpleNamespace(template="plain"), eval=SimpleNamespace(max_new_tokens=7, batch_size=2)
    )
    test, validation = task.load("test"), task.load("validation")
    fake = _RecordingSampler({task.prompt(x, "plain"): x.target for x in test + validation})
    options = dict(template=config.task.template, max_new_tokens=config.eval.max_new_tokens)
    texts, correct = greedy_correct(fake, task, test, **options)  # no model: only the sampler
    assert texts == [x.target for x in test] and all(correct)
    assert validation_accuracy(fake, task, validation, **options)["validation_accuracy"] == 1.0
    assert fake.calls == [(3, 1, {"max_new_tokens": 7})] * 2
