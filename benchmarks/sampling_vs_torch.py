"""Sampling k candidates per GSM8K question with SmolLM2-135M: aft_jax's static loop (`aft_jax.sampling.static`,
one batch at a time) against `transformers` `generate` (torch), same questions, same batch size, same
settings, in one run. `continuous_sampling.py` compares the continuous loop with both.

    .venv/bin/python benchmarks/sampling_vs_torch.py [--questions 12] [--per-batch 4] [--k 6] [--max-new-tokens 128]

Reports generated tokens/s (EOS included, padding after it excluded) for both and their ratio, and the
time per decode step (a batch runs as many steps as its longest sample; prefill included), a ratio that
does not depend on where each side's random samples happen to stop. Writes
benchmarks/results/sampling_<rows>_rows_<max_new_tokens>_tokens.json. Both decode `per_batch x k` rows
together, batch after batch, the two sides taking turns so that both run on the machine in the same state;
how many tokens a batch yields depends on where its samples stop, so several batches are run to even that
out. Each side pads a batch's prompts to a common length, transformers to the longest, aft_jax (as
`JaxSampler` does) to the next multiple of 64; aft_jax is timed after one warm-up batch per padded
length, which compiles its program. aft_jax prefills each question once and its k samples read that one
prompt cache, while transformers prefills and caches every row.

The result file also holds the machine (`machine.py`: CPU and its vector extensions, versions, measured
float32 matrix-product peak of JAX and of torch) and each side's model FLOP/s as a fraction of its own
library's peak: the same useful work for both, 2 N FLOPs (N = `aft_jax.stages.train.matmul_params`) per prompt
token of each question once and per row and decode step (attention left out).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def count_generated(generated: np.ndarray, eos_ids) -> int:
    """Tokens per row up to and including the first EOS (all of them when there is none), summed."""
    is_eos = np.isin(generated, eos_ids)
    return int(np.where(is_eos.any(1), is_eos.argmax(1) + 1, generated.shape[1]).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=12)
    parser.add_argument("--per-batch", type=int, default=4, help="questions decoded together")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    import jax
    import machine
    import torch
    from transformers import AutoModelForCausalLM

    import aft_jax
    from aft_jax.data.tasks import get_task
    from aft_jax.io.smollm2 import smollm2_checkpoint
    from aft_jax.sampling.decode import decode_layers
    from aft_jax.sampling.sampler import left_pad, sampling_params
    from aft_jax.sampling.static import sample_token_ids
    from aft_jax.stages.train import matmul_params

    checkpoint = smollm2_checkpoint()
    examples = get_task("gsm8k").load("test", limit=args.questions)
    model, tokenizer = aft_jax.from_pretrained(checkpoint)
    prompts = [get_task("gsm8k").prompt(e, "alpaca") for e in examples]
    batch = args.per_batch * args.k  # rows decoded together, the same on both sides
    batches = [prompts[i : i + args.per_batch] for i in range(0, len(prompts), args.per_batch)]

    params = sampling_params(model, tokenizer, args.max_new_tokens, args.temperature)
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    padded = [  # as `aft_jax.generate` pads
        left_pad(encoded[i : i + args.per_batch], args.per_batch, params.pad_id, 64)
        for i in range(0, len(prompts), args.per_batch)
    ]
    for ids, mask in {ids.shape: (ids, mask) for ids, mask in padded}.values():  # compile each prompt length
        sample_token_ids(model, ids, mask, params, jax.random.key(0), num_samples=args.k)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokenizer.padding_side = "left"
    torch.manual_seed(0)

    prompt_tokens = sum(len(ids) for ids in encoded)
    jax_tokens, jax_steps, torch_tokens, torch_steps = 0, 0, 0, 0
    began = time.perf_counter()
    layers = decode_layers(model)  # once for all batches, as the static loop's callers do
    jax_seconds, torch_seconds = time.perf_counter() - began, 0.0
    for i, ((ids, mask), chunk) in enumerate(zip(padded, batches)):  # batch by batch, so both see the same machine
        began = time.perf_counter()
        _, lengths = sample_token_ids(model, ids, mask, params, jax.random.key(1 + i), args.k, layers)
        jax_seconds += time.perf_counter() - began
        jax_steps += int(lengths.max())  # the loop runs until every row, filler rows included, has stopped
        jax_tokens += int(lengths[: len(chunk) * args.k].sum())  # not the filler rows of a short last batch

        encoded_rows = tokenizer([p for p in chunk for _ in range(args.k)], return_tensors="pt", padding=True)
        with torch.no_grad():
            began = time.perf_counter()
            out = hf_model.generate(
                **encoded_rows,
                max_new_tokens=args.max_new_tokens,
                do_sample=args.temperature > 0,
                temperature=args.temperature,
                top_k=0,
                top_p=1.0,
                pad_token_id=params.pad_id,
                eos_token_id=list(params.eos_ids),
            )
            torch_seconds += time.perf_counter() - began
        generated = out[:, encoded_rows["input_ids"].shape[1] :].numpy()
        torch_tokens += count_generated(generated, params.eos_ids)
        torch_steps += generated.shape[1]

    where = machine.record()
    useful_flops = 2 * matmul_params(model.config) * (prompt_tokens + batch * jax_steps)
    torch_flops = 2 * matmul_params(model.config) * (prompt_tokens + batch * torch_steps)
    result = {
        "machine": where,
        "batch_rows": batch,
        "questions": len(prompts),
        "questions_per_batch": args.per_batch,
        "k": args.k,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "aft_jax": {
            "tokens": jax_tokens,
            "decode_steps": jax_steps,
            "seconds": jax_seconds,
            "tokens_per_s": jax_tokens / jax_seconds,
            "ms_per_step": 1e3 * jax_seconds / jax_steps,
            "fraction_of_peak": machine.fraction_of_peak(useful_flops / jax_seconds, where, "jax"),
        },
        "torch": {
            "tokens": torch_tokens,
            "decode_steps": torch_steps,
            "seconds": torch_seconds,
            "tokens_per_s": torch_tokens / torch_seconds,
            "ms_per_step": 1e3 * torch_seconds / torch_steps,
            "threads": torch.get_num_threads(),
            "fraction_of_peak": machine.fraction_of_peak(torch_flops / torch_seconds, where, "torch"),
        },
    }
    result["speed_ratio"] = result["aft_jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"]
    result["step_time_ratio"] = result["torch"]["ms_per_step"] / result["aft_jax"]["ms_per_step"]
    for name in ("aft_jax", "torch"):
        r = result[name]
        print(
            f"{name:8} {r['tokens']:>6} tokens in {r['seconds']:7.2f}s = {r['tokens_per_s']:8.1f} tokens/s; "
            f"{r['decode_steps']} decode steps, {r['ms_per_step']:.1f} ms each (prefill included); "
            f"{100 * (r['fraction_of_peak'] or 0):.0f}% of its library's matmul peak"
        )
    print(f"on {machine.describe(where)}")
    ratios = f"{result['speed_ratio']:.2f}x tokens/s, {result['step_time_ratio']:.2f}x per step"
    print(f"speed ratio (aft_jax / torch): {ratios}")
    out_file = Path(__file__).parent / "results" / f"sampling_{batch}_rows_{args.max_new_tokens}_tokens.json"
    out_file.parent.mkdir(exist_ok=True)
    out_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
