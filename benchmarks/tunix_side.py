"""The Tunix side of `vs_tunix.py`: run by it under the Tunix venv's python (google-tunix 0.1.7, never installed
into the project's venv), one process per part, so that its peak RSS is its own. It does not import aft_jax.

    ../tunix-venv/bin/python benchmarks/tunix_side.py --part {parity,sampling,dpo,groups} --work DIR

`DIR/work.json` (written by `vs_tunix.py`) holds the checkpoint folder and every input as token ids; the result
is one JSON object on stdout (everything Tunix or JAX print goes to stderr). Parity writes the logits to
`DIR/parity_tunix.npz` (and those of the unpatched model to `DIR/parity_tunix_unpatched.npz`).

What this side does about Tunix 0.1.7's traps (also listed in the result, `TRAPS`):
- no loader reads an HF config.json for Llama: the `ModelConfig` is built from it here (rope_theta is under
  `rope_parameters` in a transformers-5 config);
- `tunix.models.llama3.model.Attention` calls `apply_rope` without `rope_theta`, so `ModelConfig.rope_theta` is
  ignored and 1e6 is used (SmolLM2 needs 1e5; logits off by up to ~8): `apply_rope` is patched with the
  config's value;
- the sampler prepends the tokenizer's BOS (SmolLM2's HF tokenizer says `<|im_start|>`, which the project's
  prompts do not start with): the tokenizer is wrapped so that `bos_id()` is None, and the prompt ids the
  sampler builds are checked against the project's;
- the sampler treats every token equal to the pad id as padding (prompt mask, and every decode step masks
  such tokens in the cache); SmolLM2's pad token `<|im_end|>` is also its EOS: the wrapper's pad id is one
  that occurs in no prompt and is no EOS (`work.json`), and generated tokens equal to it are counted;
- the sampler's jitted decode captures `eos_ids` of its first call: one `Sampler` per EOS setting;
- the sampler samples only when `top_p` is given (temperature alone is greedy): top_p=1.0, top_k=None (the full
  vocabulary at temperature 1, as aft_jax's top_k=0, top_p=1);
- no samples per prompt: each prompt is repeated as rows (and prefilled once per row);
- `DPOTrainer`'s jitted train step compiles again on its second call: a step or call that compiled is left out
  of the times (listed in the result) and another timed in its place;
- DPO inputs are given tokenized (`TrainingInput`, prompts left-padded, responses right-padded, explicit masks),
  so no BOS is added and the pad id does not matter there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
from machine import (  # benchmarks/, beside this script
    COMPILED,
    count_compiles,
    median_sampling_run,
    peak_rss_mb,
    reset_peak,
    vm_hwm_mb,
)

TRAPS = {
    "config": "no HF config.json loader for Llama: ModelConfig built here from config.json "
    "(rope_theta under rope_parameters in transformers-5 configs)",
    "rope_theta": "Llama3 Attention calls apply_rope without rope_theta (default 1e6 used whatever the config "
    "says; SmolLM2 needs 1e5): tunix.models.llama3.model.apply_rope patched with the config's rope_theta",
    "bos": "Sampler.tokenize prepends tokenizer.bos_id() (SmolLM2's HF tokenizer: <|im_start|>): tokenizer "
    "wrapped with bos_id() None; the sampler's prompt ids checked equal to the project's",
    "pad": "Sampler masks every token equal to pad_id (SmolLM2's pad <|im_end|> is its EOS): pad id set to a "
    "token in no prompt and no EOS; generated tokens equal to it counted (generated_pad_tokens)",
    "eos_ids": "Sampler's jitted decode keeps the eos_ids of its first call: a new Sampler per EOS setting",
    "sampling_mode": "Sampler samples only when top_p is given (else greedy): top_p=1.0, top_k=None",
    "samples_per_prompt": "no samples per prompt: each prompt repeated as rows, each row prefilled",
    "dpo_reference": "DPOTrainer._prepare_inputs runs the reference model's forward on every step",
    "dpo_recompile": "DPOTrainer's jitted _train_step compiles again on its second call: steps that compiled are "
    "left out of the times (steps_that_compiled)",
    "dpo_inputs": "DPO inputs given tokenized (TrainingInput with explicit masks): no BOS added, pad id irrelevant",
}


def model_config(checkpoint: str, remat: str = "none"):
    from tunix.models.llama3 import model as llama

    hf = json.loads((Path(checkpoint) / "config.json").read_text())
    theta = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
    return llama.ModelConfig(
        num_layers=hf["num_hidden_layers"],
        vocab_size=hf["vocab_size"],
        embed_dim=hf["hidden_size"],
        hidden_dim=hf["intermediate_size"],
        num_heads=hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        num_kv_heads=hf["num_key_value_heads"],
        rope_theta=int(theta),
        norm_eps=float(hf["rms_norm_eps"]),
        weight_tying=bool(hf.get("tie_word_embeddings", False)),
        remat_config={"none": llama.RematConfig.NONE, "full": llama.RematConfig.DECODER}[remat],
    )


_ORIGINAL_ROPE = None


def patch_rope(rope_theta: float | None) -> None:
    """`apply_rope` with the config's `rope_theta` (None: Tunix's own, which ignores it)."""
    global _ORIGINAL_ROPE
    from tunix.models.llama3 import model as llama

    _ORIGINAL_ROPE = _ORIGINAL_ROPE or llama.apply_rope
    llama.apply_rope = (
        _ORIGINAL_ROPE if rope_theta is None else functools.partial(_ORIGINAL_ROPE, rope_theta=rope_theta)
    )


def load_model(checkpoint: str, remat: str = "none"):
    import jax.numpy as jnp
    from tunix.models.llama3 import params

    config = model_config(checkpoint, remat)
    patch_rope(config.rope_theta)
    return params.create_model_from_safe_tensors(checkpoint, config, mesh=None, dtype=jnp.float32), config


class ProjectTokenizer:
    """The checkpoint's HF tokenizer as the Tunix sampler reads it, with no BOS and a pad id of our choosing."""

    def __init__(self, checkpoint: str, pad_id: int, eos_id: int):
        from transformers import AutoTokenizer

        self.hf, self.pad, self.eos = AutoTokenizer.from_pretrained(checkpoint), pad_id, eos_id

    def encode(self, text: str, **kwargs) -> list[int]:
        return self.hf(text)["input_ids"]  # as the project tokenises prompts

    def decode(self, ids, **kwargs) -> str:
        return self.hf.decode(ids, **kwargs)

    def bos_id(self):
        return None

    def eos_id(self) -> int:
        return self.eos

    def pad_id(self) -> int:
        return self.pad


