"""Losses of AFT_METHOD section 4: pure functions of per-candidate scores and masks.

Shapes: `B` question groups of `K` candidate slots. `scores_bk` are mean completion log-probs `s(c)`;
`levels_bk` integer quality levels (higher is better; binary labels are levels 1 / 0); `valid_bk` marks
real (non-padded) candidates. Each group loss is returned per group `[B]`; a group without an ordered
pair and every padded slot contribute exactly 0. `sg` is `jax.lax.stop_gradient`.

`constraint` is one of:
- "none":     log(1 + sum_{r_i > r_j} exp(s_j - s_i))
- "detach":   the lower candidate's score is `sg(s_j)`, so only higher-ranked candidates get gradient
- "boundary": adds exp(T_ij - s_j), T_ij = sg(2 B_j - s_i), B_j = min_{i: r_i > r_j} s_i - beta,
              which pulls s_j back up once it falls below B_j
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CONSTRAINTS = ("none", "detach", "boundary")
sg = jax.lax.stop_gradient


def _check(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={constraint!r}; expected one of {CONSTRAINTS}")


def ordered_pairs(levels_bk, valid_bk):
    """`pairs_bij[b, i, j]`: candidate i is ranked strictly above candidate j, both real."""
    valid_bij = valid_bk[:, :, None] & valid_bk[:, None, :]
    return (levels_bk[:, :, None] > levels_bk[:, None, :]) & valid_bij


def _log1p_sum_exp(terms_bx, mask_bx):
    """`log(1 + sum_x exp(terms))` over masked entries, stably (a logsumexp with a 0 term); 0 when empty."""
    masked = jnp.where(mask_bx, terms_bx, -jnp.inf)
    zeros = jnp.zeros(masked.shape[:1] + (1,), masked.dtype)
    return jax.nn.logsumexp(jnp.concatenate([zeros, masked.reshape(masked.shape[0], -1)], axis=1), axis=1)


def boundary_targets(scores_bk, pairs_bij, beta: float):
    """`T_ij = sg(2 B_j - s_i)` with `B_j = min_{i: r_i > r_j} s_i - beta` (0 where j has no higher candidate)."""
    higher_min_bj = jnp.min(jnp.where(pairs_bij, scores_bk[:, :, None], jnp.inf), axis=1)
    boundary_bj = jnp.where(jnp.any(pairs_bij, axis=1), higher_min_bj - beta, 0.0)
    return sg(2.0 * boundary_bj[:, None, :] - scores_bk[:, :, None])


def boundary_term(scores_bk, pairs_bij, beta: float):
    """The constraint alone: `log(1 + sum_{pairs} exp(T_ij - s_j))`, `[B]`."""
    targets_bij = boundary_targets(scores_bk, pairs_bij, beta)
    return _log1p_sum_exp(targets_bij - scores_bk[:, None, :], pairs_bij)


def ranking_loss(scores_bk, levels_bk, valid_bk, *, constraint: str = "boundary", beta: float = 0.1):
    """AFT with ranking feedback (L_RBC, its detached variant, or no constraint), `[B]`."""
    _check(constraint)
    pairs_bij = ordered_pairs(levels_bk, valid_bk)
    lower_bk = sg(scores_bk) if constraint == "detach" else scores_bk
    terms = lower_bk[:, None, :] - scores_bk[:, :, None]  # s_j - s_i
    if constraint != "boundary":
        return _log1p_sum_exp(terms, pairs_bij)
    targets_bij = boundary_targets(scores_bk, pairs_bij, beta)
    both = jnp.stack([terms, targets_bij - scores_bk[:, None, :]], axis=-1)
    return _log1p_sum_exp(both, jnp.broadcast_to(pairs_bij[..., None], both.shape))


def alignment_loss(scores_bk, is_pos_bk, is_neg_bk, *, constraint: str = "boundary", beta: float = 0.1):
    """Binary-feedback AFT (L_A, L_DC or L_BC), `[B]`: positives are level 1 and negatives level 0."""
    return ranking_loss(scores_bk, is_pos_bk.astype(jnp.int32), is_pos_bk | is_neg_bk, constraint=constraint, beta=beta)


def _with_constraint(loss_b, scores_bk, pairs_bij, constraint: str, beta: float):
    return loss_b + boundary_term(scores_bk, pairs_bij, beta) if constraint == "boundary" else loss_b


def rrhf_loss(scores_bk, levels_bk, valid_bk, *, constraint: str = "none", beta: float = 0.1):
    """RRHF's ranking term `sum_{r_i > r_j} max(0, s_j - s_i)` (+ constraint), `[B]`; add the NLL separately."""
    _check(constraint)
    pairs_bij = ordered_pairs(levels_bk, valid_bk)
    lower_bk = sg(scores_bk) if constraint == "detach" else scores_bk
    hinge_bij = jnp.maximum(0.0, lower_bk[:, None, :] - scores_bk[:, :, None])
    return _with_constraint(
        jnp.sum(jnp.where(pairs_bij, hinge_bij, 0.0), axis=(1, 2)), scores_bk, pairs_bij, constraint, beta
    )


