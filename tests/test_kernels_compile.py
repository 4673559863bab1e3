"""The Triton kernels compile for a real GPU (sm_90), checked without one: `kernels/bench.py compile
--quick` compiles one configuration of every kernel ahead of time with Triton's NVIDIA backend and the
ptxas that ships with triton. The interpreter tests cannot catch code that only the interpreter accepts,
nor a configuration that needs more shared memory than the GPU has; this does.

It runs the script in a child process, as a user would (the only test that does: tests/test_bench.py
calls its main()): the compiler needs triton imported without TRITON_INTERPRET=1, and its own cache
directory keeps it from writing to ~/.triton (bench.py compile never takes a cached binary).
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def _ptxas_missing() -> str:
    """Why the NVIDIA backend cannot compile here, or "" if it can."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(90)
    except Exception as e:  # no NVIDIA backend in this triton build, or no ptxas binary
        return f"triton's NVIDIA backend or its ptxas is unavailable: {type(e).__name__}: {e}"
    return ""


PTXAS_MISSING = _ptxas_missing()


@pytest.mark.skipif(bool(PTXAS_MISSING), reason=PTXAS_MISSING)
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")
    run = subprocess.run([sys.executable, "kernels/bench.py", "compile", "--quick"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if "| sm_90 |" in line]
    assert rows and all("| ok |" in row for row in rows), run.stdout
