"""bench/fresh_machine.py names the CPU as fastsae.ops.cpu_gemm does (standard library only: it runs before torch
is installed)."""

import importlib.util
from pathlib import Path

_FILE = Path(__file__).parents[2] / "bench" / "fresh_machine.py"
_SPEC = importlib.util.spec_from_file_location("fresh_machine", _FILE)
fresh_machine = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fresh_machine)


def test_a_bare_hypervisor_name_gains_family_model_and_isa(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
                    "flags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: other\n")
    assert fresh_machine.cpu_model(info) == "AMD EPYC (family 25 model 17, AVX512)"
    info.write_text("cpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2\n")
    assert fresh_machine.cpu_model(info) == "AMD EPYC (family 25 model 1, AVX2)"
    info.write_text("model name\t: Some CPU\n")
    assert fresh_machine.cpu_model(info) == "Some CPU"
