"""Continuous batching: a fixed set of rows that each take the next pending sample as soon as they are free,
inside one jitted `lax.while_loop` (static shapes throughout).

The work is Q prompts, k samples each (sample `w = question * k + j`). G prompt slots hold one question's
prompt keys/values each, and m rows each (`rows_per_prompt`; B = G * m), which read that one prompt copy
(`aft_jax.model.attention.SharedPrompt`). A slot runs a share of its question's samples (all k when
admitted): a row that stops (EOS or `max_new_tokens`) starts the share's next sample at once (`start_samples`:
no prefill, the prompt's last logits are kept). A slot whose share has all started and whose rows have all
stopped is free; free slots take the next questions once `width` of them are free (or as soon as there are
slots for all the questions left), prefilled together (`admit`); once no question is pending, a free slot
takes the later half of the unstarted samples of the slot with the most, with a copy of its prompt
(`steal`), so that the last questions' samples spread over the rows. Each loop step does these where due,
then decodes one token in every row. With m = k a question's samples start together and its slot waits for
the longest; with m < k a slot's rows idle only while its share's last samples finish, and a prompt is
read by m rows instead of k.

Rows are at different steps of their samples, so each keeps its own position, and its own keys/values go
to column `step % N` of its own cache (N = `max_new_tokens`): a sample never runs for more than N steps,
so the columns it writes are distinct, and starting a sample clears the columns of the row's previous one.
Every draw has the key of its `(question, sample, step)` (`next_token.sample_keys`), so the samples are
the static loop's (`aft_jax.sampling.static`) for any number of rows, order of starts or split of the
work (up to the last bits of float arithmetic on other shapes).

On a mesh (the model's), the slots are a multiple of its data x fsdp devices and every per-slot and
per-row array is split over them along its first axis (`constrain_slots`), a slot's rows on its device: the
rows decode in parallel and each device holds only its rows' caches. The host loop (`sample_continuous`)
only starts the loop and resumes it `N` steps at a time, to show progress; prompts are on the device from
the start and samples are collected at the end, in order.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from aft_jax.parallel import sharding
from aft_jax.sampling.decode import DecodeCache, decode_layers, decode_step, unstack_layers
from aft_jax.sampling.next_token import SamplingParams, sample_keys, sample_next


class Slots(NamedTuple):
    """The loop state. Per prompt slot: the question it holds (`question_g`), the samples of it the slot
    is to run (`next_sample_g` up to `end_sample_g`: the next to start and the end of its share) and its
    prompt's last logits (`prompt_logits_gv`). Per
    row: its next-token `logits_bv`, the sample it generates (`sample_b`), the tokens generated so far
    (`step_b`) and whether it still generates (`active_b`). `cache` holds the G prompts and each row's own
    N columns; `tokens_wn` every sample's tokens (pad after EOS and where not generated); `next_question`
    is the first not yet admitted, `step` the decode steps run, `finished` the samples done."""

    cache: DecodeCache
    question_g: jnp.ndarray
    next_sample_g: jnp.ndarray
    end_sample_g: jnp.ndarray
    prompt_logits_gv: jnp.ndarray
    logits_bv: jnp.ndarray
    sample_b: jnp.ndarray
    step_b: jnp.ndarray
    active_b: jnp.ndarray
    tokens_wn: jnp.ndarray
    next_question: jnp.ndarray
    step: jnp.ndarray
    finished: jnp.ndarray


class Samples(NamedTuple):
    """NumPy `tokens [Q * k, N]` (pad after EOS) and `lengths [Q * k]` (EOS included) of every sample, the
    decode `steps` the loop ran and the `row_shards` its rows were split into over the mesh's devices."""

    tokens: np.ndarray
    lengths: np.ndarray
    steps: int
    row_shards: int = 1


