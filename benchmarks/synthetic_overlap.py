"""Does the synthetic study measure memorised arithmetic? Accuracy on test questions whose numbers (start and
events, names and items aside) also occur in a training question of the same seed, against those whose
numbers do not, per model, from a study's per-question results.

    .venv/bin/python benchmarks/synthetic_overlap.py benchmarks/results/reproduction/from_vft [--train 1000]

Writes `<study>/overlap.json` and prints a Markdown table: each subset's accuracy (mean over seeds) and
each model's difference from VFT on it (95% t-interval over seeds, `aft_jax.study.stats.paired_t`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from aft_jax.data.tasks import get_task
from aft_jax.study.stats import paired_t


def signature(example) -> tuple:
    events = example.meta["events"]
    start = int(example.question.split(" has ")[1].split(" ")[0])
    return start, tuple(sorted(map(tuple, events["buy"]))), tuple(sorted(events["find"])), tuple(sorted(events["give"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("study", type=Path)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--validation", type=int, default=300)
    args = parser.parse_args()
    study = json.loads((args.study / "study.json").read_text())
    rows = {m: {"seen": [], "unseen": []} for m in study["models"]}
    shares = []
    for seed in study["seeds"]:
        task = get_task("synthetic", num_train=args.train, num_validation=args.validation, num_test=1000, seed=seed)
        train = {signature(e) for e in task.load("train")}
        test = {e.id: signature(e) in train for e in task.load("test")}
        for model in study["models"]:
            pq = json.loads((args.study / f"seed-{seed}" / "eval" / f"{model}.json").read_text())["per_question"]
            seen = np.array([test[i] for i in pq["ids"]])
            correct = np.array(pq["correct"], float)
            rows[model]["seen"].append(float(correct[seen].mean()))
            rows[model]["unseen"].append(float(correct[~seen].mean()))
        shares.append(float(seen.mean()))
    differences = {
        m: {k: paired_t(rows[m][k], rows["vft"][k]).__dict__ for k in ("seen", "unseen")} for m in rows if m != "vft"
    }
    out = {"seen_share": shares, "accuracy": rows, "difference_from_vft": differences}
    (args.study / "overlap.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"test questions whose numbers occur in training: {100 * np.mean(shares):.0f}% (mean over seeds)\n")
    print("| model | accuracy, seen numbers | - vft | accuracy, unseen numbers | - vft |\n|---|---|---|---|---|")
    for model, r in rows.items():
        cells = []
        for k in ("seen", "unseen"):
            d = differences.get(model, {}).get(k)
            cells += [
                f"{100 * np.mean(r[k]):.1f}",
                f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]" if d else "",
            ]
        print(f"| {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
