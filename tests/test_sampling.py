"""The KV-cache sampler: greedy parity with transformers on the real SmolLM2, distribution checks, EOS."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from train_helpers import tiny_model

import aft_jax
from aft_jax.data.tasks import format_prompt
from aft_jax.sampling.sampler import (
    SamplingParams,
    decode_completion,
    filter_logits,
    left_pad,
    own_cache_sizes,
    sample_token_ids,
)


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


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampling_reproduces_softmax_probabilities(temperature, top_k):
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
        tokens, _ = sample_token_ids(model, prompt, mask, params, jax.random.key(seed))
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


def test_seeded_sampling_is_reproducible(smollm2_dir):
    model, tokenizer = aft_jax.from_pretrained(smollm2_dir)
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
    sharded, _ = sample_token_ids(tiny_model(mesh, seed=6), ids, mask, params, jax.random.key(3), num_samples=2)
    np.testing.assert_array_equal(single, sharded)


def test_own_cache_grows_in_quarters_to_max_new_tokens():
    assert own_cache_sizes(256) == [64, 128, 192, 256]
    assert own_cache_sizes(100) == [32, 64, 96, 100]
    assert own_cache_sizes(40) == [32, 40]
    assert own_cache_sizes(12) == [12]


def test_sampler_texts_equal_its_token_ids(smollm2_dir):
    """`Sampler.sample` (texts, batched and padded here) and `Sampler.sample_ids` (ids given) agree greedily."""
    model, tokenizer = aft_jax.from_pretrained(smollm2_dir)
    sampler = aft_jax.Sampler(model, tokenizer, batch_size=4)
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
