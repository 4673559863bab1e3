"""kernels/denormal_bench.py end to end on the QM9 fixture: a generator's, an oracle's and a student's step are timed
with denormals kept and flushed, and the table names each. Its times mean nothing here."""
from conftest import run_script as run


def test_denormal_bench_times_each_kind_of_checkpoint(qm9_dir, tmp_path):
    run("train.py", "--preset", "tiny", "--iters", 4, "--condition", "alpha", "--data-dir", qm9_dir, "--out", tmp_path / "gen")
    run("train.py", "--task", "oracle", "--condition", "alpha", "mu", "--preset", "tiny", "--iters", 4, "--data-dir", qm9_dir,
        "--out", tmp_path / "oracle")
    run("label.py", "qm9:valid", "--limit", 12, "--teacher", "emt", "--out", tmp_path / "labels.h5",
        env={"MOLGEN_DATA": str(qm9_dir)})
    run("train.py", "--task", "ff", "--data", tmp_path / "labels.h5", "--preset", "tiny", "--iters", 4, "--out", tmp_path / "ff")
    out = run("kernels/denormal_bench.py", tmp_path / "gen/ckpt.pt", tmp_path / "oracle/weights.pt", tmp_path / "ff/weights.pt",
              "--batch", 8, "--repeats", 1, "--data-dir", qm9_dir).stdout
    rows = [line for line in out.splitlines() if line.startswith("| `")]
    assert len(rows) == 3, out
    assert "gen step, 8 molecules" in rows[0] and "oracle step, 8 molecules" in rows[1]
    assert "student energy and forces, 8 molecules in one batch" in rows[2]
    for row in rows:
        kept, flushed, ratio = (cell.strip() for cell in row.split("|")[3:6])
        assert float(kept) >= 0 and float(flushed) >= 0 and ratio.endswith(" x")
