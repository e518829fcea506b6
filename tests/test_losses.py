"""Every loss against a loop-by-loop NumPy transcription of AFT_METHOD section 4, plus gradient properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aft_jax.method import losses

BETA = 0.3


def random_groups(seed, b=6, k=7, levels=2):
    """Ragged groups: each has a random number of real candidates, the rest padded with junk scores."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(-1.0, 0.7, size=(b, k)).astype(np.float32)
    lv = rng.integers(0, levels, size=(b, k)).astype(np.int32)
    valid = np.zeros((b, k), bool)
    for g in range(b):
        valid[g, : rng.integers(1, k + 1)] = True
    lv[0, :] = levels - 1  # a group with no lower candidate
    scores[~valid] = rng.normal(5.0, 1.0, size=(~valid).sum())  # padding must not leak
    return scores, lv, valid


def np_pairs(lv, valid, g):
    k = lv.shape[1]
    return [(i, j) for i in range(k) for j in range(k) if valid[g, i] and valid[g, j] and lv[g, i] > lv[g, j]]


def np_log1p_sum_exp(terms):
    return float(np.log1p(np.sum(np.exp(np.asarray(terms, np.float64))))) if terms else 0.0


def np_ranking(s, lv, valid, constraint):
    out = []
    for g in range(s.shape[0]):
        pairs = np_pairs(lv, valid, g)
        terms = []
        for i, j in pairs:
            terms.append(s[g, j] - s[g, i])
            if constraint == "boundary":
                bound = min(s[g, a] for a, c in pairs if c == j) - BETA
                terms.append((2 * bound - s[g, i]) - s[g, j])
        out.append(np_log1p_sum_exp(terms))
    return np.array(out)


def np_boundary(s, lv, valid, g, pairs):
    terms = []
    for i, j in pairs:
        bound = min(s[g, a] for a, c in pairs if c == j) - BETA
        terms.append((2 * bound - s[g, i]) - s[g, j])
    return np_log1p_sum_exp(terms)


def np_rrhf(s, lv, valid, constraint):
    out = []
    for g in range(s.shape[0]):
        pairs = np_pairs(lv, valid, g)
        value = sum(max(0.0, s[g, j] - s[g, i]) for i, j in pairs)
        out.append(value + (np_boundary(s, lv, valid, g, pairs) if constraint == "boundary" else 0.0))
    return np.array(out)


def np_pro(s, lv, valid, constraint):
    out = []
    for g in range(s.shape[0]):
        pairs = np_pairs(lv, valid, g)
        value = 0.0
        for i in sorted({i for i, _ in pairs}):
            lower = [s[g, j] for a, j in pairs if a == i]
            value += -np.log(np.exp(s[g, i]) / (np.exp(s[g, i]) + np.sum(np.exp(lower))))
        out.append(value + (np_boundary(s, lv, valid, g, pairs) if constraint == "boundary" else 0.0))
    return np.array(out)


def np_dpo(total, ref, s, lv, valid, beta_dpo, constraint):
    out = []
    for g in range(s.shape[0]):
        pairs = np_pairs(lv, valid, g)
        vals = [np.log1p(np.exp(-beta_dpo * ((total[g, i] - ref[g, i]) - (total[g, j] - ref[g, j])))) for i, j in pairs]
        value = float(np.mean(vals)) if vals else 0.0
        out.append(value + (np_boundary(s, lv, valid, g, pairs) if constraint == "boundary" else 0.0))
    return np.array(out)


@pytest.mark.parametrize("constraint", losses.CONSTRAINTS)
@pytest.mark.parametrize("levels", [2, 4])
def test_ranking_loss_matches_numpy(constraint, levels):
    s, lv, valid = random_groups(levels, levels=levels)
    got = losses.ranking_loss(s, lv, valid, constraint=constraint, beta=BETA)
    np.testing.assert_allclose(got, np_ranking(s, lv, valid, constraint), rtol=1e-5, atol=1e-6)
    assert got[0] == 0.0, "a group with no lower-ranked candidate has loss exactly 0"


