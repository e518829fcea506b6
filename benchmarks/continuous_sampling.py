"""Bulk sampling of one work list (Q questions x k samples) three ways, side by side in one run: the
continuous loop (`aft_jax.sampling.continuous`, what `JaxSampler.sample` runs), the static loop
(`aft_jax.sampling.static`: batches of `rows // k` questions, each until its longest sample is done, as
`JaxSampler.sample` ran before continuous batching) and transformers `generate` (torch, the same batches).

    .venv/bin/python benchmarks/continuous_sampling.py                    # SmolLM2-135M, GSM8K, 256 new tokens
    .venv/bin/python benchmarks/continuous_sampling.py --model runs/demo/seed-0/vft/model --task synthetic \\
        --template plain --split train --questions 500 --k 4 --max-new-tokens 48 --rows 500 --no-torch \
        --repeats 5                                                       # the demo's VFT model, one shard

Both aft_jax loops draw every token with the keys of its (question, sample, step), so they generate the
same samples (checked here): their difference is only the idle rows. transformers draws its own samples
from the same distribution. Reports, for each, generated tokens (EOS included) per second and wall time
(compilation excluded: each aft_jax program is compiled before it is timed; the median of `--repeats`
timed runs, each one's time kept), decode steps and the share
of row-steps that generated a token; and the length distribution of the samples (the share that end
before half of `max_new_tokens`, which bounds what refilling can gain). Writes
benchmarks/results/continuous_<name>_<rows>_rows_<max_new_tokens>_tokens.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def length_distribution(lengths: np.ndarray, max_new_tokens: int) -> dict:
    quantiles = np.percentile(lengths, [10, 25, 50, 75, 90]).tolist()
    return {
        "mean": float(lengths.mean()),
        "quantiles_10_25_50_75_90": quantiles,
        "share_before_half": float(np.mean(lengths < max_new_tokens / 2)),
        "share_at_max": float(np.mean(lengths >= max_new_tokens)),
    }


def side(tokens: int, seconds: list[float], steps: int, rows: int) -> dict:
    """The run's numbers; `seconds` of each timed repeat, the median taken."""
    median = float(np.median(seconds))
    return {
        "tokens": tokens,
        "seconds": median,
        "seconds_of_each_repeat": seconds,
        "tokens_per_s": tokens / median,
        "decode_steps": steps,
        "busy_row_share": tokens / (steps * rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a model folder, or smollm2 (the built-in checkpoint)")
    parser.add_argument("--task", default="gsm8k")
    parser.add_argument("--template", default="alpaca")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--rows", type=int, default=32, help="rows decoded together (sample.batch_size)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--rows-per-prompt",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[1, 2, 3, 6],
        help="comma-separated: rows per prompt slot of each continuous run (k: every sample of a question together)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed runs of each aft_jax loop; the median is reported (small lists)"
    )
    parser.add_argument("--no-torch", action="store_true", help="leave transformers out")
    parser.add_argument("--name", default="", help="result file name part (default: the model folder's name)")
    args = parser.parse_args()

    import jax
    import machine

    import aft_jax
    from aft_jax.build import resolve_model_path
    from aft_jax.data.tasks import get_task
    from aft_jax.sampling import continuous
    from aft_jax.sampling.decode import decode_layers
    from aft_jax.sampling.sampler import left_pad, sampling_params
    from aft_jax.sampling.static import sample_token_ids

    checkpoint = resolve_model_path(args.model)
    model, tokenizer = aft_jax.from_pretrained(checkpoint)
    task = get_task(args.task)
    prompts = [task.prompt(e, args.template, tokenizer) for e in task.load(args.split, limit=args.questions)]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    params = sampling_params(model, tokenizer, args.max_new_tokens, args.temperature)
    key, k, n = jax.random.key(0), args.k, args.max_new_tokens
    layers = decode_layers(model)

    # The continuous loop over the whole list, as JaxSampler.sample pads it, at each number of rows per prompt
    # slot; each program compiled first, without decoding a step.
    ids, mask = left_pad(encoded, len(encoded), params.pad_id, 64)
    runs = {}
    for rows_per_prompt in args.rows_per_prompt:
        layout = dict(rows=args.rows, rows_per_prompt=rows_per_prompt, layers=layers)
        continuous.warm_up(model, ids, mask, params, key, k, **layout)
        seconds = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            out = continuous.sample_continuous(model, ids, mask, params, key, k, **layout)
            seconds.append(time.perf_counter() - began)
        rows = continuous.slot_shape(args.rows, k, len(ids), rows_per_prompt, None)
        runs[rows_per_prompt] = (out, seconds, rows[0] * rows[1])
    per_batch = max(1, args.rows // k)  # questions decoding at a time in the static loop

    # The static loop, batch by batch, with the same per-sample keys; each padded length compiled first.
    batches = [
        (q, left_pad(encoded[q : q + per_batch], per_batch, params.pad_id, 64))
        for q in range(0, len(encoded), per_batch)
    ]
    for q, (b_ids, b_mask) in {b[1][0].shape: b for b in batches}.values():
        sample_token_ids(model, b_ids, b_mask, params, key, k, layers, question_ids=q + np.arange(per_batch))
    static_seconds = []
    for _ in range(args.repeats):
        static_tokens, static_steps, began = [], 0, time.perf_counter()
        for q, (b_ids, b_mask) in batches:
            tokens, lengths = sample_token_ids(
                model, b_ids, b_mask, params, key, k, layers, question_ids=q + np.arange(per_batch)
            )
            static_steps += int(lengths.max())
            static_tokens.append(tokens[: min(per_batch, len(encoded) - q) * k])
        static_seconds.append(time.perf_counter() - began)
    static_tokens = np.concatenate(static_tokens)
    first = runs[args.rows_per_prompt[0]][0]
    total = int(first.lengths.sum())
    where = machine.record()
    result = {
        "machine": where,
        "model": str(args.model),
        "task": args.task,
        "questions": len(prompts),
        "k": k,
        "rows": args.rows,
        "max_new_tokens": n,
        "temperature": args.temperature,
        "lengths": length_distribution(first.lengths, n),
        "static": side(total, static_seconds, static_steps, per_batch * k),
    }
    for rows_per_prompt, (out, seconds, rows) in runs.items():
        name = f"continuous_{rows_per_prompt}_rows_per_prompt"
        result[name] = side(int(out.lengths.sum()), seconds, out.steps, rows)
        # The same samples as the static loop's, but for the last bits of float sums over other shapes:
        # a sample that flips one draw continues differently.
        result[name]["share_same_as_static"] = float(np.mean(np.all(out.tokens == static_tokens, axis=1)))
        result[f"{name}_over_static"] = result[name]["tokens_per_s"] / result["static"]["tokens_per_s"]

    if not args.no_torch:
        import torch
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        tokenizer.padding_side = "left"
        torch.manual_seed(0)
        torch_tokens, torch_steps, torch_lengths, torch_seconds = 0, 0, [], 0.0
        for q in range(0, len(prompts), per_batch):
            rows = tokenizer(
                [p for p in prompts[q : q + per_batch] for _ in range(k)], return_tensors="pt", padding=True
            )
            with torch.no_grad():
                began = time.perf_counter()
                generated = hf_model.generate(
                    **rows, max_new_tokens=n, do_sample=args.temperature > 0, temperature=args.temperature,
                    top_k=0, top_p=1.0, pad_token_id=params.pad_id, eos_token_id=list(params.eos_ids),
                )  # fmt: skip
                torch_seconds += time.perf_counter() - began
            generated = generated[:, rows["input_ids"].shape[1] :].numpy()
            lengths = continuous.sample_lengths(generated, params.eos_ids)
            torch_lengths.append(lengths)
            torch_tokens += int(lengths.sum())
            torch_steps += generated.shape[1]
        result["torch"] = side(torch_tokens, [torch_seconds], torch_steps, per_batch * k)
        result["torch"]["threads"] = torch.get_num_threads()
        result["torch"]["lengths"] = length_distribution(np.concatenate(torch_lengths), n)
        for rows_per_prompt in runs:
            name = f"continuous_{rows_per_prompt}_rows_per_prompt"
            result[f"{name}_over_torch"] = result[name]["tokens_per_s"] / result["torch"]["tokens_per_s"]
        result["static_over_torch"] = result["static"]["tokens_per_s"] / result["torch"]["tokens_per_s"]

    for name in [f"continuous_{r}_rows_per_prompt" for r in runs] + ["static", "torch"]:
        if name in result:
            r = result[name]
            print(
                f"{name:30} {r['tokens']:>7} tokens in {r['seconds']:7.1f}s = {r['tokens_per_s']:8.1f} tokens/s; "
                f"{r['decode_steps']} steps, {100 * r['busy_row_share']:.0f}% of row-steps busy"
            )
    lengths = result["lengths"]
    print(
        f"lengths: mean {lengths['mean']:.0f}, quartiles {lengths['quantiles_10_25_50_75_90'][1:4]}, "
        f"{100 * lengths['share_before_half']:.0f}% end before {n // 2}, {100 * lengths['share_at_max']:.0f}% reach {n}"
    )
    ratios = {key: round(value, 2) for key, value in result.items() if "_over_" in key}
    print(f"ratios {ratios}; on {machine.describe(where)}")
    name = args.name or ("smollm2" if args.model == "smollm2" else Path(args.model).parent.name)
    out_file = Path(__file__).parent / "results" / f"continuous_{name}_{args.rows}_rows_{n}_tokens.json"
    out_file.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
