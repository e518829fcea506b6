"""Where a benchmark ran: the CPU (model, cores, vector extensions) or the GPU, the library versions and
XLA flags, and the machine's own measured matrix-product rate in JAX and in torch.

    .venv/bin/python benchmarks/machine.py        # prints the record as JSON

Every script in `benchmarks/` stores `record()` under "machine" in its results file and reports its own
rate as a fraction of the measured peak of its library (`fraction_of_peak`). Machines of one kind differ:
XLA:CPU's products run about three times faster with AVX-512 than with AVX2 only, so a ratio means
little without the machine it was measured on.

The rate is the median of timed runs of `a @ b` (float32 on the CPU; float32 and bfloat16 on a GPU) at the
shapes of `MATMUL_SHAPES`: a decode step's rows, a training micro-batch's rows, a large square product.
JAX calls are dispatched back to back and waited for together; torch runs with its default threads.
"""

from __future__ import annotations

import json
import os
import platform
import time

VECTOR_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "avx_vnni",
)  # fmt: skip
MATMUL_SHAPES = ((24, 576, 1536), (256, 576, 1536), (2048, 2048, 2048))  # (m, k, n): [m, k] @ [k, n]
LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "torch", "transformers")


def isa_class(flags) -> str:
    """The widest vector extension of x86 flags: "AVX-512", "AVX2", "AVX" or "older"."""
    flags = set(flags)
    named = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
    return next((name for flag, name in named if flag in flags), "older")


def parse_cpuinfo(text: str) -> dict:
    """Model name and vector extensions from the text of /proc/cpuinfo (its first processor)."""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags", "").split()
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vector_extensions": [f for f in VECTOR_FLAGS if f in flags],
        "isa": isa_class(flags),
    }


def cpu() -> dict:
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"model": platform.processor() or platform.machine(), "vector_extensions": [], "isa": "unknown"}
    return {**info, "cores": os.cpu_count(), "arch": platform.machine()}


def gpu() -> dict | None:
    """The accelerator JAX runs on (None on a CPU-only machine)."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return None
    return {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()}


def versions() -> dict:
    import importlib

    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name] = importlib.import_module(name).__version__
        except (ImportError, AttributeError):
            found[name] = None
    return found


def median_seconds(run, min_seconds: float = 0.5) -> float:
    """Median time of one call of `run()` (which waits for its result), over at least 5 calls and
    `min_seconds`, after one untimed call."""
    run()
    times, began = [], time.perf_counter()
    while len(times) < 5 or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def jax_product(transposed: bool = False):
    """The jitted `a @ b`, or `a @ b.T` with the right operand stored as [n, k]."""
    import jax

    return jax.jit(lambda a, b: a @ (b.T if transposed else b))


def jax_matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", calls: int = 8, transposed=False) -> float:
    import jax

    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (n, k) if transposed else (k, n), dtype)
    product = jax_product(transposed)

    def run():
        jax.block_until_ready([product(a, b) for _ in range(calls)])

    return calls * 2 * m * k * n / median_seconds(run) / 1e9


def torch_matmul_gflops(m: int, k: int, n: int, dtype: str = "float32", calls: int = 8) -> float:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(m, k, dtype=getattr(torch, dtype), device=device)
    b = torch.randn(k, n, dtype=getattr(torch, dtype), device=device)

    def run():
        with torch.no_grad():
            for _ in range(calls):
                torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()

    return calls * 2 * m * k * n / median_seconds(run) / 1e9


def matmul_rates(dtype: str = "float32", shapes=MATMUL_SHAPES) -> dict:
    """GFLOP/s of JAX and torch at each shape, and the best of each ("peak")."""
    rates = {}
    for library, measure in (("jax", jax_matmul_gflops), ("torch", torch_matmul_gflops)):
        try:
            per_shape = {"x".join(map(str, s)): round(measure(*s, dtype=dtype), 1) for s in shapes}
        except ImportError:
            continue
        rates[library] = {"gflops": per_shape, "peak_gflops": max(per_shape.values())}
    return rates


def record(measure: bool = True) -> dict:
    """The machine as a results file stores it; `measure=False` leaves out the matrix-product rates."""
    result = {
        "cpu": cpu(),
        "gpu": gpu(),
        "versions": versions(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    if measure:
        dtypes = ("float32", "bfloat16") if result["gpu"] else ("float32",)
        result["matmul"] = {dtype: matmul_rates(dtype) for dtype in dtypes}
    return result


def peak_gflops(machine: dict, library: str, dtype: str = "float32") -> float | None:
    return machine.get("matmul", {}).get(dtype, {}).get(library, {}).get("peak_gflops")


def fraction_of_peak(flops_per_s: float, machine: dict, library: str, dtype: str = "float32") -> float | None:
    """`flops_per_s` as a share of the library's measured peak on this machine (None when not measured)."""
    peak = peak_gflops(machine, library, dtype)
    return round(flops_per_s / (peak * 1e9), 4) if peak else None


def describe(machine: dict) -> str:
    """One line, e.g. "Intel(R) Xeon(R) Processor, 2 cores, AVX-512; f32 products: jax 262, torch 332 GFLOP/s"."""
    where = machine["gpu"]["kind"] if machine.get("gpu") else None
    c = machine["cpu"]
    line = where or f"{c['model']}, {c['cores']} cores, {c['isa']}"
    peaks = {lib: peak_gflops(machine, lib) for lib in ("jax", "torch")}
    if any(peaks.values()):
        line += "; f32 products: " + ", ".join(f"{lib} {p:.0f}" for lib, p in peaks.items() if p) + " GFLOP/s"
    return line


if __name__ == "__main__":
    machine = record()
    print(json.dumps(machine, indent=2))
    print(describe(machine))


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (`ru_maxrss`)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vm_hwm_mb() -> float:
    """The process's peak resident memory since it started or since `reset_peak` (Linux `VmHWM`)."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) / 1024


def reset_peak() -> bool:
    """Resets `VmHWM` to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


COMPILED: list[str] = []  # the functions XLA compiled so far (`count_compiles`)


def count_compiles() -> None:
    """Records every XLA compilation in `COMPILED`, so that a timed run that compiled can be told apart."""
    import jax

    def listener(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            COMPILED.append(str(kwargs.get("fun_name", "?")))

    jax.monitoring.register_event_duration_secs_listener(listener)


def median_sampling_run(run, repeats: int) -> dict:
    """`run()` -> (lengths, decode steps), once untimed (compiles), then `repeats` timed calls; a call that
    compiled is left out (at most two, their compilations listed) and another made in its place."""
    import numpy as np

    run()
    seconds, tokens, steps, compiled = [], [], [], []
    for _ in range(repeats + 2):
        began, before = time.perf_counter(), len(COMPILED)
        lengths, step_count = run()
        if len(COMPILED) > before and len(compiled) < 2:  # left out, at most twice
            compiled.append(COMPILED[before:])
            continue
        seconds.append(time.perf_counter() - began)
        tokens.append(int(np.sum(lengths)))
        steps.append(int(step_count))
        if len(seconds) == repeats:
            break
    median = float(np.median(seconds))
    return {
        "seconds": median,
        "seconds_each": seconds,
        "tokens": tokens[0],
        "tokens_each": tokens,
        "decode_steps": steps[0],
        "tokens_per_s": tokens[0] / median,
        "ms_per_step": 1e3 * median / steps[0],
        "runs_that_compiled": compiled,
    }
