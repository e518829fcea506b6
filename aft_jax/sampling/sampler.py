"""Sampling: the `Sampler` interface the stages call, and `JaxSampler`, this package's, with the KV cache.

`Sampler` is what step 2 and evaluation need of a sampler: prompts (text) and settings in, completions
(text) out, seeded. Anything with that method is one: `JaxSampler`, or a sampler that calls a vLLM server
or another process. `JaxSampler.sample` runs the continuous loop (`aft_jax.sampling.continuous`: a row that
stops starts the next sample at once); `JaxSampler.sample_ids` (prompt ids and mask in, tokens and lengths
out) runs one static batch (`aft_jax.sampling.static`); `generate` is the one-call form of
`JaxSampler.sample`. Each draw's key is that of its (question, sample, step) (`aft_jax.sampling.next_token`),
so samples do not depend on the batch size. The decode step shared by both loops is
`aft_jax.sampling.decode`.
"""

from __future__ import annotations

from typing import Protocol

import jax
import numpy as np

from aft_jax.parallel.sharding import is_main_process
from aft_jax.sampling.continuous import sample_continuous
from aft_jax.sampling.next_token import SamplingParams
from aft_jax.sampling.static import sample_token_ids


class Sampler(Protocol):
    """Completions of prompts: what the stages (`aft_jax.stages.sample`, `aft_jax.stages.evaluate`) call."""

    def sample(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """`num_samples` completions per prompt (the text after the prompt, without the EOS), greedy at
        temperature 0; the same `seed` gives the same completions whatever the batching."""
        ...


class JaxSampler:
    """The `Sampler` of `model` (an `aft_jax.CausalLM`) and its tokenizer, made once per model. Stops at the
    model's and the tokenizer's EOS ids and pads with the tokenizer's pad id (else the first EOS id). `sample`
    decodes in `batch_size` rows, in prompt slots of `rows_per_prompt` rows (0: as `continuous.slot_shape`
    chooses) that read one prompt copy and start its next sample as each row stops
    (`aft_jax.sampling.continuous`); prompts are left-padded to a multiple of `pad_multiple` and prefilled
    once. Each call copies the decoder weights once (`decode_layers`), so the model may change between
    calls; `progress` shows a bar of samples done (on process 0)."""

    def __init__(
        self, model, tokenizer, *, batch_size: int = 32, rows_per_prompt: int = 0, pad_multiple: int = 64,
        progress: bool = True,
    ):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.rows_per_prompt = batch_size, rows_per_prompt
        self.pad_multiple, self.progress = pad_multiple, progress

    def params(self, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
        """The `SamplingParams` of these settings with this sampler's EOS and pad ids."""
        return sampling_params(self.model, self.tokenizer, max_new_tokens, temperature, top_k, top_p)

    def sample(
        self,
        prompts: list[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ) -> list[list[str]]:
        """`num_samples` completions per prompt (text after the prompt, without the EOS); sample j of prompt q
        is drawn with the keys of `(q, j)` under `jax.random.key(seed)`. Prompts are tokenised as the
        tokenizer does by default (BOS included where it adds one)."""
        if not prompts:
            return []
        params = self.params(max_new_tokens, temperature, top_k, top_p)
        encoded = [self.tokenizer(p)["input_ids"] for p in prompts]
        ids, mask = left_pad(encoded, len(encoded), params.pad_id, self.pad_multiple)
        progress = self.progress and is_main_process()
        key, k = jax.random.key(seed), num_samples
        out = sample_continuous(
            self.model, ids, mask, params, key, k, rows=self.batch_size, rows_per_prompt=self.rows_per_prompt or None,
            progress=progress,
        )  # fmt: skip
        texts = [decode_completion(self.tokenizer, t, n, params.eos_ids) for t, n in zip(out.tokens, out.lengths)]
        return [texts[q * k : (q + 1) * k] for q in range(len(prompts))]

    def sample_ids(
        self,
        prompt_ids_qt,
        prompt_mask_qt,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_samples: int = 1,
        seed: int = 0,
    ):
        """`sample_token_ids` on left-padded prompts as one batch, with this sampler's EOS and pad ids and the
        key `jax.random.key(seed)`: NumPy `(tokens [Q * num_samples, N], lengths [Q * num_samples])`."""
        params = self.params(max_new_tokens, temperature, top_k, top_p)
        return sample_token_ids(self.model, prompt_ids_qt, prompt_mask_qt, params, jax.random.key(seed), num_samples)


def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 0,
    batch_size: int = 32,
    pad_multiple: int = 64,
) -> list[list[str]]:
    """`num_samples` completions per prompt, seeded: `JaxSampler(model, tokenizer, ...).sample(prompts, ...)`."""
    sampler = JaxSampler(model, tokenizer, batch_size=batch_size, pad_multiple=pad_multiple)
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    return sampler.sample(prompts, num_samples=num_samples, seed=seed, **settings)


def sampling_params(model, tokenizer, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0) -> SamplingParams:
    eos_ids = tuple(sorted(set(model.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    return SamplingParams(int(max_new_tokens), float(temperature), int(top_k), float(top_p), eos_ids, int(pad_id))


def left_pad(sequences: list[list[int]], rows: int, pad_id: int, multiple: int = 1):
    """`(ids [rows, T], mask [rows, T])`, each sequence right-aligned; missing rows are a single pad token
    (masked out), so the batch shape, and the compiled program, stay fixed."""
    longest = max(len(s) for s in sequences)
    t = -(-longest // multiple) * multiple
    ids = np.full((rows, t), pad_id, np.int32)
    mask = np.zeros((rows, t), np.int32)
    for r, seq in enumerate(sequences):
        ids[r, t - len(seq) :] = seq
        mask[r, t - len(seq) :] = 1
    mask[len(sequences) :, -1] = 1  # a filler row still needs one visible token
    return ids, mask


def decode_completion(tokenizer, tokens_n, length: int, eos_ids) -> str:
    kept = [int(t) for t in tokens_n[:length] if int(t) not in eos_ids]
    return tokenizer.decode(kept, skip_special_tokens=True)