def parity(work: dict, out: Path) -> dict:
    import jax.numpy as jnp
    from flax import nnx
    from tunix.rl import common

    model, config = load_model(work["checkpoint"])

    def logits_of(ids):
        t = len(ids)

        @nnx.jit
        def forward(model, tokens):  # traced anew per call: the patched or unpatched rope
            mask = common.make_causal_attn_mask(jnp.ones((1, t), bool))
            return model(tokens, jnp.arange(t, dtype=jnp.int32)[None], None, mask)[0]

        return np.asarray(forward(model, jnp.asarray([ids], jnp.int32)))[0]

    sequences = work["parity"]["sequences"]
    np.savez(out / "parity_tunix.npz", *[logits_of(ids) for ids in sequences])
    patch_rope(None)
    np.savez(out / "parity_tunix_unpatched.npz", *[logits_of(ids) for ids in sequences])
    return {"rope_theta": config.rope_theta, "peak_rss_mb": peak_rss_mb()}


def sampling(work: dict, repeats: int) -> dict:
    from tunix.generate import sampler as sampler_lib

    s = work["sampling"]
    model, config = load_model(work["checkpoint"])
    tokenizer = ProjectTokenizer(work["checkpoint"], s["pad_id"], s["eos_ids"][0])
    k, n, length = s["samples"], s["new_tokens"], s["prompt_length"]
    rows = [p for p in s["prompts"] for _ in range(k)]  # no samples per prompt: k rows per prompt
    cache = sampler_lib.CacheConfig(length + n, config.num_layers, config.num_kv_heads, config.head_dim)
    result = {"rows": len(rows), "cache_size": length + n, "max_prompt_length": length}
    variants = (("fixed_length", [-1], n), ("stop_at_eos", s["eos_ids"], n), ("first_token_only", [-1], 1))
    for variant, eos, new_tokens in variants:  # eos -1: never generated; first_token_only: the prefill's cost
        sampler = sampler_lib.Sampler(model, tokenizer, cache)  # a new one per EOS setting: jit keeps the first's
        if variant == "fixed_length":
            ids = [sampler.tokenize(p).tolist() for p in s["prompts"]]
            result["prompt_ids_identical"] = ids == s["prompt_ids"]
        pad_count = []

        def run(sampler=sampler, eos=eos, n=new_tokens, pad_count=pad_count):
            out = sampler(
                rows, max_generation_steps=n, max_prompt_length=length, temperature=s["temperature"], top_p=1.0,
                top_k=None, eos_tokens=eos, seed=0,
            )  # fmt: skip
            # `out.tokens` stop before the first EOS: a row shorter than n ended with one (counted, as aft_jax does)
            lengths = np.array([min(len(t) + 1, n) if len(t) < n else n for t in out.tokens])
            pad_count.append(int(sum(np.sum(np.asarray(t) == s["pad_id"]) for t in out.tokens)))
            return lengths, lengths.max()

        result[variant] = median_sampling_run(run, repeats)
        result[variant]["generated_pad_tokens"] = pad_count[-1]
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def pair_input(pairs: list[dict], prompt_length: int, response_length: int, pad_id: int):
    """Tunix's `TrainingInput`: prompts left-padded, chosen and rejected right-padded, explicit masks."""
    from tunix.sft.dpo import dpo_trainer

    p = len(pairs)
    arrays = {name: np.full((p, prompt_length if name == "prompt" else response_length), pad_id, np.int32)
              for name in ("prompt", "chosen", "rejected")}  # fmt: skip
    masks = {name: np.zeros_like(a) for name, a in arrays.items()}
    for i, pair in enumerate(pairs):
        prompt = pair["prompt"]
        arrays["prompt"][i, prompt_length - len(prompt) :] = prompt
        masks["prompt"][i, prompt_length - len(prompt) :] = 1
        for name in ("chosen", "rejected"):
            arrays[name][i, : len(pair[name])] = pair[name]
            masks[name][i, : len(pair[name])] = 1
    return dpo_trainer.TrainingInput(
        prompt_ids=arrays["prompt"], prompt_mask=masks["prompt"], chosen_ids=arrays["chosen"],
        chosen_mask=masks["chosen"], rejected_ids=arrays["rejected"], rejected_mask=masks["rejected"],
    )  # fmt: skip