@pytest.mark.parametrize("constraint", losses.CONSTRAINTS)
def test_alignment_loss_is_binary_ranking(constraint):
    s, lv, valid = random_groups(7)
    is_pos, is_neg = valid & (lv == 1), valid & (lv == 0)
    got = losses.alignment_loss(s, is_pos, is_neg, constraint=constraint, beta=BETA)
    np.testing.assert_allclose(got, np_ranking(s, lv, valid, constraint), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("constraint", losses.CONSTRAINTS)
def test_rrhf_and_pro_match_numpy(constraint):
    s, lv, valid = random_groups(11, levels=3)
    np.testing.assert_allclose(
        losses.rrhf_loss(s, lv, valid, constraint=constraint, beta=BETA),
        np_rrhf(s, lv, valid, constraint),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        losses.pro_loss(s, lv, valid, constraint=constraint, beta=BETA),
        np_pro(s, lv, valid, constraint),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("constraint", losses.CONSTRAINTS)
def test_dpo_matches_numpy(constraint):
    s, lv, valid = random_groups(5)
    rng = np.random.default_rng(0)
    total = (s * 20).astype(np.float32)
    ref = (total + rng.normal(0, 2, size=s.shape)).astype(np.float32)
    got = losses.dpo_loss(total, ref, lv, valid, beta_dpo=0.2, constraint=constraint, scores_bk=s, beta=BETA)
    np.testing.assert_allclose(got, np_dpo(total, ref, s, lv, valid, 0.2, constraint), rtol=1e-5, atol=1e-6)


def test_vft_loss_and_assessment_accuracy_match_numpy():
    rng = np.random.default_rng(2)
    logp = -rng.random((2, 3, 9)).astype(np.float32)  # token log-probs of [B, K] candidates
    completion = rng.random((2, 3, 9)) < 0.7
    target = np.array([[True, False, True], [False, True, False]])
    tokens = completion & target[..., None]
    got = losses.vft_loss(np.where(completion, logp, 0).sum(-1), target, tokens.sum())
    np.testing.assert_allclose(got, -logp[tokens].mean(), rtol=1e-6)

    s, lv, valid = random_groups(3)
    is_pos, is_neg = valid & (lv == 1), valid & (lv == 0)
    per_group, right, total = [], 0, 0
    for g in range(s.shape[0]):
        pairs = [(p, n) for p in np.flatnonzero(is_pos[g]) for n in np.flatnonzero(is_neg[g])]
        if pairs:
            wins = sum(s[g, p] > s[g, n] for p, n in pairs)
            per_group.append(wins / len(pairs))
            right, total = right + wins, total + len(pairs)
    macro, micro = losses.assessment_accuracy(s, is_pos, is_neg)
    np.testing.assert_allclose([macro, micro], [np.mean(per_group), right / total], rtol=1e-6)


def _one_group(pos, neg):
    s = jnp.array([pos + neg], jnp.float32)
    is_pos = jnp.array([[True] * len(pos) + [False] * len(neg)])
    return s, is_pos, ~is_pos


def test_detach_gives_negatives_zero_gradient():
    s, is_pos, is_neg = _one_group([-1.0, -1.5], [-0.8, -2.0, -1.1])
    grad = jax.grad(lambda x: losses.alignment_loss(x, is_pos, is_neg, constraint="detach").sum())(s)
    assert np.all(np.asarray(grad)[0, 2:] == 0.0)
    assert np.all(np.asarray(grad)[0, :2] < 0.0), "positives are pushed up"


def test_boundary_pair_term_is_minimised_at_the_boundary():
    beta = 0.2
    pos = [-1.0, -1.4]
    boundary = min(pos) - beta
    grid = np.linspace(boundary - 1.0, boundary + 1.0, 2001)

    def loss_at(sn):
        s, is_pos, is_neg = _one_group(pos, [float(sn)])
        return float(losses.alignment_loss(s, is_pos, is_neg, constraint="boundary", beta=beta)[0])

    # With respect to the negative's score alone (positives fixed), the minimum sits at B.
    values = [loss_at(x) for x in grid]
    assert abs(grid[int(np.argmin(values))] - boundary) < 2e-3
    s, is_pos, is_neg = _one_group(pos, [boundary - 0.5])
    grad = jax.grad(lambda x: losses.alignment_loss(x, is_pos, is_neg, constraint="boundary", beta=beta).sum())(s)
    assert grad[0, 2] < 0.0, "below the boundary the negative is pulled back up"


def test_no_constraint_keeps_pushing_negatives_down():
    for sn in [-1.0, -5.0, -20.0]:
        s, is_pos, is_neg = _one_group([-1.0], [sn])
        grad = jax.grad(lambda x: losses.alignment_loss(x, is_pos, is_neg, constraint="none").sum())(s)
        assert grad[0, 1] > 0.0


def test_dpo_applies_beta_once():
    total = jnp.array([[-10.0, -14.0]])
    ref = jnp.array([[-11.0, -12.0]])
    levels, valid = jnp.array([[1, 0]]), jnp.array([[True, True]])
    beta = 0.37
    margin = (-10.0 + 11.0) - (-14.0 + 12.0)
    grad = jax.grad(lambda t: losses.dpo_loss(t, ref, levels, valid, beta_dpo=beta).sum())(total)
    expected = -beta * (1 - jax.nn.sigmoid(beta * margin))
    np.testing.assert_allclose(grad[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(
        losses.dpo_loss(total, ref, levels, valid, beta_dpo=beta)[0],
        -np.log(1 / (1 + np.exp(-beta * margin))),
        rtol=1e-6,
    )


def test_padding_gets_no_gradient():
    s, lv, valid = random_groups(9)
    for fn in (
        lambda x: losses.ranking_loss(x, lv, valid, constraint="boundary"),
        lambda x: losses.pro_loss(x, lv, valid, constraint="boundary"),
        lambda x: losses.rrhf_loss(x, lv, valid, constraint="boundary"),
    ):
        grad = np.asarray(jax.grad(lambda x: fn(x).sum())(jnp.asarray(s)))
        assert np.all(grad[~valid] == 0.0) and np.all(np.isfinite(grad))
