"""Shared fixtures: a QM9 cache built from the small real fixture (300 real QM9 molecules), so no test
needs the full data set or a download."""
import os
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch

# One torch thread in the test process, as every script the tests start runs (OMP_NUM_THREADS=1): the tiny models
# here are all synchronisation at two threads (an overfit test of a crystal backbone: 1.4 s on one thread, 16 s on
# two), and every in-process result is then computed the same way on any machine, whatever a test ran before it.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import models/ the way the scripts do: from the repository root

from forkserver import run_python  # noqa: E402
from models.molecules import read_qm9pack_csv, save_cache  # noqa: E402

QM9_FIXTURE = ROOT / "tests" / "data" / "qm9_sample.csv"


def run_script(*args, env: dict | None = None, check: bool = True, cwd: Path = ROOT,
               timeout: float | None = None) -> subprocess.CompletedProcess:
    """`python ARGS...` run from the repository root (or cwd) on one thread, with env's variables added, forked from
    a warm server (tests/forkserver.py); with check, a failure raises with the command's output."""
    proc = run_python(args, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def qm9_dir(tmp_path_factory) -> Path:
    """A data dir whose qm9.npz holds the fixture molecules; pass it as --data-dir / data_dir."""
    d = tmp_path_factory.mktemp("qm9")
    save_cache(read_qm9pack_csv([QM9_FIXTURE]), d / "qm9.npz")
    return d


@pytest.fixture(scope="session")
def carbon_reference_cache():
    """write(data_dir): puts CHGNet's carbon reference where chgnet_hull reads it (data_dir/chgnet_elements.npz), for
    the tests whose hull needs one but which do not test how it is computed. chgnet_hull relaxes six prototypes for up
    to 300 FIRE steps (half a minute on a slow core) and keeps the lowest, diamond, which converges in 7: relaxing
    diamond alone gives the same reference to the bit."""
    import numpy as np

    from models import crystal_stability

    diamond = dict(crystal_stability.element_prototypes(6))["diamond"]
    _, energy, _, converged = crystal_stability.relax([diamond], steps=300, workers=1, progress=False)[0]
    assert converged

    record = crystal_stability.element_cache_record({6: (energy, "diamond")}, crystal_stability.chgnet_version())

    def write(data_dir: Path) -> None:
        np.savez(data_dir / "chgnet_elements.npz", **record)
    return write


# Kernel tests (`kernels`): on a GPU they run in the test process; without one, in a child process started with
# TRITON_INTERPRET=1 (run_kernel_tests_in_interpreter), where they run on the CPU in Triton's interpreter.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"


# The test files that take longest, longest first: `pytest -p no:cacheprovider tests --durations=0` on one core, summed
# per file (2026-12-07 on the AMD EPYC machine, 1,418 s in all, 433 of them step_bench's peak until 82ce97f). Under
# `-n 2 --dist loadfile` every file runs whole on one worker, and a worker takes the next file when it runs low, so
# starting with the long ones leaves short ones to even out the end; xdist's own order (most tests first) could leave
# a long file for last, one worker busy while the other idles.
SLOWEST_FILES = ("test_crystals.py", "test_crash_safety.py", "test_scaling.py", "test_triangle_attention.py",
                 "test_processes.py", "test_hostile_evaluation.py", "test_train.py", "test_condition.py", "test_step_bench.py",
                 "test_radius_graph.py", "test_train_ff.py", "test_report.py", "test_hostile.py", "test_label.py",
                 "test_pretrained.py", "test_pretrained_students.py", "test_outside_samples.py", "test_forcefield.py",
                 "test_kernels_compile.py", "test_pairformer.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "kernels: runs the Triton kernels (on a GPU, or in Triton's interpreter)")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: hand out files in the collection's order (below)
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    """The slowest files first (SLOWEST_FILES), the rest after them as collected; within a file, the order is kept."""
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def kernels(test):
    """Marks a test of the Triton kernels: the interpreter's child process runs these and only these (the plain
    PyTorch tests of a file already ran in its parent); a process with neither a GPU nor the interpreter skips them."""
    skip = pytest.mark.skipif(DEVICE == "cpu" and not INTERPRETER,
                              reason="no GPU: runs in run_kernel_tests_in_interpreter's child process")
    return skip(pytest.mark.kernels(test))


@pytest.fixture(scope="session")
def run_kernel_tests_in_interpreter(tmp_path_factory):
    """check(test_file): asserts that the file's `kernels` tests all passed in a child pytest whose triton was
    imported under TRITON_INTERPRET=1.

    Triton reads the variable when @triton.jit decorates a function (its own tl.* helpers included, at import), so
    it cannot be switched on inside a process that has already imported triton. One child per launcher file (a test
    file whose tests take this fixture), started by that file's launcher: under pytest-xdist each worker runs only the
    files it was given, so no kernel test runs twice, at the cost of one torch and triton import (about 3 s) a file."""
    if INTERPRETER:
        pytest.skip("this process is the interpreter run")

    def check(test_file: str) -> None:
        report = tmp_path_factory.mktemp("interpreter") / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "kernels", "--rootdir", str(ROOT),
               f"--junitxml={report}", str(test_file)]
        run = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                             timeout=1800)
        output = run.stdout[-6000:] + run.stderr[-3000:]
        # Per test: why it did not pass, or "". A skip counts: there every kernel test must run.
        mine: list[str] = []
        if run.returncode in (0, 1):  # the tests ran (1: some failed); any other code stopped the whole run: see output
            for case in ElementTree.parse(report).iter("testcase"):
                mine.append("\n".join(f"{case.get('name')}: {e.tag} {e.get('message', '')}\n{(e.text or '')[-3000:]}"
                                      for e in case if e.tag in ("failure", "error", "skipped")))
        assert mine, f"no kernel test of {test_file} ran in the interpreter (exit code {run.returncode}):\n{output}"
        bad = [line for line in mine if line]
        assert not bad, f"{len(bad)} of {len(mine)} kernel tests in the interpreter:\n\n" + "\n\n".join(bad)

    return check

