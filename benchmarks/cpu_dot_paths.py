"""Which library runs XLA:CPU's float32 matrix products, and how fast each available path is against
torch on this machine, at the shapes of `machine.MATMUL_SHAPES`.

    .venv/bin/python benchmarks/cpu_dot_paths.py

Each variant runs in its own process (XLA flags and library environment variables are read at start-up):

- `ynnpack`: XLA's default; the dot becomes a `__ynn_fusion` (YNNPACK, which picks its kernels from the
  CPU's own features at run time).
- `eigen`: `--xla_cpu_experimental_ynn_fusion_type=` (no YNNPACK fusions): XLA's own dot thunk, whose
  Eigen contraction runs oneDNN's kernels (`ONEDNN_MAX_CPU_ISA` changes its speed).
- `ynnpack, weights [n, k]`: the default with the right operand stored transposed (`a @ b.T`).
- `... ISA capped at AVX2` (AVX-512 machines only): the Eigen path with `ONEDNN_MAX_CPU_ISA=AVX2` and torch
  with `MKL_ENABLE_INSTRUCTIONS=AVX2`, an approximation of an AVX2-only machine on this one (YNNPACK
  cannot be capped: it reads CPUID itself).

Prints a table and writes benchmarks/results/cpu_dot_paths_<isa>.json with the machine record.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import machine  # benchmarks/machine.py, beside this script

NO_YNN = "--xla_cpu_experimental_ynn_fusion_type="
VARIANTS = {
    "ynnpack": ("jax", "", {}, False),
    "eigen": ("jax", NO_YNN, {}, False),
    "ynnpack, weights [n, k]": ("jax", "", {}, True),
    "torch": ("torch", "", {}, False),
}
CAPPED = {
    "eigen, ISA capped at AVX2": ("jax", NO_YNN, {"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
    "torch, ISA capped at AVX2": (
        "torch",
        "",
        {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
        False,
    ),
}


def measure_one(library: str, transposed: bool) -> dict:
    """GFLOP/s per shape in this process, and (JAX) the fusion kinds XLA chose for the product."""
    rates, kinds = {}, set()
    for m, k, n in machine.MATMUL_SHAPES:
        name = f"{m}x{k}x{n}"
        if library == "torch":
            rates[name] = round(machine.torch_matmul_gflops(m, k, n), 1)
            continue
        import jax.numpy as jnp

        a = jnp.ones((m, k), jnp.float32)
        b = jnp.ones((n, k) if transposed else (k, n), jnp.float32)
        text = machine.jax_product(transposed).lower(a, b).compile().as_text()
        kinds |= set(re.findall(r'"kind":"(__\w+)"', text)) or {"xla dot thunk"}
        rates[name] = round(machine.jax_matmul_gflops(m, k, n, transposed=transposed), 1)
    return {"gflops": rates, "fusion_kinds": sorted(kinds)}


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--one":
        print("RESULT " + json.dumps(measure_one(sys.argv[2], sys.argv[3] == "1")))
        return
    record = machine.record(measure=False)
    variants = dict(VARIANTS, **(CAPPED if record["cpu"]["isa"] == "AVX-512" else {}))
    results = {}
    for name, (library, flags, extra_env, transposed) in variants.items():
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(), **extra_env)
        cmd = [sys.executable, __file__, "--one", library, str(int(transposed))]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
        results[name] = {
            "library": library,
            "xla_flags": flags,
            "env": extra_env,
            **json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]),
        }
    shapes = ["x".join(map(str, s)) for s in machine.MATMUL_SHAPES]
    print(f"on {machine.describe(record)}; GFLOP/s, float32, {record['cpu']['cores']} threads")
    print(f"| path | {' | '.join(shapes)} | XLA chose |")
    print(f"|---|{'---|' * len(shapes)}---|")
    for name, r in results.items():
        cells = " | ".join(f"{r['gflops'][s]:.0f}" for s in shapes)
        print(f"| {name} | {cells} | {', '.join(r.get('fusion_kinds', [])) or '-'} |")
    out_file = Path(__file__).parent / "results" / f"cpu_dot_paths_{record['cpu']['isa'].lower()}.json"
    out_file.write_text(json.dumps({"machine": record, "paths": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
