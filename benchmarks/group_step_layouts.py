"""The AFT-BC train step on real GSM8K candidate groups, SmolLM2-135M: the packed layout (each prompt once, rows of
`tokens_per_row`), the planned layout (the row length, or padding, that the packer's cost model picks for
training: `data.rows_by_cost`), the padded layout (`[B, K, T]`, every candidate a whole sequence padded to the
batch's longest), and PyTorch + transformers (padded, as TRL and RRHF train), side by side in one run.

    .venv/bin/python benchmarks/group_step_layouts.py [--questions 4] [--steps 3] [--tokens-per-row 1024]
        [--remat full] [--checkpoint DIR] [--out benchmarks/results/group_step_layouts.json]

A group is a GSM8K training question with the Alpaca prompt, its reference chain of thought (a positive) and
six other questions' references (real-length chains of thought; negatives), K = 7, at most 512 tokens each.
Each side runs in its own process (so peak RSS is its own) on the same groups and reports questions per
second (median step), peak RSS and its first loss; the token counts say how many tokens each layout
computes against those the candidates have. Writes `--out` with the machine (`machine.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from train_step_vs_torch import BETA, peak_rss_mb, run_side, torch_steps  # benchmarks/, beside this script

K, MAX_LENGTH, PAD_MULTIPLE = 7, 512, 64


def encoded_groups(checkpoint: str, questions: int):
    from transformers import AutoTokenizer

    from aft_jax.data.batches import GroupEncoder
    from aft_jax.data.groups import Candidate, Group
    from aft_jax.data.tasks import get_task

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    task = get_task("gsm8k")
    examples = task.load("train", limit=questions * (K + 1))
    encoder = GroupEncoder(tokenizer, MAX_LENGTH, K)
    groups = []
    for q, example in enumerate(examples[:questions]):
        others = [examples[questions + (q * (K - 1) + i) % (len(examples) - questions)].target for i in range(K - 1)]
        candidates = [Candidate(example.target, True, 1, True)] + [Candidate(t, False, 0) for t in others]
        groups.append(encoder.encode(Group(example.id, task.prompt(example, "alpaca"), example.answer, candidates)))
    return groups, tokenizer.pad_token_id or 0


def batches(checkpoint: str, questions: int, tokens_per_row: int, cost=None) -> dict:
    """The padded and packed batches (rows of `tokens_per_row`), and with a `LayoutCost` the planned one (the
    layout and row length `collate_planned` estimates cheapest, as training batches them)."""
    from aft_jax.data.batches import collate, collate_packed, collate_planned

    groups, pad_id = encoded_groups(checkpoint, questions)
    longest = max(len(t) for g in groups for t in g.tokens)
    padded = collate(groups, K, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, pad_id)
    packed = collate_packed(groups, K, tokens_per_row=tokens_per_row, pad_id=pad_id, pad_multiple=PAD_MULTIPLE)
    tokens = {
        "candidate_sequences": sum(len(t) for g in groups for t in g.tokens),
        "prompt_once": sum(g.prompt_lengths[0] + sum(len(t) - g.prompt_lengths[0] for t in g.tokens) for g in groups),
        "computed_padded": int(np.prod(padded["input_ids"].shape)),
        "computed_packed": int(np.prod(packed["input_ids"].shape)),
        "packed_rows": int(packed["input_ids"].shape[0]),
        "packed_row_length": int(packed["input_ids"].shape[1]),
        "padded_length": int(padded["input_ids"].shape[-1]),
    }
    out = {"padded": padded, "packed": packed, "tokens": tokens}
    if cost is not None:
        out["planned"] = collate_planned(
            groups, K, cost=cost, tokens_per_row=tokens_per_row, max_length=MAX_LENGTH, pad_id=pad_id,
            pad_multiple=PAD_MULTIPLE,
        )  # fmt: skip
        tokens["planned_shape"] = list(out["planned"]["input_ids"].shape)
    return out


def run_jax(args, checkpoint: str, layout: str) -> dict:
    import jax

    import aft_jax
    from aft_jax.config.defaults import default_config
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program

    mesh = sharding.single_device_mesh()
    model, _ = aft_jax.from_pretrained(checkpoint, mesh=mesh, remat_policy=args.remat)
    cfg = default_config()
    cfg.loss.update(method="aft", constraint="boundary", beta=BETA)
    program = build_train_program(model.config, mesh, cfg.loss, cfg.optim, total_steps=100, grad_accum=1)
    state = program.init_state(model, 0)
    model_config = model.config
    del model
    from aft_jax.data.layout_cost import layout_cost

    cost = layout_cost(model_config, jax.default_backend())
    batch = batches(checkpoint, args.questions, args.tokens_per_row, cost)[layout]
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    times, losses = [], []
    for i in range(args.steps + 1):
        began = time.perf_counter()
        state, metrics = program(state, batch)
        losses.append(float(metrics["loss"]))
        if i:  # the first step compiles
            times.append(time.perf_counter() - began)
    return {"step_s": float(np.median(times)), "losses": losses, "peak_rss_mb": peak_rss_mb(), "jax": jax.__version__}


def run_torch(args, checkpoint: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batch = {
        k: torch.from_numpy(v) for k, v in batches(checkpoint, args.questions, args.tokens_per_row)["padded"].items()
    }
    b, k, t = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(b * k, t).long()
    attention = batch["attention_mask"].reshape(b * k, t)
    completion = batch["completion_mask"].reshape(b * k, t)[:, 1:].float()

    def loss_fn():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0] * completion
        sums = logp.sum(-1).reshape(b, k)
        scores = sums / completion.sum(-1).clamp(min=1).reshape(b, k)
        reference = batch["is_reference"] & batch["valid"]
        vft = -sums[reference].sum() / completion.sum(-1).reshape(b, k)[reference].sum()
        align = 0.0
        for g in range(b):
            pos, neg = scores[g][batch["is_pos"][g]], scores[g][batch["is_neg"][g]]
            target = (2 * (pos.min() - BETA) - pos).detach()
            terms = [(neg[None, :] - pos[:, None]).flatten(), (target[:, None] - neg[None, :]).flatten()]
            align = align + torch.logsumexp(torch.cat(terms + [scores.new_zeros(1)]), 0)
        return vft + align / b

    times, losses = torch_steps(model, opt, loss_fn, args.steps, torch.device("cpu"))
    return {
        "step_s": float(np.median(times)),
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=4, help="questions (groups of K = 7) per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens-per-row", type=int, default=1024)
    parser.add_argument("--remat", default="full", help="aft_jax remat policy; torch checkpoints unless none")
    parser.add_argument("--checkpoint", help="HF checkpoint folder (default: the real SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "group_step_layouts.json")
    parser.add_argument("--impl", choices=["packed", "planned", "padded", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from aft_jax.build import resolve_model_path

    checkpoint = resolve_model_path(args.checkpoint or "smollm2")
    if args.impl:
        result = run_torch(args, checkpoint) if args.impl == "torch" else run_jax(args, checkpoint, args.impl)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for impl in ("packed", "planned", "padded", "torch"):
        cmd = [sys.executable, __file__, "--impl", impl, "--checkpoint", checkpoint, "--remat", args.remat]
        cmd += ["--questions", str(args.questions), "--steps", str(args.steps)]
        cmd += ["--tokens-per-row", str(args.tokens_per_row)]
        results[impl] = run_side(cmd)
        results[impl]["questions_per_s"] = args.questions / results[impl]["step_s"]
    import machine

    where = machine.record()
    summary = {
        "machine": where,
        "shape": {
            "model": "SmolLM2-135M",
            "questions": args.questions,
            "k": K,
            "max_length": MAX_LENGTH,
            "tokens_per_row": args.tokens_per_row,
            "remat": args.remat,
        },
        "tokens": batches(checkpoint, args.questions, args.tokens_per_row)["tokens"],
        **results,
        "packed_vs_padded": results["packed"]["questions_per_s"] / results["padded"]["questions_per_s"],
        "planned_vs_padded": results["planned"]["questions_per_s"] / results["padded"]["questions_per_s"],
        "packed_vs_torch": results["packed"]["questions_per_s"] / results["torch"]["questions_per_s"],
        "padded_vs_torch": results["padded"]["questions_per_s"] / results["torch"]["questions_per_s"],
        "packed_memory_vs_padded": results["packed"]["peak_rss_mb"] / results["padded"]["peak_rss_mb"],
    }
    print(f"{'':8} {'questions/s':>12} {'peak RSS MB':>12} {'step s':>8} {'first loss':>11}")
    for name in ("packed", "planned", "padded", "torch"):
        r = results[name]
        print(
            f"{name:8} {r['questions_per_s']:>12.3f} {r['peak_rss_mb']:>12.0f} {r['step_s']:>8.2f} {r['losses'][0]:>11.5f}"
        )
    print(
        f"packed / padded {summary['packed_vs_padded']:.2f}x, planned / padded {summary['planned_vs_padded']:.2f}x, "
        f"packed / torch {summary['packed_vs_torch']:.2f}x, "
        f"padded / torch {summary['padded_vs_torch']:.2f}x; peak memory packed / padded "
        f"{summary['packed_memory_vs_padded']:.2f}x; tokens {summary['tokens']}"
    )
    print(f"on {machine.describe(where)}")
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
