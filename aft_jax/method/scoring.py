"""Completion-only log-probabilities and sequence scores (AFT_METHOD section 3), in float32, from either
batch layout (`aft_jax.data.batches`): padded `[B, K, T]` sequences or packed rows with `slot_ids`.

The vocabulary projection and log-softmax run over `chunk_size` positions at a time under
`jax.checkpoint`, so neither the forward nor the backward pass holds a float32 `[N, T, V]` tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def completion_logprobs(model, input_ids_nt, attention_mask_nt, completion_mask_nt, *, chunk_size: int = 128):
    """`log p(x_t | x_<t)` where `completion_mask_nt[:, t]` is set, else 0; float32 `[N, T]`.

    Position 0 has no context and always scores 0.
    """
    hidden_ntd = model.hidden_states(input_ids_nt, attention_mask_nt)
    return token_logprobs(model, hidden_ntd, input_ids_nt, completion_mask_nt, chunk_size=chunk_size)


def token_logprobs(model, hidden_ntd, input_ids_nt, completion_mask_nt, *, chunk_size: int = 128):
    """`log p(x_t)` from the hidden state at `t - 1` of the same row where `completion_mask_nt[:, t]` is set,
    else 0; float32 `[N, T]`, the vocabulary projected `chunk_size` positions at a time."""
    n, t = input_ids_nt.shape
    hidden_ntd, targets_nt = hidden_ntd[:, :-1], input_ids_nt[:, 1:]
    chunk = max(1, min(chunk_size, t - 1))
    pad = -(t - 1) % chunk
    hidden_ntd = jnp.pad(hidden_ntd, ((0, 0), (0, pad), (0, 0)))
    targets_nt = jnp.pad(targets_nt, ((0, 0), (0, pad)))
    num_chunks = (t - 1 + pad) // chunk
    hidden_cnkd = hidden_ntd.reshape(n, num_chunks, chunk, -1).swapaxes(0, 1)
    targets_cnk = targets_nt.reshape(n, num_chunks, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def chunk_logprobs(args):
        hidden_nkd, targets_nk = args
        logits_nkv = model.logits(hidden_nkd)
        picked = jnp.take_along_axis(logits_nkv, targets_nk[..., None], axis=-1)[..., 0]
        return picked - jax.nn.logsumexp(logits_nkv, axis=-1)

    logp_nt = jax.lax.map(chunk_logprobs, (hidden_cnkd, targets_cnk)).swapaxes(0, 1).reshape(n, -1)[:, : t - 1]
    logp_nt = jnp.pad(logp_nt, ((0, 0), (1, 0)))
    return jnp.where(completion_mask_nt.astype(bool), logp_nt, 0.0)


def sequence_scores(model, input_ids, attention_mask, completion_mask, *, chunk_size: int = 128):
    """`(mean_logp [N], sum_logp [N])` over completion tokens: the AFT score `s(c)` and DPO's summed log-prob.

    A sequence without completion tokens gets mean 0.
    """
    logp_nt = completion_logprobs(model, input_ids, attention_mask, completion_mask, chunk_size=chunk_size)
    count_n = jnp.sum(completion_mask.astype(bool), axis=-1)
    sum_n = jnp.sum(logp_nt, axis=-1)
    return sum_n / jnp.maximum(count_n, 1), sum_n


def candidate_logp_sums(model, batch, *, chunk_size: int = 128):
    """Each candidate's summed completion log-prob, float32 `[B, K]` (0 for empty slots), from a padded or a
    packed batch; a packed batch's tokens are added into their candidates by `slot_ids`."""
    b, k = batch["valid"].shape
    if "slot_ids" in batch:
        hidden_rtd = model.packed_hidden_states(
            batch["input_ids"], batch["positions"], batch["segment_ids"], batch["branch_ids"]
        )
        logp_rt = token_logprobs(model, hidden_rtd, batch["input_ids"], batch["completion_mask"], chunk_size=chunk_size)
        return jnp.zeros((b * k,), jnp.float32).at[batch["slot_ids"].reshape(-1)].add(logp_rt.reshape(-1)).reshape(b, k)
    t = batch["input_ids"].shape[-1]
    logp_nt = completion_logprobs(
        model,
        batch["input_ids"].reshape(b * k, t),
        batch["attention_mask"].reshape(b * k, t),
        batch["completion_mask"].reshape(b * k, t),
        chunk_size=chunk_size,
    )
    return jnp.sum(logp_nt, axis=-1).reshape(b, k)
