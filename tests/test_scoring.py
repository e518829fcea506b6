"""Completion-only scores against a log-softmax of the full logits, and invariance to padding."""

import jax
import numpy as np
import pytest
from train_helpers import VOCAB, tiny_model

from aft_jax.method.scoring import sequence_scores


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def _place(tokens, prompt_len, width, left_pad):
    ids, att, comp = np.zeros(width, np.int32), np.zeros(width, np.int32), np.zeros(width, np.int32)
    start = width - len(tokens) if left_pad else 0
    ids[start : start + len(tokens)] = tokens
    att[start : start + len(tokens)] = 1
    comp[start + prompt_len : start + len(tokens)] = 1
    return ids, att, comp


def test_scores_match_full_log_softmax(model):
    rng = np.random.default_rng(0)
    tokens = [rng.integers(1, VOCAB, size=n) for n in (12, 9, 5)]
    prompt_lens = [4, 6, 2]
    rows = [_place(t, p, 12, left_pad=False) for t, p in zip(tokens, prompt_lens)]
    ids, att, comp = (np.stack(x) for x in zip(*rows))
    mean, total = sequence_scores(model, ids, att, comp, chunk_size=5)
    logits = np.asarray(model(ids, att), np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    for b, (t, p) in enumerate(zip(tokens, prompt_lens)):
        picked = [logp[b, pos - 1, t[pos]] for pos in range(p, len(t))]
        np.testing.assert_allclose(total[b], np.sum(picked), rtol=1e-5)
        np.testing.assert_allclose(mean[b], np.mean(picked), rtol=1e-5)


def test_scores_do_not_depend_on_padding(model):
    rng = np.random.default_rng(1)
    tokens, prompt_len = rng.integers(1, VOCAB, size=10), 3
    variants = [_place(tokens, prompt_len, width, left) for width in (10, 13, 21) for left in (False, True)]
    scores = []
    for ids, att, comp in variants:
        mean, total = jax.jit(lambda i, a, c: sequence_scores(model, i, a, c, chunk_size=4))(
            ids[None], att[None], comp[None]
        )
        scores.append((float(mean[0]), float(total[0])))
    np.testing.assert_allclose(scores, [scores[0]] * len(scores), rtol=2e-6)