def pro_loss(scores_bk, levels_bk, valid_bk, *, constraint: str = "none", beta: float = 0.1):
    """PRO, listwise: `sum_i -log(exp(s_i) / (exp(s_i) + sum_{r_j < r_i} exp(s_j)))` over every i that
    ranks above some candidate (+ constraint), `[B]`."""
    _check(constraint)
    pairs_bij = ordered_pairs(levels_bk, valid_bk)
    lower_bk = sg(scores_bk) if constraint == "detach" else scores_bk
    lower_bij = jnp.broadcast_to(lower_bk[:, None, :], pairs_bij.shape)
    own_bi1 = scores_bk[:, :, None]
    denominator_bi = jax.nn.logsumexp(
        jnp.concatenate([own_bi1, jnp.where(pairs_bij, lower_bij, -jnp.inf)], axis=2), axis=2
    )
    has_lower_bi = jnp.any(pairs_bij, axis=2)
    loss_b = jnp.sum(jnp.where(has_lower_bi, denominator_bi - scores_bk, 0.0), axis=1)
    return _with_constraint(loss_b, scores_bk, pairs_bij, constraint, beta)


def dpo_loss(
    sum_logp_bk,
    ref_sum_logp_bk,
    levels_bk,
    valid_bk,
    *,
    beta_dpo: float = 0.1,
    constraint: str = "none",
    scores_bk=None,
    beta: float = 0.1,
):
    """DPO over ordered pairs: mean over the group's pairs of
    `-log sigmoid(beta_dpo * ((S_i - R_i) - (S_j - R_j)))`, `[B]`.

    S are summed completion log-probs under the trained model, R the same under the frozen VFT model
    (precomputed). The constraint acts on the length-normalised `scores_bk` (needed for "boundary");
    "detach" stops the gradient through `S_j`.
    """
    _check(constraint)
    pairs_bij = ordered_pairs(levels_bk, valid_bk)
    lower_bk = sg(sum_logp_bk) if constraint == "detach" else sum_logp_bk
    margin_bij = (sum_logp_bk - ref_sum_logp_bk)[:, :, None] - (lower_bk - ref_sum_logp_bk)[:, None, :]
    per_pair = -jax.nn.log_sigmoid(beta_dpo * margin_bij)
    count_b = jnp.sum(pairs_bij, axis=(1, 2))
    loss_b = jnp.sum(jnp.where(pairs_bij, per_pair, 0.0), axis=(1, 2)) / jnp.maximum(count_b, 1)
    if constraint == "boundary":
        if scores_bk is None:
            raise ValueError("dpo_loss with constraint='boundary' needs the mean scores (scores_bk)")
        loss_b = loss_b + boundary_term(scores_bk, pairs_bij, beta)
    return loss_b


def vft_loss(sum_logp_bk, target_bk, num_tokens):
    """Token-mean negative log-likelihood of the target candidates: `-sum_{target} sum_logp / num_tokens`,
    `num_tokens` being their completion tokens (the global batch's count, for micro-batches)."""
    return -jnp.sum(jnp.where(target_bk, sum_logp_bk, 0.0)) / num_tokens


def assessment_counts(scores_bk, is_pos_bk, is_neg_bk):
    """Per group: `(right_b, pairs_b)`, the number of (p, n) pairs with `s_p > s_n` and of all (p, n) pairs."""
    pairs_bij = ordered_pairs(is_pos_bk.astype(jnp.int32), is_pos_bk | is_neg_bk)
    right_bij = pairs_bij & (scores_bk[:, :, None] > scores_bk[:, None, :])
    return jnp.sum(right_bij, axis=(1, 2)), jnp.sum(pairs_bij, axis=(1, 2))


def assessment_accuracy(scores_bk, is_pos_bk, is_neg_bk):
    """`(macro, micro)` fraction of (p, n) pairs with `s_p > s_n`, over groups having both; NaN if none."""
    right_b, pairs_b = assessment_counts(scores_bk, is_pos_bk, is_neg_bk)
    has_b = pairs_b > 0
    macro = jnp.sum(jnp.where(has_b, right_b / jnp.maximum(pairs_b, 1), 0.0)) / jnp.sum(has_b)
    micro = jnp.sum(right_b) / jnp.sum(pairs_b)
    return macro, micro
