"""One AFT train step (1 group of K = 7 candidates x 256 tokens, AFT-BC + VFT, AdamW) on SmolLM2-135M:
aft_jax against the same step written with PyTorch + transformers, on the same batch, in one run.

    .venv/bin/python benchmarks/train_step_vs_torch.py [--steps 5] [--k 7] [--length 256]
        [--remat full] [--dtype float32] [--checkpoint DIR]

Each side runs in its own process (so peak RSS is its own); prints tokens/s and peak memory for both and
the ratios, and writes them to benchmarks/results/train_step_remat_<policy>[_<dtype>].json. `--remat full`
(default) rematerialises every layer on both sides (torch: gradient checkpointing); `--remat none` neither.
`--checkpoint` is the HF folder to train (default: the real SmolLM2-135M-Instruct). `--dtype` is the
compute dtype; parameters and optimizer state stay float32 on both sides (aft_jax: `compute_dtype`,
torch: `torch.autocast`). torch runs on CUDA when there is a GPU, else on the CPU. The result file also
holds the machine (`machine.py`: CPU and its vector extensions or the GPU, versions, the measured matrix-
product peak of JAX and of torch) and each side's model FLOP/s (`aft_jax.stages.train.train_flops`, remat's
recomputation not counted) as a fraction of its own library's peak in the compute dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import peak_rss_mb  # noqa: F401  (benchmarks/, beside this script; other scripts import it from here)

BETA = 0.1


def make_batch(k: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    prompt = length // 4
    ids = rng.integers(10, vocab, size=(1, k, length)).astype(np.int32)
    ids[:, :, :prompt] = ids[:, :1, :prompt]  # one shared question
    attention = np.ones((1, k, length), np.int32)
    completion = np.zeros((1, k, length), np.int32)
    completion[:, :, prompt:] = 1
    is_pos = np.zeros((1, k), bool)
    is_pos[0, : min(3, k - 1)] = True  # at least one negative
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "completion_mask": completion,
        "valid": np.ones((1, k), bool),
        "is_pos": is_pos,
        "is_neg": ~is_pos,
        "is_reference": np.eye(1, k, dtype=bool),
        "levels": is_pos.astype(np.int32),
        "ref_logp_sum": np.zeros((1, k), np.float32),
        "completion_tokens": completion.sum(-1).astype(np.int32),
    }


def run_jax(args, checkpoint: str) -> dict:
    import jax

    import aft_jax
    from aft_jax.config.defaults import default_config
    from aft_jax.parallel import sharding
    from aft_jax.stages.program import build_train_program
    from aft_jax.stages.train import shard_batch

    mesh = sharding.single_device_mesh()
    model, _ = aft_jax.from_pretrained(
        checkpoint, mesh=mesh, dtype="float32", compute_dtype=args.dtype, remat_policy=args.remat
    )
    cfg = default_config()
    cfg.loss.update(method="aft", constraint="boundary", beta=BETA)
    step = build_train_program(model.config, mesh, cfg.loss, cfg.optim, total_steps=100, grad_accum=1)
    state = step.init_state(model, 0)
    del model
    batch = shard_batch(make_batch(args.k, args.length, 49152), mesh)
    times, losses = [], []
    for i in range(args.steps + 1):
        began = time.perf_counter()
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if i:  # the first step compiles
            times.append(time.perf_counter() - began)
    return {
        "impl": "aft_jax",
        "step_s": float(np.median(times)),
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
    }


def torch_device(name: str = "auto"):
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def run_side(cmd: list[str]) -> dict:
    """Runs one side of a benchmark in its own process (so its peak RSS is its own): its `RESULT {json}` line."""
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ)).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])


def torch_steps(model, opt, loss_fn, steps: int, device) -> tuple[list[float], list[float]]:
    """`steps + 1` AdamW steps (clipped at norm 1) of `loss_fn()`: the times of all but the first, and every loss."""
    import torch

    times, losses = [], []
    for i in range(steps + 1):
        began = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        losses.append(float(loss.detach()))
        if i:
            times.append(time.perf_counter() - began)
    return times, losses


def run_torch(args, checkpoint: str) -> dict:
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM

    device = torch_device(getattr(args, "device", "auto"))
    dtype = getattr(args, "dtype", "float32")
    autocast = (
        torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
    model.train()
    if args.remat != "none":
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batch = {k: torch.from_numpy(v).to(device) for k, v in make_batch(args.k, args.length, 49152).items()}
    b, k, t = batch["input_ids"].shape
    ids = batch["input_ids"].reshape(b * k, t).long()
    attention = batch["attention_mask"].reshape(b * k, t)
    completion = batch["completion_mask"].reshape(b * k, t)[:, 1:].float()

    def loss_fn():
        with autocast:
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0] * completion
        scores = (logp.sum(-1) / completion.sum(-1)).reshape(b, k)
        vft = (
            -(logp.reshape(b, k, -1)[batch["is_reference"]]).sum()
            / completion.reshape(b, k, -1)[batch["is_reference"]].sum()
        )
        pos, neg = scores[0][batch["is_pos"][0]], scores[0][batch["is_neg"][0]]
        bound = pos.min() - BETA
        target = (2 * bound - pos).detach()
        terms = torch.cat(
            [(neg[None, :] - pos[:, None]).flatten(), (target[:, None] - neg[None, :]).flatten(), scores.new_zeros(1)]
        )
        return vft + torch.logsumexp(terms, 0)

    times, losses = torch_steps(model, opt, loss_fn, args.steps, device)
    return {
        "impl": "torch",
        "step_s": float(np.median(times)),
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--k", type=int, default=7)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument(
        "--remat",
        default="full",
        help="aft_jax remat policy (none, full, dots, ...); torch uses gradient checkpointing unless none",
    )
    parser.add_argument("--dtype", default="float32", help="compute dtype on both sides (float32, bfloat16)")
    parser.add_argument("--checkpoint", help="HF checkpoint folder (default: the real SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default="auto", help="torch device: auto (cuda when available), cpu, cuda")
    parser.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from aft_jax.build import resolve_model_path

    checkpoint = resolve_model_path(args.checkpoint or "smollm2")
    if args.impl:
        result = (run_jax if args.impl == "jax" else run_torch)(args, checkpoint)
        print("RESULT " + json.dumps(result))
        return
    results = {}
    for impl in ("jax", "torch"):
        cmd = [
            sys.executable,
            __file__,
            "--impl",
            impl,
            "--steps",
            str(args.steps),
            "--k",
            str(args.k),
            "--length",
            str(args.length),
            "--remat",
            args.remat,
            "--dtype",
            args.dtype,
            "--checkpoint",
            checkpoint,
            "--device",
            args.device,
        ]
        results[impl] = run_side(cmd)
    import machine

    from aft_jax.io.hf_files import read_config
    from aft_jax.model.families import config_from_hf
    from aft_jax.stages.train import train_flops

    where = machine.record()
    model_config = config_from_hf(read_config(Path(checkpoint)))
    flops = train_flops(model_config, make_batch(args.k, args.length, model_config.vocab_size))
    tokens = args.k * args.length
    jax_r, torch_r = results["jax"], results["torch"]
    summary = {
        "machine": where,
        "shape": {
            "groups": 1,
            "k": args.k,
            "length": args.length,
            "model": "SmolLM2-135M",
            "remat": args.remat,
            "compute_dtype": args.dtype,
        },
        "aft_jax": {
            "tokens_per_s": tokens / jax_r["step_s"],
            "peak_rss_mb": jax_r["peak_rss_mb"],
            "step_s": jax_r["step_s"],
            "fraction_of_peak": machine.fraction_of_peak(flops / jax_r["step_s"], where, "jax", args.dtype),
        },
        "torch": {
            "tokens_per_s": tokens / torch_r["step_s"],
            "peak_rss_mb": torch_r["peak_rss_mb"],
            "step_s": torch_r["step_s"],
            "fraction_of_peak": machine.fraction_of_peak(flops / torch_r["step_s"], where, "torch", args.dtype),
        },
        "first_loss": {"aft_jax": jax_r["losses"][0], "torch": torch_r["losses"][0]},
        "model_flops_per_step": flops,
    }
    summary["speed_ratio"] = summary["aft_jax"]["tokens_per_s"] / summary["torch"]["tokens_per_s"]
    summary["memory_ratio"] = summary["aft_jax"]["peak_rss_mb"] / summary["torch"]["peak_rss_mb"]
    print(f"{'':10} {'tokens/s':>10} {'peak RSS MB':>12} {'step s':>8} {'first loss':>11}")
    for name in ("aft_jax", "torch"):
        r = summary[name]
        print(
            f"{name:10} {r['tokens_per_s']:>10.1f} {r['peak_rss_mb']:>12.0f} {r['step_s']:>8.2f} "
            f"{summary['first_loss'][name]:>11.5f}"
        )
    print(
        f"speed ratio (aft_jax / torch): {summary['speed_ratio']:.2f}x; "
        f"peak memory ratio: {summary['memory_ratio']:.2f}x; of each library's matmul peak: aft_jax "
        f"{100 * (summary['aft_jax']['fraction_of_peak'] or 0):.0f}%, torch "
        f"{100 * (summary['torch']['fraction_of_peak'] or 0):.0f}%"
    )
    print(f"on {machine.describe(where)}")
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    out = Path(__file__).parent / "results" / f"train_step_remat_{args.remat}{suffix}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
