"""Per-device memory of the AFT train step (K = 7, 128 questions per step) for Llama-2 7B and 13B, Qwen2.5-7B
and Qwen3-8B on v4-32,
v5e-64 and v5p-64 meshes, padded (every candidate 512 tokens) and packed (GSM8K's mean lengths, `LENGTHS`),
from `aft-jax plan` (XLA's memory analysis of an ahead-of-time compilation on simulated CPU devices; a TPU
compilation fuses differently, so treat it as an estimate).

    .venv/bin/python benchmarks/memory_plan.py [MODEL ...]    # e.g. Qwen2.5-7B; default: all of MODELS

Prints a Markdown table (the one in docs/models.md) and writes benchmarks/results/memory_plan.json, with the
machine that compiled the plans (`machine.py`; no rates: nothing here is timed).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

REPO = Path(__file__).resolve().parents[1]
CHIPS = {"v4-32": (16, "v4", 32), "v5e-64": (64, "v5e", 16), "v5p-64": (32, "v5p", 95)}
MODELS = {
    "7B": "configs/llama2_7b_gsm8k.py",
    "13B": "configs/llama2_13b_gsm8k.py",
    "Qwen2.5-7B": "configs/qwen.py:qwen2.5_7b-gsm8k",
    "Qwen3-8B": "configs/qwen.py:qwen3_8b-gsm8k",
}
# padded: every candidate padded to the 512-token maximum; packed: GSM8K's mean lengths with the Alpaca
# prompt (SmolLM2's tokenizer, 64 training questions: sequences 192 tokens, 95 of them the prompt)
LENGTHS = {"padded": ["--seq-len", "512"], "packed": ["--seq-len", "192", "--prompt-len", "96"]}
TOKENS = re.compile(r"([\d,]+) tokens per step")
LINE = re.compile(
    r"parameters ([\d.]+) GB, optimizer state ([\d.]+) GB, activations and temporaries ([\d.]+) GB, "
    r"total ([\d.]+) GB"
)


def plan(config: str, devices: int, chip: str, grad_accum: int, remat: str, layout: str) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "aft_jax.cli",
            "plan",
            "--config",
            str(REPO / config),
            "--chip",
            chip,
            f"--config.train.mesh=1,{devices},1",
            "--config.data.group_size=7",
            f"--config.train.grad_accum={grad_accum}",
            f"--config.model.remat_policy={remat}",
            f"--config.data.layout={layout}",
            *LENGTHS[layout],
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    params, opt, temp, total = (float(x) for x in LINE.search(out).groups())
    return {
        "params_gb": params,
        "optimizer_gb": opt,
        "temporaries_gb": temp,
        "total_gb": total,
        "verdict": out.strip().splitlines()[-1],
        "tokens_per_step": int(TOKENS.search(out).group(1).replace(",", "")),
    }


def main(models: list[str]) -> None:
    """Plans `models` (all of MODELS when empty) and writes them into memory_plan.json, in MODELS order, with
    the rows of the other models kept from earlier runs."""
    out = REPO / "benchmarks" / "results" / "memory_plan.json"
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown model(s) {sorted(unknown)}; expected some of {list(MODELS)}")
    models = models or list(MODELS)
    kept = [r for r in json.loads(out.read_text())["plans"] if r["model"] not in models] if out.exists() else []
    rows = []
    for model in models:
        config = MODELS[model]
        for name, (devices, chip, hbm) in CHIPS.items():
            for layout in ("padded", "packed"):
                # The first setting that fits, from the fastest: save matmul outputs, then recompute layers,
                # then smaller micro-batches (every device needs at least one whole question group).
                settings = [
                    (remat, ga)
                    for remat in ("dots_no_batch", "full")
                    for ga in (1, 2, 4, 8)
                    if 128 % (ga * devices) == 0
                ]
                for remat, grad_accum in settings:
                    result = plan(config, devices, chip, grad_accum, remat, layout)
                    if result["verdict"].startswith("fits"):
                        break
                rows.append(
                    {
                        "model": model,
                        "slice": name,
                        "devices": devices,
                        "hbm_gb": hbm,
                        "layout": layout,
                        "remat": remat,
                        "grad_accum": grad_accum,
                        **result,
                    }
                )
    rows = sorted(kept + rows, key=lambda r: list(MODELS).index(r["model"]))
    print(
        "| model | slice (HBM/chip) | fsdp | layout | tokens/step | remat | grad_accum | params | optimizer "
        "| activations + temps | total | |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        fits = "fits" if r["verdict"].startswith("fits") else "does not fit"
        print(
            f"| {r['model']} | {r['slice']} ({r['hbm_gb']} GB) | {r['devices']} | {r['layout']} | "
            f"{r['tokens_per_step']:,} | {r['remat']} | {r['grad_accum']} | "
            f"{r['params_gb']:.2f} GB | {r['optimizer_gb']:.2f} GB | {r['temporaries_gb']:.2f} GB | "
            f"{r['total_gb']:.2f} GB | {fits} |"
        )
    out.write_text(json.dumps({"machine": machine.record(measure=False), "plans": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