def empty_slots(model, slots: int, rows_per_prompt: int, prompt_length: int, work: int, params: SamplingParams):
    """`Slots` with nothing admitted: `slots` prompt slots of `prompt_length`, `rows_per_prompt` rows each,
    and room for `work` samples of `params.max_new_tokens` tokens."""
    cfg, n = model.config, params.max_new_tokens
    b, dt, layers = slots * rows_per_prompt, jnp.dtype(cfg.dtype), range(cfg.num_layers)

    def zeros(*shape, dtype=dt):
        return jnp.zeros(shape, dtype)

    cache = DecodeCache(
        tuple(zeros(slots, cfg.num_kv_heads, cfg.head_dim, prompt_length) for _ in layers),
        tuple(zeros(slots, cfg.num_kv_heads, prompt_length, cfg.head_dim) for _ in layers),
        zeros(slots, prompt_length, dtype=bool),
        tuple(zeros(b, cfg.num_kv_heads, cfg.head_dim, n) for _ in layers),
        tuple(zeros(b, cfg.num_kv_heads, n, cfg.head_dim) for _ in layers),
        zeros(b, n, dtype=bool),
        zeros(b, dtype=jnp.int32),
        zeros(dtype=jnp.int32),
    )
    return Slots(
        cache, jnp.full((slots,), -1, jnp.int32), zeros(slots, dtype=jnp.int32), zeros(slots, dtype=jnp.int32),
        zeros(slots, cfg.vocab_size, dtype=jnp.float32), zeros(b, cfg.vocab_size, dtype=jnp.float32),
        zeros(b, dtype=jnp.int32), zeros(b, dtype=jnp.int32), zeros(b, dtype=bool),
        jnp.full((work, n), params.pad_id, jnp.int32), *(zeros(dtype=jnp.int32) for _ in range(3)),
    )  # fmt: skip


def free_slots(s: Slots):
    """`[G]`: every sample of the slot's share has started and its rows have all stopped."""
    g = s.question_g.shape[0]
    return (s.next_sample_g >= s.end_sample_g) & ~jnp.any(s.active_b.reshape(g, -1), axis=1)


def admit(model, s: Slots, prompt_ids_qs, prompt_mask_qs, num_questions, width: int, num_samples: int) -> Slots:
    """Prefills the next `width` questions (fewer where fewer are pending or fewer slots are free) into the
    first free slots, in order; their samples start in `start_samples`."""
    g = s.question_g.shape[0]
    free_g = free_slots(s)
    question_c = s.next_question + jnp.arange(width, dtype=jnp.int32)
    admitted_c = (jnp.arange(width) < jnp.sum(free_g)) & (question_c < num_questions)
    slot_c = jnp.where(admitted_c, jnp.argsort(~free_g, stable=True)[:width], g)  # g: dropped
    last = prompt_ids_qs.shape[0] - 1
    ids_cs = prompt_ids_qs[jnp.minimum(question_c, last)]
    mask_cs = prompt_mask_qs[jnp.minimum(question_c, last)].astype(bool)
    hidden_csd, prompt = model.prefill(ids_cs, mask_cs)

    def put(x, new):
        return x.at[slot_c].set(new.astype(x.dtype), mode="drop")

    c, layers = s.cache, range(len(s.cache.prompt_keys))
    cache = c._replace(
        prompt_keys=tuple(put(c.prompt_keys[i], prompt.keys[i].transpose(0, 2, 3, 1)) for i in layers),
        prompt_values=tuple(put(c.prompt_values[i], prompt.values[i].transpose(0, 2, 1, 3)) for i in layers),
        prompt_mask_qs=put(c.prompt_mask_qs, mask_cs),
    )
    return s._replace(
        cache=cache,
        question_g=put(s.question_g, question_c),
        next_sample_g=put(s.next_sample_g, jnp.zeros_like(question_c)),
        end_sample_g=put(s.end_sample_g, jnp.full_like(question_c, num_samples)),
        prompt_logits_gv=put(s.prompt_logits_gv, model.logits(hidden_csd[:, -1])),
        next_question=s.next_question + jnp.sum(admitted_c, dtype=jnp.int32),
    )


