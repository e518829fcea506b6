"""aft_jax as a model of lm-eval (EleutherAI's lm-evaluation-harness 0.4), named `aft_jax`.

lm-eval 0.4.13 resolves `--model NAME` in its own registry and scans no entry points, so the plain
`lm_eval` command cannot find a model defined outside it. This module's command (also `aft-jax lm-eval`)
registers `aft_jax` and hands every argument to lm-eval's command line unchanged:

    aft-jax lm-eval --model aft_jax --model_args path=runs/demo/vft/model,mesh=fsdp \\
        --tasks gsm8k --batch_size 32

In Python: `register()`, then `lm_eval.simple_evaluate(model="aft_jax", model_args={...}, ...)` (or pass an
`AftJaxLM` as the model).

`path` is any model a stage writes or reads: an aft_jax model folder (`<run_dir>/<run>/model`), a Hugging
Face folder or hub name, `smollm2`, or a PEFT LoRA adapter folder (a LoRA run's `model`), loaded onto its
base (`base`, default the adapter's `base_model_name_or_path`) and merged, as the pipeline evaluates it.
The other model args are in `AftJaxLM`.

What it computes is what lm-eval's transformers backend (`--model hf`) computes, from the same token ids:

- `generate_until`: the prompt encoded as that backend does (the tokenizer's default special tokens, none
  when the prompt already starts with the BOS text; left-truncated to `max_length - max_gen_toks`
  tokens), up to `max_gen_toks` new tokens from `JaxSampler`'s continuous loop (`batch_size` rows; greedy
  unless the request's `do_sample` or `temperature` > 0 asks for sampling, then with its `temperature`,
  `top_k`, `top_p` and this model's `seed`; top-k and top-p are off unless the request sets them, where the
  transformers backend's `generate` takes the model's generation config, top_k 50 by default), decoded
  without special tokens and cut at the first of the request's `until` strings and the EOS text
  (`postprocess_generated_text`). Unlike the transformers
  backend, a row stops only at an EOS id (the model's and the tokenizer's), not at a stop string: the text
  is the same, the tokens after the stop string are generated and dropped.
- `loglikelihood`: lm-eval's `TemplateLM` pairing (context and continuation encoded together and split
  after the context's own tokens, the context's trailing spaces moved to the continuation; an empty
  context is the BOS, else EOS, token), left-truncated to `max_length + 1` tokens; the summed float32
  log-probabilities of the continuation tokens and whether each is the argmax.
- `loglikelihood_rolling`: lm-eval's rolling windows of `max_length` tokens after the prefix token, scored
  as above and summed.
"""

from __future__ import annotations

import functools
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from aft_jax.parallel import sharding
from aft_jax.sampling.continuous import sample_continuous
from aft_jax.sampling.sampler import JaxSampler, decode_completion, left_pad

log = logging.getLogger(__name__)

MODEL_NAME = "aft_jax"
TARGET = "aft_jax.evals.lm_eval:AftJaxLM"
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


