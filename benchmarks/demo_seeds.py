"""The built-in demo over several seeds: mean and spread of every metric per method.

    .venv/bin/python benchmarks/demo_seeds.py [--seeds 0 1 2] [--run-root runs/demo_seeds]

Each seed is a full `aft-jax pipeline --config configs/demo.py --config.seed=S` run (resumable: rerun the
script to finish interrupted seeds). Prints a Markdown table and writes benchmarks/results/demo_seeds.json,
with the machine (`machine.py`) and each seed's pipeline time (the stages' seconds, summed).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script
import numpy as np

REPO = Path(__file__).resolve().parents[1]
METRICS = ["accuracy", "self_consistency", "assess_macro", "assess_micro", "ppl_pos", "ppl_neg"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-root", default=str(REPO / "runs" / "demo_seeds"))
    args = parser.parse_args()
    per_seed = {}
    for seed in args.seeds:
        run_dir = Path(args.run_root) / f"seed{seed}"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "aft_jax.cli",
                "pipeline",
                "--config",
                str(REPO / "configs" / "demo.py"),
                f"--config.seed={seed}",
                f"--config.run_dir={run_dir}",
            ],
            check=True,
        )
        per_seed[seed] = json.loads((run_dir / "metrics.json").read_text())
        per_seed[seed]["_groups"] = json.loads((run_dir / "groups" / "train" / "stats.json").read_text())
        stages = json.loads((run_dir / "manifest.json").read_text())["stages"].values()
        per_seed[seed]["_seconds"] = round(sum(stage.get("seconds", 0.0) for stage in stages), 1)
    methods = [m for m in per_seed[args.seeds[0]] if not m.startswith("_")]
    summary = {
        m: {
            k: {
                "mean": float(np.mean([per_seed[s][m][k] for s in args.seeds])),
                "std": float(np.std([per_seed[s][m][k] for s in args.seeds], ddof=1)) if len(args.seeds) > 1 else 0.0,
                "values": [per_seed[s][m][k] for s in args.seeds],
            }
            for k in METRICS
        }
        for m in methods
    }
    print(f"\n{len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}): mean ± std")
    print("| method | " + " | ".join(METRICS) + " |")
    print("|---" * (len(METRICS) + 1) + "|")
    for m in methods:
        cells = []
        for k in METRICS:
            scale = 100 if not k.startswith("ppl") else 1
            cells.append(
                f"{scale * summary[m][k]['mean']:.1f} ± {scale * summary[m][k]['std']:.1f}"
                if scale == 100
                else f"{summary[m][k]['mean']:.3f} ± {summary[m][k]['std']:.3f}"
            )
        print(f"| {m} | " + " | ".join(cells) + " |")
    out = REPO / "benchmarks" / "results" / "demo_seeds.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": machine.record(),
                "seeds": args.seeds,
                "summary": summary,
                "groups": {s: per_seed[s]["_groups"] for s in args.seeds},
                "pipeline_seconds": {s: per_seed[s]["_seconds"] for s in args.seeds},
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
