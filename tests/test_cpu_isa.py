"""The CPU kernels whose loops run along contiguous channels or pixels are
compiled for AVX-512, AVX2 and baseline x86-64 (csrc/common/cpu_isa.h), and
a process runs only one of them: rerun the CPU tests of those ops with each,
chosen through PyTorch's own switch, ATEN_CPU_CAPABILITY."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_ISAS = {"default": "baseline", "avx2": "avx2", "avx512": "avx512"}  # ATEN_CPU_CAPABILITY -> ours
# torch.compile is left out: Inductor's own C++ does not build under
# ATEN_CPU_CAPABILITY=default on an AVX-512 machine (a PyTorch limitation).
SELECTION = "cpu and not compile"


@pytest.mark.parametrize("isa", list(CPU_ISAS))
def test_every_cpu_isa_variant_matches_torch(isa):
    order = list(CPU_ISAS)
    have = torch.backends.cpu.get_cpu_capability().lower()
    if isa != "default" and (have not in order or order.index(isa) > order.index(have)):
        pytest.skip(f"this CPU runs {have}, not {isa}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    probe = subprocess.run([sys.executable, "-c", "import torch, alexnet_ext; print(torch.ops.alexnet_ext._cpu_isa())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[-1] == CPU_ISAS[isa]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.join(HERE, "test_lrn.py"), os.path.join(HERE, "test_maxpool.py"),
                          os.path.join(HERE, "test_fused.py"), "-k", SELECTION],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:]
    assert " passed" in res.stdout and " failed" not in res.stdout