def optimizer(o: dict):
    """aft_jax's `build_optimizer` with no warmup: clip by global norm, then AdamW on a cosine decay."""
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=o["lr"], peak_value=o["lr"], warmup_steps=0, decay_steps=o["total_steps"],
        end_value=o["lr"] * o["min_lr_ratio"],
    )  # fmt: skip
    return optax.chain(
        optax.clip_by_global_norm(o["clip_norm"]),
        optax.adamw(schedule, b1=o["b1"], b2=o["b2"], eps=o["eps"], weight_decay=o["weight_decay"]),
    )


def train(work: dict, part: str, repeats: int, micro_pairs: int, remat: str) -> dict:
    """DPO steps with Tunix's `DPOTrainer`, its train loop's body timed in two pieces: `_prepare_inputs` (the
    masks, positions and the reference model's forward) and the jitted train step (forward, backward, update).
    Part "groups": each question's K - 1 pairs, `micro_pairs` pairs per micro-batch, the micro-batches'
    gradients averaged by Tunix's `gradient_accumulation_steps` into one update per step."""
    import jax
    from flax import nnx
    from tunix.sft import sharding_utils
    from tunix.sft.dpo import dpo_trainer

    w = work[part]
    pairs = w["pairs"]
    pairs_per_micro = micro_pairs if part == "groups" and micro_pairs else len(pairs)
    micros = [pairs[i : i + pairs_per_micro] for i in range(0, len(pairs), pairs_per_micro)]
    prompt_length = max(len(p["prompt"]) for p in pairs)
    response_length = max(max(len(p["chosen"]), len(p["rejected"])) for p in pairs)
    inputs = [pair_input(m, prompt_length, response_length, work["pad_id"]) for m in micros]

    policy, _ = load_model(work["checkpoint"], remat)
    reference = nnx.clone(policy)
    accumulate = len(micros) if len(micros) > 1 else None
    config = dpo_trainer.DPOTrainingConfig(
        eval_every_n_steps=10**9, max_steps=None, gradient_accumulation_steps=accumulate, beta=w["beta"],
        algorithm="dpo", label_smoothing=0.0,
    )  # fmt: skip
    trainer = dpo_trainer.DPOTrainer(policy, reference, optimizer(work["optim"]), config)
    train_step, _ = trainer.jit_train_and_eval_step(cache_nnx_graph=True)  # as `trainer.train` does

    def step() -> tuple[float, float, float]:
        """One optimizer step (one call per micro-batch): (prepare seconds, train step seconds, mean loss)."""
        prepare_s = update_s = 0.0
        step_losses = []
        for micro in inputs:
            began = time.perf_counter()
            example = trainer._prepare_inputs(micro)  # the train loop's own calls, without its logging
            jax.block_until_ready((example.ref_chosen_logps, example.ref_rejected_logps))
            prepared = time.perf_counter()
            example = sharding_utils.shard_input(example, trainer.config.data_sharding_axis)
            loss, _, _ = train_step(example)
            step_losses.append(float(loss))
            done = time.perf_counter()
            prepare_s += prepared - began
            update_s += done - prepared
        return prepare_s, update_s, float(np.mean(step_losses))

    whole, prepare, update, losses, compiled, count, timed_peak = [], [], [], [], [], 0, 0.0
    losses.append(step()[2])  # the first step compiles
    while len(whole) < repeats or (part == "dpo" and len(losses) < 4):  # DPO: the first 4 losses compared
        count += 1
        reset = reset_peak()  # each step's own peak
        before = len(COMPILED)
        prepare_s, update_s, loss = step()
        losses.append(loss)
        if len(COMPILED) > before:  # left out of the times
            compiled.append({"step": count, "compiled": COMPILED[before:], "s": (prepare_s, update_s)})
        elif len(whole) < repeats:
            whole.append(prepare_s + update_s)
            prepare.append(prepare_s)
            update.append(update_s)
            timed_peak = max(timed_peak, vm_hwm_mb()) if reset else None
        if count >= repeats + 4:
            break
    if not whole:  # every step compiled: time them anyway (listed in steps_that_compiled)
        prepare, update = [c["s"][0] for c in compiled], [c["s"][1] for c in compiled]
        whole = [a + b for a, b in zip(prepare, update)]
    return {
        "step_s": float(np.median(whole)),
        "train_step_s": float(np.median(update)),
        "reference_and_inputs_s": float(np.median(prepare)),
        "step_s_each": whole,
        "losses": losses,
        "steps_that_compiled": compiled,
        "micro_batches": len(micros),
        "pairs_per_micro_batch": pairs_per_micro,
        "sequences_per_micro_batch": 2 * pairs_per_micro,
        "prompt_length": prompt_length,
        "response_length": response_length,
        "tokens_per_step": 2 * len(pairs) * (prompt_length + response_length),
        "peak_rss_mb": peak_rss_mb(),
        "timed_steps_peak_rss_mb": timed_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", required=True, choices=["parity", "sampling", "dpo", "groups"])
    parser.add_argument("--work", required=True, type=Path, help="the folder of work.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-pairs", type=int, default=2, help="groups: pairs per micro-batch (0: all)")
    parser.add_argument("--remat", default="full", choices=["none", "full"], help="full: RematConfig.DECODER")
    args = parser.parse_args()
    work = json.loads((args.work / "work.json").read_text())
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the result alone
        import jax
        import tunix

        count_compiles()
        if args.part == "parity":
            result = parity(work, args.work)
        elif args.part == "sampling":
            result = sampling(work, args.repeats)
        else:
            result = train(work, args.part, args.repeats, args.micro_pairs, args.remat)
        from importlib.metadata import version

        result["versions"] = {"google-tunix": version("google-tunix"), "jax": jax.__version__}
        result["device"] = str(jax.devices()[0])
        result["traps"] = TRAPS
        del tunix
    print(json.dumps(result))


if __name__ == "__main__":
    main()