def steal(s: Slots) -> Slots:
    """The first free slot takes the later half (rounded up) of the unstarted samples of the slot with the
    most, with a copy of its prompt: once no question is pending, free rows help finish the others'."""
    thief, victim = jnp.argmax(free_slots(s)), jnp.argmax(s.end_sample_g - s.next_sample_g)
    end = s.end_sample_g[victim]
    split = end - (end - s.next_sample_g[victim] + 1) // 2

    def copy(x):
        return x.at[thief].set(x[victim])

    c = s.cache
    cache = c._replace(
        prompt_keys=tuple(copy(x) for x in c.prompt_keys),
        prompt_values=tuple(copy(x) for x in c.prompt_values),
        prompt_mask_qs=copy(c.prompt_mask_qs),
    )
    return s._replace(
        cache=cache,
        question_g=copy(s.question_g),
        prompt_logits_gv=copy(s.prompt_logits_gv),
        next_sample_g=s.next_sample_g.at[thief].set(split),
        end_sample_g=s.end_sample_g.at[thief].set(end).at[victim].set(split),
    )


def start_samples(s: Slots) -> Slots:
    """Every stopped row of a slot with samples of its share left starts the next one (rows in order):
    position after the prompt, no own columns, the prompt's last logits, step 0."""
    g = s.question_g.shape[0]
    free_gm = ~s.active_b.reshape(g, -1)
    rank_gm = jnp.cumsum(free_gm, axis=1) - 1
    starts_gm = free_gm & (rank_gm < (s.end_sample_g - s.next_sample_g)[:, None])
    starts_b = starts_gm.reshape(-1)
    slot_b = jnp.arange(starts_b.shape[0]) // free_gm.shape[1]
    c = s.cache
    cache = c._replace(
        valid_bn=c.valid_bn & ~starts_b[:, None],
        positions_b=jnp.where(starts_b, jnp.sum(c.prompt_mask_qs, axis=1, dtype=jnp.int32)[slot_b], c.positions_b),
    )
    return s._replace(
        cache=cache,
        next_sample_g=s.next_sample_g + jnp.sum(starts_gm, axis=1, dtype=jnp.int32),
        logits_bv=jnp.where(starts_b[:, None], s.prompt_logits_gv[slot_b], s.logits_bv),
        sample_b=jnp.where(starts_b, (s.next_sample_g[:, None] + rank_gm).reshape(-1), s.sample_b),
        step_b=jnp.where(starts_b, 0, s.step_b),
        active_b=s.active_b | starts_b,
    )


