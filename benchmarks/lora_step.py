"""LoRA and QLoRA against full fine-tuning on SmolLM2-135M (the real checkpoint): the AFT-BC train step on real
GSM8K candidate groups (those of `group_step_layouts.py`: K = 7, packed rows of 1024 tokens), and greedy
sampling with a LoRA model's adapters unmerged against merged, in one run.

    .venv/bin/python benchmarks/lora_step.py [--questions 2] [--steps 3] [--rank 16] [--remat full]
        [--checkpoint DIR]

Train step, one process per variant (so each peak RSS is its own), the same batch:
- full: every weight trained (float32 weights and compute, as the other CPU benchmarks);
- LoRA: adapters of rank `--rank` (alpha 2 x rank) on all seven projections, the float32 base frozen;
- QLoRA: the same with the base projections stored as NF4 (`aft_jax.model.lora`: 16 NormalFloat codes, two
  per byte, one float32 absmax scale per 64 inputs; embeddings and norms stay float32).
Each reports the median step time after the first (compiling) step, peak RSS (`ru_maxrss`: loading the
checkpoint and quantizing included) and the peak during the steps alone (`VmHWM` after resetting it
through /proc/self/clear_refs once the model, state and batch are ready), and the bytes on disk of its
train state saved with `TrainCheckpointer` (the trained weights, their AdamW moments, step and RNG; a
LoRA run never saves its frozen base). Ratios are to full fine-tuning.

Sampling, one process per base (float32, NF4): the LoRA model with `A` as initialised and `B` drawn from
N(0, 0.01^2) (new adapters have B = 0, which would leave nothing to compare), greedy with `JaxSampler`'s
continuous loop on `--prompts` GSM8K test questions (Alpaca prompt, `--new-tokens` tokens at most):
tokens/s of the second call (the first compiles), unmerged and after `merge_adapters`, and whether the
completions are the same.

Writes benchmarks/results/lora_step.json with the machine (`machine.py`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from group_step_layouts import batches  # noqa: E402  (benchmarks/, beside this script)
from machine import reset_peak, vm_hwm_mb  # noqa: E402
from train_step_vs_torch import BETA, peak_rss_mb, run_side  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"full": None, "LoRA": "none", "QLoRA": "nf4"}  # variant: the base's quantization (None: no adapters)
LR = {"full": 2e-5, "LoRA": 2e-4, "QLoRA": 2e-4}  # not timed; the presets' rates (configs/qwen.py)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def lora_model(checkpoint: str, mesh, quantize: str | None, rank: int, remat: str, b_std: float = 0.0):
    """SmolLM2 with new adapters (or none, `quantize` None); `b_std` > 0 draws B from N(0, b_std^2)."""
    import jax

    import aft_jax
    from aft_jax.model.adapters import adapter_arrays, with_adapters
    from aft_jax.model.config import LoraConfig

    model, tokenizer = aft_jax.from_pretrained(checkpoint, mesh=mesh, remat_policy=remat)
    if quantize is None:
        return model, tokenizer
    lora = LoraConfig(rank, alpha=2.0 * rank, quantize=quantize)
    adapters = None
    if b_std:
        plain = with_adapters(model, LoraConfig(rank, lora.alpha), seed=0)
        adapters = {
            target: (a, b_std * jax.random.normal(jax.random.key(i), b.shape, b.dtype))
            for i, (target, (a, b)) in enumerate(adapter_arrays(plain).items())
        }
        del plain
    model = with_adapters(model, lora, seed=0, adapters=adapters)
    gc.collect()
    return model, tokenizer


def run_step(args, checkpoint: str, variant: str) -> dict:
    import jax

    from aft_jax.config.defaults import default_config
    from aft_jax.io.checkpoint import TrainCheckpointer
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program

    mesh = sharding.single_device_mesh()
    model, _ = lora_model(checkpoint, mesh, VARIANTS[variant], args.rank, args.remat)
    cfg = default_config()
    cfg.loss.update(method="aft", constraint="boundary", beta=BETA)
    cfg.optim.lr = LR[variant]
    program = build_train_program(model.config, mesh, cfg.loss, cfg.optim, total_steps=100, grad_accum=1)
    state, frozen = program.init_state(model, 0), program.frozen(model)
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((state.params, frozen)))
    del model
    gc.collect()
    batch = batches(checkpoint, args.questions, 1024)["packed"]
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    cost = program.lower(state, batch, frozen).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # XLA's count of the compiled step's work
    reset = reset_peak()
    times, losses = [], []
    for i in range(args.steps + 1):
        began = time.perf_counter()
        state, metrics = program(state, batch, frozen)
        losses.append(float(metrics["loss"]))
        if i:  # the first step compiles
            times.append(time.perf_counter() - began)
    steps_peak = vm_hwm_mb() if reset else None
    with tempfile.TemporaryDirectory() as tmp:
        checkpointer = TrainCheckpointer(Path(tmp) / "checkpoints", save_every=1, keep=1, async_save=False)
        checkpointer.save(int(state.step), state, {"position": 0}, force=True)
        checkpointer.close()
        checkpoint_bytes = folder_bytes(Path(tmp) / "checkpoints")
    return {
        "step_s": float(np.median(times)),
        "step_times_s": times,
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "steps_peak_rss_mb": steps_peak,
        "checkpoint_bytes": checkpoint_bytes,
        "trained_params": int(trained),
        "weight_bytes": int(weights),
        "compiled_gflop": float(cost.get("flops", 0.0)) / 1e9,
    }


def timed_sample(sampler, prompts: list[str], new_tokens: int) -> tuple[list[str], float, int]:
    """Completions, seconds and generated tokens of the second greedy call (the first compiles)."""
    import jax

    from aft_jax.sampling.continuous import sample_continuous
    from aft_jax.sampling.sampler import decode_completion, left_pad

    params = sampler.params(new_tokens)
    encoded = [sampler.tokenizer(p)["input_ids"] for p in prompts]
    ids, mask = left_pad(encoded, len(encoded), params.pad_id, sampler.pad_multiple)
    for _ in range(2):
        began = time.perf_counter()
        out = sample_continuous(sampler.model, ids, mask, params, jax.random.key(0), 1, rows=sampler.batch_size)
        seconds = time.perf_counter() - began
    texts = [decode_completion(sampler.tokenizer, t, n, params.eos_ids) for t, n in zip(out.tokens, out.lengths)]
    return texts, seconds, int(np.sum(out.lengths))


def run_sampling(args, checkpoint: str, quantize: str) -> dict:
    from aft_jax.data.tasks import get_task
    from aft_jax.model.adapters import merge_adapters
    from aft_jax.parallel import sharding
    from aft_jax.sampling.sampler import JaxSampler

    mesh = sharding.single_device_mesh()
    model, tokenizer = lora_model(checkpoint, mesh, quantize, args.rank, "none", b_std=0.01)
    base, _ = lora_model(checkpoint, mesh, None, args.rank, "none")
    task = get_task("gsm8k")
    prompts = [task.prompt(e, "alpaca") for e in task.load("test", limit=args.prompts)]
    result = {}
    for name, m in (("unmerged", model), ("merged", merge_adapters(model)), ("base", base)):
        sampler = JaxSampler(m, tokenizer, batch_size=len(prompts), progress=False)
        texts, seconds, tokens = timed_sample(sampler, prompts, args.new_tokens)
        result[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "texts": texts}
    u, m, b = (result[k]["texts"] for k in ("unmerged", "merged", "base"))
    result["same_completions"] = sum(x == y for x, y in zip(u, m))
    result["same_as_base"] = sum(x == y for x, y in zip(u, b))
    result["prompts"] = len(prompts)
    result["merged_vs_unmerged"] = result["merged"]["tokens_per_s"] / result["unmerged"]["tokens_per_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2, help="questions (groups of K = 7) per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps, after the compiling one")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--remat", default="full", help="remat policy of the train step")
    parser.add_argument("--prompts", type=int, default=4, help="GSM8K test questions to sample from")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt at most")
    parser.add_argument("--checkpoint", help="HF checkpoint folder (default: the real SmolLM2-135M-Instruct)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not os.environ.get("AFT_DATA_DIR") and (REPO.parent / "shared" / "data").is_dir():
        os.environ["AFT_DATA_DIR"] = str(REPO.parent / "shared" / "data")  # as the tests find GSM8K
    from aft_jax.build import resolve_model_path

    checkpoint = resolve_model_path(args.checkpoint or "smollm2")
    if args.side:
        kind, _, name = args.side.partition(":")
        result = run_step(args, checkpoint, name) if kind == "step" else run_sampling(args, checkpoint, name)
        print("RESULT " + json.dumps(result))
        return
    began = time.perf_counter()
    common = [
        *("--checkpoint", checkpoint, "--rank", str(args.rank), "--remat", args.remat),
        *("--questions", str(args.questions), "--steps", str(args.steps)),
        *("--prompts", str(args.prompts), "--new-tokens", str(args.new_tokens)),
    ]
    steps, sampling = {}, {}
    for variant in VARIANTS:
        steps[variant] = run_side([sys.executable, __file__, "--side", f"step:{variant}", *common])
        print(f"{variant}: {steps[variant]}", file=sys.stderr, flush=True)
    for quantize in ("none", "nf4"):
        sampling[quantize] = run_side([sys.executable, __file__, "--side", f"sample:{quantize}", *common])
        print(f"sampling {quantize}: {sampling[quantize]}", file=sys.stderr, flush=True)
    full = steps["full"]
    for r in steps.values():
        r["vs_full"] = {
            "step_time": r["step_s"] / full["step_s"],
            "peak_rss": r["peak_rss_mb"] / full["peak_rss_mb"],
            "steps_peak_rss": r["steps_peak_rss_mb"] / full["steps_peak_rss_mb"] if r["steps_peak_rss_mb"] else None,
            "checkpoint": r["checkpoint_bytes"] / full["checkpoint_bytes"],
        }
    import machine

    where = machine.record()
    tokens = batches(checkpoint, args.questions, 1024)["tokens"]
    summary = {
        "machine": where,
        "settings": {
            "model": "SmolLM2-135M-Instruct",
            "questions": args.questions,
            "k": 7,
            "layout": "packed",
            "tokens_per_row": 1024,
            "remat": args.remat,
            "rank": args.rank,
            "alpha": 2 * args.rank,
            "targets": "q,k,v,o,gate,up,down",
            "dtype": "float32 weights and compute (the LoRA base too; QLoRA's base projections NF4)",
            "timed_steps": args.steps,
            "sampling": f"greedy, {args.prompts} GSM8K test prompts, at most {args.new_tokens} new tokens, "
            "B ~ N(0, 0.01^2)",
        },
        "tokens": tokens,
        "train_step": steps,
        "sampling": sampling,
        "wall_s": time.perf_counter() - began,
    }
    out = Path(__file__).parent / "results" / "lora_step.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'':6} {'step s':>7} {'x full':>7} {'peak RSS MB':>12} {'x full':>7} {'steps peak MB':>14} {'x full':>7} "
          f"{'checkpoint MB':>14} {'x full':>7}")  # fmt: skip
    for name, r in steps.items():
        v = r["vs_full"]
        print(
            f"{name:6} {r['step_s']:>7.2f} {v['step_time']:>7.2f} {r['peak_rss_mb']:>12.0f} {v['peak_rss']:>7.2f} "
            f"{r['steps_peak_rss_mb'] or 0:>14.0f} {v['steps_peak_rss'] or 0:>7.2f} "
            f"{r['checkpoint_bytes'] / 2**20:>14.1f} {v['checkpoint']:>7.4f}"
        )
    for quantize, s in sampling.items():
        print(
            f"sampling, base {quantize}: unmerged {s['unmerged']['tokens_per_s']:.1f} tokens/s, merged "
            f"{s['merged']['tokens_per_s']:.1f} ({s['merged_vs_unmerged']:.2f}x), base {s['base']['tokens_per_s']:.1f}; "
            f"{s['same_completions']}/{s['prompts']} completions the same merged and unmerged, "
            f"{s['same_as_base']}/{s['prompts']} the same as the base model's"
        )
    print(f"on {machine.describe(where)}; {summary['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