def register() -> None:
    """Registers `aft_jax` in lm-eval's model registry, as the `module:class` target lm-eval imports when the
    name is first used."""
    import lm_eval.models  # noqa: F401  lm-eval's own models first: its registry loads them only when empty
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line (`lm_eval ...`) with `aft_jax` registered; `argv` default `sys.argv[1:]`."""
    register()
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


def parse_mesh(spec) -> tuple[int, int, int] | str:
    """A mesh preset name (`single`, `fsdp`, `data`, `tensor`, ...) or `DATAxFSDPxTENSOR` sizes (`1x-1x1`):
    lm-eval splits `--model_args` at commas, so sizes are joined with `x` here."""
    spec = str(spec)
    if "x" in spec:
        try:
            return tuple(int(s) for s in spec.split("x"))
        except ValueError:
            raise ValueError(
                f"mesh={spec!r}: expected a preset name or DATAxFSDPxTENSOR sizes such as 1x-1x1"
            ) from None
    return spec


def load_model(
    path: str, mesh, *, base: str = "", tokenizer: str = "", dtype: str = "float32", compute_dtype: str = ""
):
    """`(model, tokenizer)` of `path` on `mesh`: an aft_jax or HF model folder (or hub name, or `smollm2`), or a
    PEFT LoRA adapter folder on `base` (default: its `base_model_name_or_path`), merged. `tokenizer` (a
    folder or hub name) replaces the model's own; an adapter folder without one uses its base's."""
    from aft_jax.build import load_tokenizer, model_from_config, resolve_model_path
    from aft_jax.config.spec import ModelSection
    from aft_jax.io.hf import TOKENIZER_FILES, from_pretrained
    from aft_jax.io.paths import Path
    from aft_jax.io.peft import is_adapter_dir, read_adapter_config
    from aft_jax.model.adapters import merge_adapters

    compute_dtype = compute_dtype or dtype
    if is_adapter_dir(path):
        if not base and not read_adapter_config(path)[1]:
            raise ValueError(f"path={path!r} is an adapter whose adapter_config.json names no base: pass base=...")
        section = ModelSection(path=base or path, param_dtype=dtype, compute_dtype=compute_dtype)
        model = model_from_config(section, mesh, path=path)
        if model.config.lora is not None and model.config.lora.quantize == "none":
            model = merge_adapters(model)
        if not tokenizer:
            own = any((Path(path) / f).exists() for f in TOKENIZER_FILES)
            tokenizer = path if own else (base or read_adapter_config(path)[1])
        return model, load_tokenizer(tokenizer, "tokenizer")
    model, own_tokenizer = from_pretrained(
        resolve_model_path(path), dtype=dtype, compute_dtype=compute_dtype, mesh=mesh
    )
    if tokenizer:
        return model, load_tokenizer(tokenizer, "tokenizer")
    if own_tokenizer is None:
        raise ValueError(f"path={path!r} has no tokenizer files: name one with the model arg tokenizer=...")
    return model, own_tokenizer


@functools.lru_cache(maxsize=8)
def _continuation_scorer(graphdef):
    """`(state, ids [B, T], mask [B, T], positions [B, C], targets [B, C], valid [B, C], chunk)` ->
    `(summed log-prob [B], all greedy [B])` of `targets`, each predicted from the hidden state at its
    position; the vocabulary projected `chunk` targets at a time. Jitted once per model architecture."""

    def score(state, ids_bt, mask_bt, pos_bc, targets_bc, valid_bc, chunk):
        model = nnx.merge(graphdef, state)
        hidden_btd = model.hidden_states(ids_bt, mask_bt)
        hidden_bcd = jnp.take_along_axis(hidden_btd, pos_bc[:, :, None], axis=1)
        b, c = pos_bc.shape
        hidden_nbkd = hidden_bcd.reshape(b, c // chunk, chunk, -1).swapaxes(0, 1)
        targets_nbk = targets_bc.reshape(b, c // chunk, chunk).swapaxes(0, 1)

        def one_chunk(args):
            hidden_bkd, targets_bk = args
            logits_bkv = model.logits(hidden_bkd)
            picked = jnp.take_along_axis(logits_bkv, targets_bk[..., None], axis=-1)[..., 0]
            return picked - jax.nn.logsumexp(logits_bkv, axis=-1), jnp.argmax(logits_bkv, axis=-1) == targets_bk

        logp_nbk, greedy_nbk = jax.lax.map(one_chunk, (hidden_nbkd, targets_nbk))
        logp_bc, greedy_bc = logp_nbk.swapaxes(0, 1).reshape(b, c), greedy_nbk.swapaxes(0, 1).reshape(b, c)
        valid_bc = valid_bc.astype(bool)
        return jnp.sum(jnp.where(valid_bc, logp_bc, 0.0), axis=-1), jnp.all(greedy_bc | ~valid_bc, axis=-1)

    return jax.jit(score, static_argnames="chunk")


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class AftJaxLM(TemplateLM):
    """An aft_jax model (`load_model(path, ...)`) as an lm-eval model. Model args:

    - `path` (or `pretrained`, the transformers backend's name): the model (see the module's docstring);
      `base`: an adapter's base model; `tokenizer`: a tokenizer folder or hub name instead of the model's own.
    - `mesh`: the devices' (data, fsdp, tensor) mesh over this process's devices, a preset (`fsdp`, the
      default, `single`, `data`, `tensor`, ...) or sizes `DATAxFSDPxTENSOR` such as `2x-1x1`.
    - `dtype`: the parameters' dtype (`float32`, `bfloat16`); `compute_dtype`: activations' (default `dtype`).
    - `batch_size` (also lm-eval's `--batch_size`; `auto` means 32): sampler rows, and sequences per scoring
      call. `max_length` (default the model's `max_position_embeddings`), `max_gen_toks` (default 256, what
      a request's gen_kwargs do not set), `seed` (sampled generations), `add_bos_token` (as the
      transformers backend's: None leaves the tokenizer's default), `pad_multiple` (prompts and scored
      rows are padded to a multiple of it, so few shapes are compiled).

    lm-eval's `device` and `max_batch_size` are accepted and unused (JAX places the model on `mesh`). One
    process only: lm-eval's data parallelism over processes is not wired up.
    """

    def __init__(
        self,
        path: str = "",
        pretrained: str = "",
        base: str = "",
        tokenizer: str = "",
        mesh: str = "fsdp",
        dtype: str = "float32",
        compute_dtype: str = "",
        batch_size: int | str = 32,
        max_length: int = 0,
        max_gen_toks: int = 256,
        seed: int = 0,
        add_bos_token: bool | None = None,
        pad_multiple: int = 64,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        super().__init__()
        path, base, tokenizer = str(path or pretrained or ""), str(base or ""), str(tokenizer or "")
        if not path:
            raise ValueError("the aft_jax model needs --model_args path=<model folder, HF folder or adapter folder>")
        if jax.process_count() > 1:
            raise ValueError("the aft_jax lm-eval model runs in one process; run lm-eval on one host")
        if isinstance(batch_size, str):
            batch_size = 32 if batch_size.startswith("auto") else int(batch_size)
        self.path, self.mesh_spec, self.dtype = str(path), parse_mesh(mesh), dtype
        self.mesh = sharding.make_mesh(self.mesh_spec, jax.local_devices(), name="mesh")
        self.model, self.tokenizer = load_model(
            str(path), self.mesh, base=base, tokenizer=tokenizer, dtype=dtype, compute_dtype=compute_dtype
        )
        self.sampler = JaxSampler(self.model, self.tokenizer, batch_size=int(batch_size), pad_multiple=pad_multiple)
        self.batch_size_per_call = int(batch_size)
        self._max_length, self._max_gen_toks = int(max_length), int(max_gen_toks)
        self.seed, self.add_bos_token, self.pad_multiple = int(seed), add_bos_token, int(pad_multiple)

    # what lm-eval asks of a model -------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model_path": self.path, "model_dtype": self.dtype, "mesh": str(self.mesh_spec)}

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
        """The transformers backend's `tok_encode`: `add_special_tokens`, else `add_bos_token`, else the
        tokenizer's default, except none for a string that already starts with the prefix token's text."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            if string.startswith(self.tokenizer.decode(self.prefix_token_id)):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **special)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # log-likelihoods ---------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """`(summed log-prob, greedy)` of each `(key, context ids, continuation ids)`, the context and
        continuation cut to their last `max_length + 1` tokens as the transformers backend does; scored in
        batches of `batch_size` sequences, longest first."""
        graphdef, state = nnx.split(self.model)
        score = functools.partial(_continuation_scorer(graphdef), state)
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = self.batch_size_per_call
        bar = tqdm(total=len(requests), desc="aft_jax loglikelihood", disable=disable_tqdm or self.rank != 0)
        for start in range(0, len(order), rows):
            chunk = order[start : start + rows]
            seqs = []
            for i in chunk:
                _, context, continuation = requests[i]
                if not context or not continuation or len(continuation) > self.max_length:
                    raise ValueError(
                        f"request {i}: {len(context)} context and {len(continuation)} continuation tokens; "
                        f"need at least one of each and at most {self.max_length} continuation tokens"
                    )
                seqs.append(((list(context) + list(continuation))[-(self.max_length + 1) :], len(continuation)))
            t = _round_up(max(len(s) - 1 for s, _ in seqs), self.pad_multiple)
            longest = max(n for _, n in seqs)
            k = min(128, _round_up(longest, 16))
            c = _round_up(longest, k)
            ids, mask = np.zeros((rows, t), np.int32), np.zeros((rows, t), np.int32)
            pos, targets, valid = (np.zeros((rows, c), np.int32) for _ in range(3))
            mask[len(seqs) :, 0] = 1  # filler rows: one visible token
            for r, (seq, n) in enumerate(seqs):
                inp = seq[:-1]
                ids[r, : len(inp)], mask[r, : len(inp)] = inp, 1
                pos[r, :n] = np.arange(len(seq) - n - 1, len(seq) - 1)
                targets[r, :n], valid[r, :n] = seq[-n:], 1
            sums, greedy = score(ids, mask, pos, targets, valid, chunk=k)
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            for r, i in enumerate(chunk):
                results[i] = (float(sums[r]), bool(greedy[r]))
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            bar.update(len(chunk))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's summed log-prob after the prefix token, in lm-eval's disjoint rolling windows of
        `max_length` tokens."""
        windows, counts = [], []
        for request in requests:
            (string,) = request.args
            parts = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            these = [(None, *make_disjoint_window(w)) for w in parts]
            windows += these
            counts.append(len(these))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals, at = [], 0
        for request, n in zip(requests, counts):
            totals.append(sum(s for s, _ in scores[at : at + n]))
            at += n
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    # generation --------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's completion (see the module's docstring), the requests with the same sampling
        settings decoded together in `JaxSampler`'s continuous loop."""
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        groups: dict[tuple, list[int]] = {}
        stops, ignored = [], set()
        for i, request in enumerate(requests):
            _, gen_kwargs = request.args
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            stops.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos_text))
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            ignored |= set(kwargs) - set(SAMPLING_KWARGS)
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            top_k, top_p = int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0)
            key = (max_gen_toks, temperature, top_k if temperature else 0, top_p if temperature else 1.0)
            groups.setdefault(key, []).append(i)
        if ignored:
            log.warning("aft_jax: generation kwargs %s are not used (only %s are)", sorted(ignored), SAMPLING_KWARGS)
        out: list[str | None] = [None] * len(requests)
        for (max_gen_toks, temperature, top_k, top_p), members in groups.items():
            if max_gen_toks >= self.max_length:
                raise ValueError(f"max_gen_toks={max_gen_toks} must be below max_length={self.max_length}")
            prompts = [
                self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen_toks) for i in members
            ]
            texts = self._sample(prompts, max_gen_toks, temperature, top_k, top_p, progress=not disable_tqdm)
            for i, text in zip(members, texts):
                out[i] = postprocess_generated_text(text, stops[i], None)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def _sample(self, prompts: list[list[int]], max_new_tokens: int, temperature, top_k, top_p, progress) -> list[str]:
        """`JaxSampler.sample` given token ids: one completion per prompt, without the EOS and special tokens."""
        s = self.sampler
        params = s.params(max_new_tokens, temperature, top_k, top_p)
        ids, mask = left_pad(prompts, len(prompts), params.pad_id, s.pad_multiple)
        samples = sample_continuous(
            s.model, ids, mask, params, jax.random.key(self.seed), 1, rows=s.batch_size,
            rows_per_prompt=s.rows_per_prompt or None, progress=progress and self.rank == 0,
        )  # fmt: skip
        return [
            decode_completion(self.tokenizer, t, n, params.eos_ids) for t, n in zip(samples.tokens, samples.lengths)
        ]


if __name__ == "__main__":
    main()
