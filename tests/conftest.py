"""Shared fixtures: a QM9 cache built from the small real fixture (300 real QM9 molecules), so no test
needs the full data set or a download."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import models/ the way the scripts do: from the repository root

from models.molecules import read_qm9pack_csv, save_cache  # noqa: E402

QM9_FIXTURE = ROOT / "tests" / "data" / "qm9_sample.csv"


@pytest.fixture(scope="session")
def qm9_dir(tmp_path_factory) -> Path:
    """A data dir whose qm9.npz holds the fixture molecules; pass it as --data-dir / data_dir."""
    d = tmp_path_factory.mktemp("qm9")
    save_cache(read_qm9pack_csv([QM9_FIXTURE]), d / "qm9.npz")
    return d


# Kernel tests: on a GPU they run in the test process; without one, in a child process started with
# TRITON_INTERPRET=1 (run_kernel_tests_in_interpreter), where they run on the CPU in Triton's interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
kernels = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETER,
                             reason="no GPU: runs in test_kernels_in_the_interpreter's child process")


def run_kernel_tests_in_interpreter(test_file: str) -> None:
    """Run a kernel test file again in a child pytest whose triton is imported under TRITON_INTERPRET=1.

    Triton reads the variable when @triton.jit decorates a function (its own tl.* helpers included, at
    import), so it cannot be switched on inside a process that has already imported triton."""
    if INTERPRETER:
        pytest.skip("this process is the interpreter run")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "1 skipped" in summary, summary  # only the launcher test skips there
