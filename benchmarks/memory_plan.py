"""Per-device memory of the AFT train step (K = 7, 128 questions per step) for Llama-2 7B and 13B, Qwen2.5-7B
and Qwen3-8B on v4-32,
v5e-64 and v5p-64 meshes, padded (every candidate 512 tokens) and packed (GSM8K's mean lengths, `LENGTHS`),
from `aft-jax plan` (XLA's memory analysis of an ahead-of-time compilation on simulated CPU devices; a TPU
compilation fuses differently, so treat it as an estimate).

    .venv/bin/python benchmarks/memory_plan.py [MODEL ...]    # e.g. Qwen2.5-7B; default: all of MODELS

Prints a Markdown table (the one in docs/models.md) and writes benchmarks/results/memory_plan.json, with the
machine that compiled the plans (`machine.py`; no rates: nothing here is timed).

    .venv/bin/python benchmarks/memory_plan.py --lora [MODEL ...] [VARIANT ...]    # e.g. Qwen2.5-7B QLoRA

The LoRA table: Llama-2-7B, Qwen2.5-7B-Instruct and Qwen3-8B, full fine-tuning (the presets: float32 weights,
bfloat16 compute) against LoRA (rank 16, alpha 32, all seven projections, bfloat16 weights and compute) and
QLoRA (the same with the base projections in NF4), packed GSM8K groups (K = 7, 128 per step), on a v5e-8 (8
chips x 16 GB), a v4-8 (4 chips x 32 GB), one 80 GB H100 and one 24 GB GPU (`HBM_GB["l4"]`). Each cell is
`plan_memory` (what `aft-jax plan` runs) in a subprocess of its own with the slice's device count, searching
the first setting that fits as above: matmul outputs saved, then layers recomputed, each with the fewest
micro-batches that fit (a binary search: memory falls with micro-batch size); a cell that does not fit with
layers recomputed and one group per device per micro-batch is reported at that setting. Two cells plan at
a time (compiling is single-threaded); progress goes to stderr. Writes benchmarks/results/memory_plan_lora.json
(after every cell, so an interrupted run keeps what it planned) and prints the Markdown table in docs/models.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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


# ------------------------------------------------------------------------------------------------ LoRA table

LORA_MODELS = {
    "Llama-2-7B": "configs/llama2_7b_gsm8k.py",
    "Qwen2.5-7B": "configs/qwen.py:qwen2.5_7b-gsm8k",
    "Qwen3-8B": "configs/qwen.py:qwen3_8b-gsm8k",
}
LORA = ["model.lora.rank=16", "model.lora.alpha=32.0", "model.param_dtype=bfloat16", "model.compute_dtype=bfloat16"]
VARIANTS = {"full": [], "LoRA": LORA, "QLoRA": [*LORA, "model.lora.quantize=nf4"]}
TARGETS = {  # name: (devices, HBM_GB key, GB per device)
    "v5e-8": (8, "v5e", 16),
    "v4-8": (4, "v4", 32),
    "H100": (1, "h100", 80),
    "24 GB GPU": (1, "l4", 24),
}
GROUPS, SEQ_LEN, PROMPT_LEN = 128, 192, 96  # LENGTHS["packed"]
REMATS = ("dots_no_batch", "full")  # the faster first


def plan_one(spec: dict) -> dict:
    """In a fresh process (`--one JSON`): the plan of one setting, as `aft-jax plan` computes it."""
    from aft_jax.stages.plan import request_host_devices

    request_host_devices(spec["devices"])
    from aft_jax.config.load import load_config
    from aft_jax.stages.plan import HBM_GB, plan_memory, recommend

    overrides = [
        f"train.mesh=1,{spec['devices']},1",
        "data.group_size=7",
        "data.layout=packed",
        f"train.grad_accum={spec['grad_accum']}",
        f"model.remat_policy={spec['remat']}",
        *spec["overrides"],
    ]
    config = load_config(REPO / spec["config"], overrides)
    plan = plan_memory(config, GROUPS, SEQ_LEN, PROMPT_LEN)
    verdict = recommend(plan, HBM_GB[spec["chip"]], config)
    return {**vars(plan), "verdict": verdict, "fits": verdict.startswith("fits")}


def run_one(spec: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--one", json.dumps(spec)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


_print_lock = threading.Lock()


def log(message: str) -> None:
    with _print_lock:
        print(message, file=sys.stderr, flush=True)


def search(model: str, variant: str, target: str) -> dict:
    """The first setting of `REMATS` x micro-batches that fits (see the module docstring), with every plan
    compiled on the way (`tried`)."""
    devices, chip, hbm = TARGETS[target]
    accums = [a for a in (1, 2, 4, 8, 16, 32, 64, 128) if GROUPS % (a * devices) == 0]
    tried: dict[tuple[str, int], dict] = {}

    def plan(remat: str, grad_accum: int) -> dict:
        if (remat, grad_accum) not in tried:
            began = time.perf_counter()
            spec = dict(
                config=LORA_MODELS[model],
                devices=devices,
                chip=chip,
                grad_accum=grad_accum,
                remat=remat,
                overrides=VARIANTS[variant],
            )
            result = run_one(spec)
            tried[remat, grad_accum] = result
            log(
                f"  {model} {variant} {target}: remat={remat} grad_accum={grad_accum}: {result['total_gb']:.2f} GB "
                f"({'fits' if result['fits'] else 'does not fit'}; {time.perf_counter() - began:.0f} s)"
            )
        return tried[remat, grad_accum]

    def first_fitting(remat: str) -> int | None:
        """The fewest micro-batches that fit with `remat` (memory falls as they grow)."""
        if not plan(remat, accums[-1])["fits"]:
            return None
        low, high = 0, len(accums) - 1  # accums[high] fits
        while low < high:
            middle = (low + high) // 2
            if plan(remat, accums[middle])["fits"]:
                high = middle
            else:
                low = middle + 1
        return accums[high]

    choice = None
    if plan(REMATS[-1], accums[-1])["fits"]:  # the leanest setting; when it does not fit, nothing does
        for remat in REMATS:
            grad_accum = first_fitting(remat)
            if grad_accum is not None:
                choice = (remat, grad_accum)
                break
    remat, grad_accum = choice or (REMATS[-1], accums[-1])
    result = tried[remat, grad_accum]
    keep = (
        *("params_gb", "frozen_gb", "trained_params", "optimizer_gb", "temporaries_gb", "total_gb"),
        *("cpu_upcast_gb", "verdict"),
    )
    return {
        "model": model,
        "variant": variant,
        "target": target,
        "devices": devices,
        "hbm_gb": hbm,
        "remat": remat,
        "grad_accum": grad_accum,
        "fits": result["fits"],
        "tokens_per_step": result["computed_tokens"],
        **{k: result[k] for k in keep},
        "tried": [
            {
                "remat": r,
                "grad_accum": a,
                "total_gb": round(p["total_gb"], 3),
                "temporaries_gb": round(p["temporaries_gb"], 3),
            }
            for (r, a), p in tried.items()
        ],
    }


def lora_table(rows: list[dict]) -> str:
    lines = [
        "| model | variant | target | remat | grad_accum | weights (of them frozen) | optimizer | activations + temps "
        "| total | |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        frozen = f" ({r['frozen_gb']:.2f})" if r["frozen_gb"] else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['target']} ({r['devices']} x {r['hbm_gb']} GB) | {r['remat']} | "
            f"{r['grad_accum']} | {r['params_gb']:.2f}{frozen} GB | {r['optimizer_gb']:.2f} GB | "
            f"{r['temporaries_gb']:.2f} GB | {r['total_gb']:.2f} GB | {'fits' if r['fits'] else '**does not fit**'} |"
        )
    return "\n".join(lines)


def lora_main(names: list[str]) -> None:
    """Plans the models and variants `names` (all of LORA_MODELS, all of VARIANTS where it names none) x
    TARGETS into memory_plan_lora.json, keeping the other rows of an earlier run."""
    out = REPO / "benchmarks" / "results" / "memory_plan_lora.json"
    unknown = set(names) - set(LORA_MODELS) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown name(s) {sorted(unknown)}; expected some of {list(LORA_MODELS) + list(VARIANTS)}")
    models = [n for n in names if n in LORA_MODELS] or list(LORA_MODELS)
    variants = [n for n in names if n in VARIANTS] or list(VARIANTS)
    earlier = json.loads(out.read_text())["plans"] if out.exists() else []
    kept = [r for r in earlier if r["model"] not in models or r["variant"] not in variants]
    cells = [(m, v, t) for m in models for v in variants for t in TARGETS]
    order = {cell: i for i, cell in enumerate((m, v, t) for m in LORA_MODELS for v in VARIANTS for t in TARGETS)}
    rows: list[dict] = []
    record = machine.record(measure=False)
    began = time.perf_counter()

    def write() -> None:
        done = sorted(kept + rows, key=lambda r: order[r["model"], r["variant"], r["target"]])
        settings = {
            "groups_per_step": GROUPS,
            "group_size": 7,
            "layout": "packed",
            "seq_len": SEQ_LEN,
            "prompt_len": PROMPT_LEN,
            "variants": VARIANTS,
            "targets": {k: {"devices": d, "chip": c, "hbm_gb": h} for k, (d, c, h) in TARGETS.items()},
            "remat_policies": list(REMATS),
        }
        out.write_text(json.dumps({"machine": record, "settings": settings, "plans": done}, indent=2) + "\n")
        return done

    def cell(args) -> None:
        row = search(*args)
        with _print_lock:
            rows.append(row)
            write()
        log(
            f"{len(rows)}/{len(cells)} {args[0]} {args[1]} {args[2]}: remat={row['remat']} "
            f"grad_accum={row['grad_accum']} total {row['total_gb']:.2f} GB, {'fits' if row['fits'] else 'does not fit'} "
            f"({time.perf_counter() - began:.0f} s so far)"
        )

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(cell, cells))
    print(lora_table(write()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(plan_one(json.loads(sys.argv[2]))))
    elif sys.argv[1:2] == ["--lora"]:
        lora_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
