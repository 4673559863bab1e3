"""kernels/bench.py end to end on the CPU: `--smoke` runs the benchmark code (inputs, every baseline,
forward and forward + backward, the markdown table and the plot) with the kernels in Triton's
interpreter, so a broken benchmark shows up in CI and not first on a GPU. Its times mean nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, interpret=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "kernels/bench.py", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def table_rows(path: Path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]  # without the header


@pytest.mark.parametrize("kernel,args,sizes", [
    ("triangle", ["--sizes", "5", "20", "--heads", "2", "--dim", "16"], ["5", "20"]),  # bf16, the default
    ("radius", ["--atoms", "40", "--atoms-per-structure", "13", "--features", "16", "--rbf", "8"], ["40"]),
])
def test_smoke_run_writes_table_and_plot(kernel, args, sizes, tmp_path):
    proc = bench(kernel, "--smoke", *args, "--out", tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows(tmp_path / f"bench_{kernel}.md")
    impls = {row[0] for row in rows}
    assert "triton (ours)" in impls and len(impls) >= 2  # the kernel and the naive baseline at least
    assert {(row[1], row[2]) for row in rows} == {(n, mode) for n in sizes for mode in ("fwd", "fwd+bwd")}
    for row in rows:  # every row measured: a time and a rate, no error message in place of the numbers
        assert float(row[3]) > 0 and float(row[4]) > 0, row
    assert (tmp_path / f"bench_{kernel}.png").stat().st_size > 0
    assert "not kernel performance" in (tmp_path / f"bench_{kernel}.md").read_text()


def test_without_gpu_or_interpreter_it_says_what_to_do(tmp_path):
    proc = bench("triangle", "--smoke", "--out", tmp_path, interpret=False)
    assert proc.returncode != 0 and "set TRITON_INTERPRET=1" in proc.stderr
    if not torch.cuda.is_available():
        proc = bench("triangle", "--out", tmp_path, interpret=False)
        assert proc.returncode != 0 and "needs a CUDA device" in proc.stderr and "--smoke" in proc.stderr
