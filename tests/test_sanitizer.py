"""compute-sanitizer memcheck and racecheck on every op's small CUDA case
(tests/sanitizer_cases.py); skipped without a GPU or the tool."""
import os
import shutil
import subprocess
import sys

import pytest

from op_testing import requires_cuda
from sanitizer_cases import CASES

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sanitizer_cases.py")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compute_sanitizer_clean(tool, case):
    proc = subprocess.run(["compute-sanitizer", f"--tool={tool}", "--error-exitcode=3", sys.executable, SCRIPT, case],
                          capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out