def decode_one(model, layers, s: Slots, key, params: SamplingParams, num_samples: int) -> Slots:
    """One token in every active row, drawn with its sample's key, written to its sample's tokens, and run
    through the model (its keys/values into own column `step % N`)."""
    n = params.max_new_tokens
    question_b = jnp.repeat(s.question_g, s.active_b.shape[0] // s.question_g.shape[0])
    keys_b = sample_keys(key, question_b, s.sample_b, s.step_b)
    token_b = jnp.where(s.active_b, sample_next(s.logits_bv, keys_b, params), params.pad_id)
    work_b = jnp.where(s.active_b, question_b * num_samples + s.sample_b, s.tokens_wn.shape[0])  # beyond: dropped
    tokens_wn = s.tokens_wn.at[work_b, s.step_b].set(token_b, mode="drop")
    eos = jnp.asarray(params.eos_ids or (-1,), jnp.int32)
    stopped_b = s.active_b & (jnp.isin(token_b, eos) | (s.step_b + 1 >= n))
    logits_bv, cache = decode_step(model, layers, token_b, s.cache._replace(step=s.step % n))
    return s._replace(
        cache=cache, logits_bv=logits_bv, step_b=s.step_b + s.active_b, active_b=s.active_b & ~stopped_b,
        tokens_wn=tokens_wn, step=s.step + 1, finished=s.finished + jnp.sum(stopped_b, dtype=jnp.int32),
    )  # fmt: skip


def constrain_slots(s: Slots, mesh) -> Slots:
    """`s` with every per-slot `[G, ...]` and per-row `[B, ...]` array split along its first axis over the
    mesh's data x fsdp axes (as far as they divide G; rows `g * m ... (g + 1) * m - 1` then sit with slot g),
    and the samples' tokens and the counters replicated. The identity on one device."""
    if mesh.size == 1:
        return s
    rows = NamedSharding(mesh, PartitionSpec(sharding.logical_to_spec(("batch",), s.question_g.shape, mesh)[0]))

    def one(x):
        return jax.lax.with_sharding_constraint(x, rows if x.ndim else sharding.replicated(mesh))

    tokens_wn = jax.lax.with_sharding_constraint(s.tokens_wn, sharding.replicated(mesh))
    return jax.tree.map(one, s._replace(tokens_wn=None))._replace(tokens_wn=tokens_wn)


def _start(graphdef, params, num_samples, rows_per_prompt, slots, mesh, state, prompt_ids_qs, prompt_mask_qs, count):
    model = nnx.merge(graphdef, state)
    work = prompt_ids_qs.shape[0] * num_samples
    s = constrain_slots(empty_slots(model, slots, rows_per_prompt, prompt_ids_qs.shape[1], work, params), mesh)
    s = admit(model, s, prompt_ids_qs, prompt_mask_qs, count, slots, num_samples)
    return constrain_slots(start_samples(s), mesh)


def _advance(
    graphdef, params, num_samples, width, mesh, s, state, layer_states, prompt_ids_qs, prompt_mask_qs, count, key,
    until,
):  # fmt: skip
    """Runs loop steps until step `until` or until every sample has started and every row has stopped."""
    model = nnx.merge(graphdef, state)
    layers = unstack_layers(model, layer_states)

    def body(s):  # `s` enters split as the previous step (or `_start`) left it
        pending, free = count - s.next_question, jnp.sum(free_slots(s))
        s = jax.lax.cond(
            (pending > 0) & (free >= jnp.minimum(width, pending)),
            lambda s: admit(model, s, prompt_ids_qs, prompt_mask_qs, count, width, num_samples), lambda s: s, s,
        )  # fmt: skip
        unstarted_g = s.end_sample_g - s.next_sample_g
        s = jax.lax.cond((pending <= 0) & (free > 0) & jnp.any(unstarted_g > 0), steal, lambda s: s, s)
        waiting = jnp.any(~s.active_b.reshape(s.question_g.shape[0], -1) & (s.next_sample_g < s.end_sample_g)[:, None])
        s = jax.lax.cond(waiting, start_samples, lambda s: s, s)
        return constrain_slots(decode_one(model, layers, s, key, params, num_samples), mesh)

    def cond(s):
        unstarted = jnp.any(s.next_sample_g < s.end_sample_g)
        return (s.step < until) & ((s.next_question < count) | jnp.any(s.active_b) | unstarted)

    return jax.lax.while_loop(cond, body, s)


@functools.lru_cache(maxsize=32)
def _compiled(graphdef, params: SamplingParams, num_samples: int, rows_per_prompt: int, slots: int, width: int, mesh):
    start = jax.jit(functools.partial(_start, graphdef, params, num_samples, rows_per_prompt, slots, mesh))
    advance = jax.jit(functools.partial(_advance, graphdef, params, num_samples, width, mesh), donate_argnums=0)
    return start, advance


def slot_shape(
    rows: int, num_samples: int, questions: int, rows_per_prompt: int | None, prefill_width: int | None,
    shards: int = 1,
):  # fmt: skip
    """`(rows per prompt slot, slots, prefill width)` of `rows` rows: `rows_per_prompt` rows per slot (at
    most `num_samples`; by default `num_samples` when there are no more questions than rows, so a few
    samples per row, whose tail the questions' samples started together keep short, else one, which keeps
    every row busy), at least one slot and a multiple of `shards` slots where there are that many (the
    devices the rows are split over), and an eighth of the slots admitted together by default."""
    default = num_samples if questions <= rows else 1
    per_slot = min(rows_per_prompt or default, num_samples)
    slots = max(1, rows // per_slot)
    slots = slots // shards * shards or slots
    return per_slot, slots, min(prefill_width or max(1, slots // 8), slots)


def _prepared(model, prompt_ids_qs, prompt_mask_qs, params, num_samples, rows, rows_per_prompt, prefill_width):
    """The compiled `(start, advance)` of this layout, and the prompts padded to a power of two of them (few
    program shapes), the padding never admitted."""
    q = len(prompt_ids_qs)
    mesh = sharding.mesh_of(nnx.state(model))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    per_slot, slots, width = slot_shape(rows, num_samples, q, rows_per_prompt, prefill_width, shards)
    padded = max(slots, 1 << max(q - 1, 0).bit_length())
    ids = np.zeros((padded, prompt_ids_qs.shape[1]), np.int32)
    mask = np.zeros_like(ids)
    ids[:q], mask[:q] = prompt_ids_qs, prompt_mask_qs
    mask[q:, -1] = 1  # one visible token keeps the (discarded) prefill of a padding row finite
    graphdef = nnx.graphdef(model)
    return _compiled(graphdef, params, num_samples, per_slot, slots, width, mesh), ids, mask


def warm_up(model, prompt_ids_qs, prompt_mask_qs, params: SamplingParams, key, num_samples: int = 1, *, rows: int,
            rows_per_prompt: int | None = None, prefill_width: int | None = None, layers=None) -> None:  # fmt: skip
    """Compiles what `sample_continuous` with these arguments runs, without decoding a step."""
    (start, advance), ids, mask = _prepared(
        model, prompt_ids_qs, prompt_mask_qs, params, num_samples, rows, rows_per_prompt, prefill_width
    )
    state, count = nnx.state(model), jnp.asarray(len(prompt_ids_qs), jnp.int32)
    layers = decode_layers(model) if layers is None else layers
    s = start(state, ids, mask, count)
    jax.block_until_ready(advance(s, state, layers, ids, mask, count, key, s.step + 0))


def sample_lengths(tokens_wn: np.ndarray, eos_ids) -> np.ndarray:
    """Tokens of each sample up to and including its first EOS (all of them where there is none)."""
    is_eos = np.isin(tokens_wn, eos_ids or (-1,))
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, tokens_wn.shape[1])


def sample_continuous(
    model, prompt_ids_qs, prompt_mask_qs, params: SamplingParams, key, num_samples: int = 1, *, rows: int,
    rows_per_prompt: int | None = None, prefill_width: int | None = None, layers=None, progress: bool = False,
) -> Samples:  # fmt: skip
    """`num_samples` samples of each left-padded prompt, decoded in `rows` rows as `slot_shape` lays them out;
    draw `(q, j, step)` uses `sample_keys(key, q, j, step)`. `layers` is `decode_layers(model)`, made here
    when not given."""
    (start, advance), ids, mask = _prepared(
        model, prompt_ids_qs, prompt_mask_qs, params, num_samples, rows, rows_per_prompt, prefill_width
    )
    state, count = nnx.state(model), jnp.asarray(len(prompt_ids_qs), jnp.int32)
    layers = decode_layers(model) if layers is None else layers
    s = start(state, ids, mask, count)
    total = len(prompt_ids_qs) * num_samples
    with tqdm(total=total, unit="sample", desc="decoding", leave=False, disable=not progress) as bar:
        while int(s.finished) < total:
            s = advance(s, state, layers, ids, mask, count, key, s.step + params.max_new_tokens)
            bar.update(int(s.finished) - bar.n)
    tokens = np.asarray(s.tokens_wn[:total])
    row_shards = len(s.active_b) // s.active_b.addressable_shards[0].data.shape[0]
    return Samples(tokens, sample_lengths(tokens, params.eos_ids), int(s.step), row_shards)
