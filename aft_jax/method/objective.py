"""The training objective `L = w_vft * L_VFT + lambda * L_align` over a batch of candidate groups.

One forward pass over all `B * K` candidates (padded or packed, `aft_jax.data.batches`) gives each one's
summed completion log-prob; the VFT loss is the target candidates' sum over their token count and the
alignment loss reads the per-candidate scores. Losses are sums divided by normalisers
of the *global* batch (`normalisers`), so gradients accumulated over micro-batches equal the
full-batch gradient exactly.
"""

from __future__ import annotations

import jax.numpy as jnp

from aft_jax.method import losses
from aft_jax.method.registry import get_method
from aft_jax.method.scoring import candidate_logp_sums


def vft_rows(batch, loss_cfg):
    """Which candidates the NLL term trains on: the reference, or every positive (RFT)."""
    if (get_method(loss_cfg.method).vft_rows or loss_cfg.vft_targets) == "positives":
        return batch["is_pos"] & batch["valid"]
    return batch["is_reference"] & batch["valid"]


def normalisers(batch, loss_cfg) -> dict:
    """Global-batch denominators: VFT target tokens and real groups."""
    tokens = jnp.sum(jnp.where(vft_rows(batch, loss_cfg), batch["completion_tokens"], 0))
    groups = jnp.sum(jnp.any(batch["valid"], axis=-1))
    return {
        "vft_tokens": jnp.maximum(tokens, 1).astype(jnp.float32),
        "groups": jnp.maximum(groups, 1).astype(jnp.float32),
    }


def vft_weight(loss_cfg) -> float:
    """`loss.vft_weight`, where a negative value means the method's default (0 for DPO, else 1)."""
    return float(loss_cfg.vft_weight) if loss_cfg.vft_weight >= 0 else get_method(loss_cfg.method).vft_weight


def alignment_terms(scores_bk, sum_logp_bk, batch, loss_cfg):
    """The method's per-group alignment loss `[B]` (zeros for the NLL-only methods, VFT and RFT)."""
    align = get_method(loss_cfg.method).align
    if align is None:
        return jnp.zeros(scores_bk.shape[:1], jnp.float32)
    return align(scores_bk, sum_logp_bk, rank_levels(batch, loss_cfg), batch, loss_cfg)


def rank_levels(batch, loss_cfg):
    """What the alignment loss ranks candidates by `[B, K]`: their `levels` (`loss.use_levels`), else their
    labels (1 positive, 0 negative)."""
    return batch["levels"] if loss_cfg.use_levels else batch["is_pos"].astype(jnp.int32)


def groups_without_signal(levels_bk, valid_bk):
    """`[B]`: real groups (a valid candidate) whose valid candidates all share one level: no pair to rank
    (GRPO's zero-reward-std groups)."""
    top = jnp.max(jnp.where(valid_bk, levels_bk, jnp.iinfo(jnp.int32).min), axis=-1)
    bottom = jnp.min(jnp.where(valid_bk, levels_bk, jnp.iinfo(jnp.int32).max), axis=-1)
    return jnp.any(valid_bk, axis=-1) & (top == bottom)


def objective(model, batch, norm, loss_cfg):
    """Returns `(loss, sums)`: the scalar loss of this (micro-)batch and additive statistics for metrics."""
    sum_logp_bk = candidate_logp_sums(model, batch, chunk_size=loss_cfg.logit_chunk)
    scores_bk = sum_logp_bk / jnp.maximum(batch["completion_tokens"], 1)

    vft_nll = losses.vft_loss(sum_logp_bk, vft_rows(batch, loss_cfg), norm["vft_tokens"])
    align = jnp.sum(alignment_terms(scores_bk, sum_logp_bk, batch, loss_cfg)) / norm["groups"]
    loss = vft_weight(loss_cfg) * vft_nll + loss_cfg.lam * align

    is_pos, is_neg = batch["is_pos"] & batch["valid"], batch["is_neg"] & batch["valid"]
    right_b, pairs_b = losses.assessment_counts(scores_bk, is_pos, is_neg)
    sums = {
        "loss": loss,
        "vft_loss": vft_nll,
        "align_loss": align,
        "pos_score_sum": jnp.sum(jnp.where(is_pos, scores_bk, 0.0)),
        "pos_count": jnp.sum(is_pos),
        "neg_score_sum": jnp.sum(jnp.where(is_neg, scores_bk, 0.0)),
        "neg_count": jnp.sum(is_neg),
        "pairs_right": jnp.sum(right_b),
        "pairs_total": jnp.sum(pairs_b),
        "macro_sum": jnp.sum(jnp.where(pairs_b > 0, right_b / jnp.maximum(pairs_b, 1), 0.0)),
        "macro_groups": jnp.sum(pairs_b > 0),
        "no_signal_groups": jnp.sum(groups_without_signal(rank_levels(batch, loss_cfg), batch["valid"])),
        "real_groups": jnp.sum(jnp.any(batch["valid"], axis=-1)),
    }
    return loss, sums


def finalize_metrics(sums) -> dict:
    """Ratios from summed statistics (NaN where a denominator is 0)."""
    pos = sums["pos_score_sum"] / sums["pos_count"]
    neg = sums["neg_score_sum"] / sums["neg_count"]
    return {
        "loss": sums["loss"],
        "vft_loss": sums["vft_loss"],
        "align_loss": sums["align_loss"],
        "pos_score": pos,
        "neg_score": neg,
        "margin": pos - neg,
        "assess_macro": sums["macro_sum"] / sums["macro_groups"],
        "assess_micro": sums["pairs_right"] / sums["pairs_total"],
        "groups_without_signal": sums["no_signal_groups"] / sums["real_groups"],
    }
