"""kernels/bench.py end to end on the CPU: `--smoke` runs the benchmark code (inputs, every baseline,
forward and forward + backward, the markdown table and the plot) with the kernels in Triton's
interpreter, so a broken benchmark shows up in CI and not first on a GPU. Its times mean nothing.

The script's main() runs in the test process, with the command line in sys.argv: the smoke runs are
kernel tests, so they run in the interpreter's child process with every other kernel test file
(tests/conftest.py) instead of each starting a process that imports torch and triton again. The script
as a process is run by tests/test_kernels_compile.py.
"""
import sys
from pathlib import Path

import pytest
import torch

from conftest import INTERPRETER, kernels

import kernels.bench as bench


def test_kernels_in_the_interpreter(run_kernel_tests_in_interpreter):
    run_kernel_tests_in_interpreter(__file__)


def run_bench(monkeypatch, *args):
    """`python kernels/bench.py *args`, in this process."""
    monkeypatch.setattr(sys, "argv", ["kernels/bench.py", *map(str, args)])
    bench.main()


def table_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # without the header


@kernels
@pytest.mark.parametrize("kernel,args,sizes", [
    ("triangle", ["--sizes", "5", "8", "--heads", "2", "--dim", "16"], ["5", "8"]),  # bf16, the default
    ("radius", ["--atoms", "40", "--atoms-per-structure", "13", "--features", "16", "--rbf", "8"], ["40"]),
])
def test_smoke_run_writes_table_and_plot(kernel, args, sizes, tmp_path, monkeypatch):
    if not INTERPRETER:  # a GPU host: the interpreter's child process runs this
        pytest.skip("--smoke runs the kernels in Triton's interpreter")
    run_bench(monkeypatch, kernel, "--smoke", *args, "--out", tmp_path)
    rows = table_rows(tmp_path / f"bench_{kernel}.md")
    impls = {row[0] for row in rows}
    assert "triton (ours)" in impls and len(impls) >= 2  # the kernel and the naive baseline at least
    assert {(row[1], row[2]) for row in rows} == {(n, mode) for n in sizes for mode in ("fwd", "fwd+bwd")}
    for row in rows:  # every row measured: a time and a rate, no error message in place of the numbers
        assert float(row[3]) > 0 and float(row[4]) > 0, row
    assert (tmp_path / f"bench_{kernel}.png").stat().st_size > 0
    assert "not kernel performance" in (tmp_path / f"bench_{kernel}.md").read_text()


def test_without_gpu_or_interpreter_it_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="set TRITON_INTERPRET=1"):  # sys.exit(message): the message on stderr, status 1
        run_bench(monkeypatch, "triangle", "--smoke", "--out", tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA device") as stop:
            run_bench(monkeypatch, "triangle", "--out", tmp_path)
        assert "--smoke" in str(stop.value)
