"""kernels/student_bench.py end to end: a small PaiNN student of EMT labels, eager and compiled, beside its teacher;
the table has a row per size group with every column filled. Its times mean nothing here."""
from conftest import run_script as run


def test_student_bench_times_eager_compiled_and_teacher(qm9_dir, tmp_path):
    run("label.py", "qm9:valid", "--limit", 12, "--teacher", "emt", "--out", tmp_path / "labels.h5",
        env={"MOLGEN_DATA": str(qm9_dir)})
    run("train.py", "--task", "ff", "--data", tmp_path / "labels.h5", "--preset", "tiny", "--student", "painn",
        "--iters", 4, "--out", tmp_path / "ff")
    out = run("kernels/student_bench.py", tmp_path / "ff/weights.pt", tmp_path / "labels.h5", "--structures", 2,
              "--repeats", 1).stdout
    assert "painn student of emt" in out
    rows = [line for line in out.splitlines() if line.startswith("| molecules")]
    assert len(rows) == 3, out
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        one_at_a_time, batched = cells[1].split(" / ")  # EMT cannot batch: no batched teacher, no like-for-like ratio
        assert len(cells) == 7 and float(one_at_a_time.replace(",", "")) > 0 and batched == "–"
        for cell in cells[2:6]:
            assert " / " in cell and "(x" in cell
        assert cells[6].startswith("x") and cells[6].count(" / x") == 1 and cells[6].endswith(" / –")
