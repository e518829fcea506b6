"""benchmarks/machine.py: the machine a benchmark ran on is read correctly from /proc/cpuinfo."""

import importlib.util

from conftest import REPO

_spec = importlib.util.spec_from_file_location("benchmark_machine", REPO / "benchmarks" / "machine.py")
machine = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(machine)

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma avx2 bmi2
processor\t: 1
model name\t: AMD EPYC 7B13
"""
SAPPHIRE_RAPIDS = "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: sse4_2 avx avx2 fma avx512f avx512bw amx_tile\n"


def test_cpuinfo_names_the_model_and_the_widest_vector_extension():
    zen3 = machine.parse_cpuinfo(ZEN3)
    assert zen3 == {
        "model": "AMD EPYC 7B13",
        "vector_extensions": ["sse4_2", "avx", "avx2", "fma", "f16c"],
        "isa": "AVX2",
    }
    spr = machine.parse_cpuinfo(SAPPHIRE_RAPIDS)
    assert spr["isa"] == "AVX-512" and "amx_tile" in spr["vector_extensions"]
    assert machine.isa_class(["sse4_2"]) == "older"


def test_fraction_of_peak_uses_the_library_and_dtype_measured():
    record = {"matmul": {"float32": {"jax": {"peak_gflops": 200.0}, "torch": {"peak_gflops": 250.0}}}}
    assert machine.fraction_of_peak(50e9, record, "jax") == 0.25
    assert machine.fraction_of_peak(50e9, record, "torch") == 0.2
    assert machine.fraction_of_peak(50e9, record, "jax", "bfloat16") is None
    assert machine.fraction_of_peak(50e9, {}, "jax") is None
