"""The distillation loop end to end on real teacher labels: ASE's EMT labels rattled QM9 fixture molecules and
strained copper crystals into a labels file; train.py --task ff trains a tiny student on it (exact resume, DDP),
evaluate.py --task ff scores it, and label.py runs it as a teacher. Bad labels files give clear errors."""
import importlib.util
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import QM9_FIXTURE, run_script as run
from models.checkpoint import CheckpointError, load_checkpoint, load_student
from models.forcefield import student_calculator
from models.molecules import read_qm9pack_csv
from models.labelled_data import LabelledStructures, is_validation
from models.labels import LabelsError, LabelWriter, read_labels
from models.teachers import get_teacher

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--task", "ff", "--preset", "tiny", "--iters", "30", "--batch-size", "8", "--log-every", "5", "--eval-every", "15",
        "--ckpt-every", "10", "--val-fraction", "0.2"]


def emt_rows(n_molecules=40, n_crystals=20, seed=0, prefix=""):
    """EMT labels (H, C, N, O and Cu are in its parameters) of rattled QM9 molecules and strained, rattled Cu."""
    teacher = get_teacher("emt")
    rng = np.random.default_rng(seed)
    qm9 = read_qm9pack_csv([QM9_FIXTURE])
    molecules = [qm9.to_atoms(i) for i in range(len(qm9)) if set(qm9.to_atoms(i).numbers) <= {1, 6, 7, 8}][:n_molecules]
    crystals = [bulk("Cu", "fcc", a=3.6, cubic=bool(k % 2)).repeat((1 + k % 2, 1, 1)) for k in range(n_crystals)]
    rows = []
    for k, a in enumerate(molecules + crystals):
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        if a.pbc.any():
            a.set_cell(a.cell.array * (1 + rng.normal(0, 0.02)), scale_atoms=True)
        e, f, s = teacher.label(a)
        rows.append(dict(numbers=a.numbers, positions=a.positions, forces=f, energy=e, stress=s, cell=a.cell.array,
                         pbc=a.pbc, source="emt-fixture", key=f"{prefix}{'cu' if a.pbc.any() else 'mol'}{k}"))
    return teacher, rows


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    path = tmp_path_factory.mktemp("labels") / "emt.h5"
    teacher, rows = emt_rows()
    with LabelWriter(path, teacher.name, teacher.version) as w:
        w.append(rows, 1.0)
    return path


@pytest.fixture(scope="module")
def student(labels, tmp_path_factory):
    out = tmp_path_factory.mktemp("ff") / "full"
    run("train.py", *TINY, "--data", labels, "--out", out)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_student_trains_and_logs_validation_errors_and_data_wait(student, labels):
    log = records(student)
    losses = [r["loss"] for r in log if "loss" in r]
    assert [r["step"] for r in log if "loss" in r] == list(range(5, 31, 5))
    assert losses[-1] < losses[0] / 2, losses
    assert all(0 <= r["data_wait"] < 1 and r["structures_per_s"] > 0 for r in log if "loss" in r)
    evals = [r for r in log if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert all(r["val_force_mae_mev_per_a"] > 0 and r["val_energy_mae_mev_per_atom"] >= 0 and "val_stress_mae_gpa" in r
               for r in evals)
    assert evals[-1]["val_force_mae_mev_per_a"] < evals[0]["val_force_mae_mev_per_a"]
    text = (student / "train.log").read_text()
    assert "labelled by emt" in text and "data wait" in text
    ckpt = load_checkpoint(student / "ckpt.pt", task="ff")
    assert ckpt["teacher"] == "emt" and ckpt["data"] == [str(labels)] and ckpt["model_config"]["elements"] == [1, 6, 7, 8, 29]
    # the split is by key: the validation structures are exactly those whose key hashes to it
    lab = read_labels(labels)
    assert ckpt["n_valid"] == int(is_validation(lab["key"], 0.2).sum()) and ckpt["n_train"] + ckpt["n_valid"] == len(lab["key"])


def test_student_trains_on_molecules_alone(tmp_path):
    """A labels file of molecules only: no batch has a cell, so no strain is differentiated (the fixture above
    always mixes in crystals; molecule-only runs once failed while train.py counted the FLOPs of a step)."""
    path = tmp_path / "molecules.h5"
    teacher, rows = emt_rows(n_molecules=24, n_crystals=0)
    with LabelWriter(path, teacher.name, teacher.version) as w:
        w.append(rows, 1.0)
    run("train.py", *TINY, "--iters", "10", "--eval-every", "10", "--data", path, "--count-flops", "--out", tmp_path / "run")
    log = records(tmp_path / "run")
    assert log[-1]["step"] == 10 and np.isfinite(log[-1]["val_force_mae_mev_per_a"]), log[-1]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train_flops_per_step"] > 0


def test_a_painn_student_trains_on_molecules_and_crystals_and_drives_ase(labels, tmp_path):
    run("train.py", *TINY, "--iters", "10", "--eval-every", "10", "--student", "painn", "--data", labels, "--out", tmp_path / "painn")
    log = records(tmp_path / "painn")
    assert log[-1]["step"] == 10 and np.isfinite(log[-1]["val_force_mae_mev_per_a"]) and "val_stress_mae_gpa" in log[-1]
    model, meta = load_student(tmp_path / "painn" / "ckpt.pt")
    assert model.config.family == "painn" and meta["step"] == 10
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.calc = student_calculator(model)
    assert np.isfinite(atoms.get_forces()).all() and np.isfinite(atoms.get_stress()).all()


def test_student_resume_is_exact(student, labels, tmp_path):
    out = tmp_path / "resumed"
    run("train.py", *TINY, "--data", labels, "--out", out, "--stop-after", "10")
    run("train.py", *TINY, "--data", labels, "--out", out, "--resume")
    full, resumed = records(student), records(out)
    key = ("step", "loss")
    assert [tuple(r[k] for k in key) for r in resumed if "loss" in r] == [tuple(r[k] for k in key) for r in full if "loss" in r]
    a, b = load_checkpoint(student / "ckpt.pt", task="ff"), load_checkpoint(out / "ckpt.pt", task="ff")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_student_two_process_ddp_matches_one_process(student, labels, tmp_path):
    out = tmp_path / "ddp"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *TINY, "--data", labels, "--out", out)
    single = {r["step"]: r["loss"] for r in records(student) if "loss" in r}
    ddp = {r["step"]: r["loss"] for r in records(out) if "loss" in r}
    assert sorted(ddp) == sorted(single)
    for step in single:  # the same global batch split over two ranks; only the all-reduce order differs
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-6), step


def test_student_is_a_calculator_and_a_label_py_teacher(student, labels, tmp_path):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    from models.forcefield import load_student_calculator, student_calculator

    model, meta = load_student(student / "ckpt.pt")
    assert meta["teacher"] == "emt" and meta["step"] == 30
    data = LabelledStructures.load([labels])
    for s in (0, len(data) - 1):  # a molecule and a crystal, from the checkpoint alone
        a = data.to_atoms(s)
        a.calc = student_calculator(model)
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(0))
        VelocityVerlet(a, timestep=0.5 * units.fs).run(20)
        assert np.isfinite(a.positions).all() and np.isfinite(a.get_potential_energy())
        # the one-call loader of the exported weights computes the same
        b = a.copy()
        b.calc = load_student_calculator(student / "weights.pt")
        assert b.get_potential_energy() == pytest.approx(a.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(b.get_forces(), a.get_forces(), atol=1e-6)
    out = tmp_path / "by_student.h5"
    # carbon is in the student's elements: it labels carbon-24 crystals as any teacher would
    run("label.py", QM9_FIXTURE.parent / "carbon24_sample.csv", "--teacher", f"student:{student / 'ckpt.pt'}", "--out", out,
        "--no-progress")
    lab = read_labels(out)
    assert lab["attrs"]["teacher"] == "student" and "of emt" in lab["attrs"]["teacher_version"] and len(lab["key"]) == 6
    assert np.isfinite(lab["forces"]).all() and np.isfinite(lab["stress"]).all()


def test_label_py_relax_with_the_student_batched_and_with_a_teacher(student, tmp_path):
    """label.py relax writes every input structure in input order with its relaxation (the student's batches of 2, or
    EMT one at a time): info kept, energies down, a structure with an element the model lacks written as it came."""
    import ase.io

    qm9 = read_qm9pack_csv([QM9_FIXTURE])
    structures = [qm9.to_atoms(i) for i in (0, 3, 54, 12)] + [bulk("Cu", "fcc", a=3.7, cubic=True)]  # 54 holds F
    rng = np.random.default_rng(1)
    for k, a in enumerate(structures):
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.info["condition_alpha"] = 60.0 + k
    ase.io.write(tmp_path / "in.extxyz", structures, format="extxyz")
    proc = run("label.py", "relax", tmp_path / "in.extxyz", "--teacher", f"student:{student / 'ckpt.pt'}", "--out",
               tmp_path / "relaxed.extxyz", "--steps", 30, "--batch-size", 2)
    assert "relaxed 4 of 5 structures" in proc.stdout and "1 not relaxable" in proc.stdout, proc.stdout
    out = ase.io.read(tmp_path / "relaxed.extxyz", ":")
    assert [a.get_chemical_formula() for a in out] == [a.get_chemical_formula() for a in structures]
    assert [a.info["condition_alpha"] for a in out] == [60.0 + k for k in range(5)]
    assert "relax_error" in out[2].info and "'F'" in out[2].info["relax_error"]
    np.testing.assert_allclose(out[2].positions, structures[2].positions, atol=1e-6)  # extxyz keeps 8 decimals
    for k in (0, 1, 3, 4):
        info = out[k].info
        assert info["relax_energy_end"] < info["relax_energy_start"] and 0 < info["relax_steps"] <= 30
        assert not np.allclose(out[k].positions, structures[k].positions)
    assert out[4].pbc.all() and np.allclose(out[4].cell.array, structures[4].cell.array)  # the cell stays
    # compiled, the student relaxes the structures as it did eager
    run("label.py", "relax", tmp_path / "in.extxyz", "--teacher", f"student:{student / 'ckpt.pt'}", "--out",
        tmp_path / "compiled.extxyz", "--steps", 30, "--batch-size", 2, "--compile")
    for eager, compiled in zip(out, ase.io.read(tmp_path / "compiled.extxyz", ":")):
        np.testing.assert_allclose(compiled.positions, eager.positions, atol=1e-3)  # float32, summed in another order
    # a teacher, one structure at a time through ASE's FIRE (EMT knows H, C, N, O and Cu, not F)
    proc = run("label.py", "relax", tmp_path / "in.extxyz", "--teacher", "emt", "--out", tmp_path / "emt.extxyz", "--steps", 10)
    by_emt = ase.io.read(tmp_path / "emt.extxyz", ":")
    assert "ase" in by_emt[0].info["relax_by"] and "relax_error" in by_emt[2].info
    assert all(by_emt[k].info["relax_energy_end"] < by_emt[k].info["relax_energy_start"] for k in (0, 1, 3, 4))
    unreadable = tmp_path / "bad.xyz"
    unreadable.write_text("2\n\nH 0 0 0\n")
    proc = run("label.py", "relax", unreadable, "--teacher", "emt", "--out", tmp_path / "x.extxyz", check=False)
    assert proc.returncode == 1 and "every input structure must be readable" in proc.stderr and not (tmp_path / "x.extxyz").exists()


@pytest.mark.skipif(importlib.util.find_spec("tblite") is None, reason="tblite (xtb) not installed")
def test_label_py_relax_records_a_teachers_failure_and_goes_on(tmp_path):
    """A generated molecule on which GFN2-xTB's SCF does not converge (tests/data/xtb_scf_fails.extxyz) is written as
    it came, with the teacher's error, and the next structure is relaxed: one failure does not end the run."""
    import ase.io

    bad = ase.io.read(ROOT / "tests/data/xtb_scf_fails.extxyz")
    ase.io.write(tmp_path / "in.extxyz", [bad, read_qm9pack_csv([QM9_FIXTURE]).to_atoms(3)], format="extxyz")
    proc = run("label.py", "relax", tmp_path / "in.extxyz", "--teacher", "xtb", "--out", tmp_path / "out.extxyz",
               "--steps", 3)
    assert "relaxed 1 of 2 structures" in proc.stdout and "1 not relaxable or failed" in proc.stdout, proc.stdout
    out = ase.io.read(tmp_path / "out.extxyz", ":")
    assert out[0].info["relax_error"].startswith("xtb failed: CalculationFailed")
    np.testing.assert_allclose(out[0].positions, bad.positions, atol=1e-6)
    assert "relax_error" not in out[1].info and out[1].info["relax_steps"] > 0


def test_label_py_explore_picks_snapshots_a_committee_disputes(student, labels, tmp_path):
    """Two students of one recipe (seeds 0 and 1) explore from real molecules and a copper cell: the picked snapshots
    carry their deviation, highest first, and can be labelled by the teacher as they are."""
    import ase.io

    other = tmp_path / "seed1"
    run("train.py", *TINY, "--data", labels, "--seed", 1, "--out", other)
    qm9 = read_qm9pack_csv([QM9_FIXTURE])
    inputs = [qm9.to_atoms(i) for i in (0, 3, 12)] + [bulk("Cu", "fcc", a=3.6, cubic=True)]
    ase.io.write(tmp_path / "in.extxyz", inputs, format="extxyz")
    proc = run("label.py", "explore", tmp_path / "in.extxyz", "--committee", student / "ckpt.pt", other / "weights.pt",
               "--steps", 20, "--every", 5, "--n", 6, "--min-deviation", 0, "--batch-size", 3, "--out", tmp_path / "picked.extxyz")
    assert "explored 4 structures for 20 steps" in proc.stdout, proc.stdout
    picked = ase.io.read(tmp_path / "picked.extxyz", ":")
    assert len(picked) == 6 and len({a.info["explore_source"] for a in picked}) > 1
    calm = [a.info["committee_force_deviation"] for a in picked if "explore_unphysical" not in a.info]
    assert calm == sorted(calm, reverse=True) and min(calm) > 0
    assert all(a.info["explore_input"].endswith(f"in.extxyz:{a.info['explore_source']}") for a in picked)
    run("label.py", tmp_path / "picked.extxyz", "--teacher", "emt", "--out", tmp_path / "round1.h5", "--no-progress")
    assert len(read_labels(tmp_path / "round1.h5")["key"]) == 6
    refused = run("label.py", "explore", tmp_path / "in.extxyz", "--committee", student / "ckpt.pt", "--out", tmp_path / "x.extxyz",
                  check=False)
    assert refused.returncode == 2 and "needs two or more students" in refused.stderr


def test_evaluate_student_reports_accuracy_speed_and_md(student, labels, tmp_path):
    proc = run("evaluate.py", "--task", "ff", "--ckpt", student / "ckpt.pt", labels, "--json", tmp_path / "ff.json",
               "--speed-structures", "2", "--md-structures", "1", "--md-steps", "20")
    result = json.loads((tmp_path / "ff.json").read_text())
    ckpt = load_checkpoint(student / "ckpt.pt", task="ff")
    assert result["held_out"] == ckpt["n_valid"]  # the training file: only its validation side is scored
    acc = result["accuracy"]
    assert set(acc) == {"all", "molecules", "crystals"} and acc["all"]["force_mae_mev_per_a"] > 0
    assert acc["crystals"]["stress_mae_gpa"] >= 0
    groups = [row["group"] for row in result["speed"]]
    assert any(g.startswith("molecules") for g in groups) and "crystals x 2x2x2" in groups
    assert all(row["teacher_atoms_per_s"] > 0 and row["speedup_batched"] > 0 for row in result["speed"])
    assert all(row["student_md_single_atom_steps_per_s"] > 0 and row["student_md_batched_atom_steps_per_s"] > 0 for row in result["speed"])
    assert [run_["periodic"] for run_ in result["md"]] == [False, True] and all(r["steps"] == 20 for r in result["md"])
    assert (tmp_path / "parity.png").stat().st_size > 0 and (tmp_path / "md.png").stat().st_size > 0
    assert "speed-up" in proc.stdout and "NVE" in proc.stdout


def test_mixed_teachers_are_refused(student, labels, tmp_path):
    other = tmp_path / "xtb_like.h5"
    _, rows = emt_rows(4, 0, prefix="x")
    with LabelWriter(other, "xtb", "tblite 0.0 GFN2-xTB") as w:
        w.append(rows, 1.0)
    proc = run("train.py", *TINY, "--data", labels, other, "--out", tmp_path / "mixed", check=False)
    assert proc.returncode == 1 and "more than one teacher" in proc.stderr and "xtb_like.h5" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "mixed" / "ckpt.pt").exists()
    proc = run("evaluate.py", "--task", "ff", "--ckpt", student / "ckpt.pt", other, "--json", tmp_path / "e.json", check=False)
    assert proc.returncode == 1 and "learned emt" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_labels_files_give_clear_errors(labels, tmp_path):
    nan = tmp_path / "nan.h5"
    teacher, rows = emt_rows(3, 2, prefix="n")
    rows[1]["forces"] = np.array(rows[1]["forces"])
    rows[1]["forces"][0, 0] = np.nan
    with LabelWriter(nan, teacher.name, teacher.version) as w:
        w.append(rows, 1.0)
    not_labels = tmp_path / "other.h5"
    with h5py.File(not_labels, "w") as f:
        f["x"] = np.zeros(3)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all")
    for path, words in ((nan, ["nan.h5", "structure 1", "non-finite"]), (not_labels, ["other.h5", "not a labels file"]),
                        (garbage, ["garbage.h5", "not a readable HDF5"])):
        proc = run("train.py", *TINY, "--data", path, "--out", tmp_path / "bad", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert all(w in proc.stderr for w in words), (words, proc.stderr)
        with pytest.raises(LabelsError):
            LabelledStructures.load([path])
    proc = run("train.py", "--task", "ff", "--data", tmp_path / "missing.h5", check=False)
    assert proc.returncode == 2 and "no such labels file" in proc.stderr
    proc = run("train.py", "--task", "ff", "--data", labels, "--arch", "gnn", check=False)
    assert proc.returncode == 2 and "options of --task gen" in proc.stderr
    proc = run("train.py", "--force-weight", "3", check=False)
    assert proc.returncode == 2 and "options of --task ff" in proc.stderr


def test_student_misuse_gives_clear_errors(student, labels, qm9_dir, tmp_path):
    gen = tmp_path / "gen"
    run("train.py", "--preset", "tiny", "--iters", "2", "--eval-samples", "0", "--data-dir", qm9_dir, "--out", gen)
    other = tmp_path / "other_teacher.h5"
    _, rows = emt_rows(4, 0, prefix="o")
    with LabelWriter(other, "xtb", "tblite 0.0 GFN2-xTB") as w:
        w.append(rows, 1.0)
    cases = [  # (command, exit status, words of the message)
        (["label.py", QM9_FIXTURE, "--teacher", f"student:{tmp_path / 'none.pt'}", "--out", tmp_path / "a.h5"], 2,
         ["none.pt", "no such student checkpoint"]),
        (["label.py", QM9_FIXTURE, "--teacher", f"student:{gen / 'ckpt.pt'}", "--out", tmp_path / "b.h5"], 1,
         ["is a generative model", "not a student force field"]),
        (["evaluate.py", "--task", "ff", "--ckpt", gen / "ckpt.pt", labels, "--json", tmp_path / "c.json"], 1,
         ["is a generative model"]),
        (["evaluate.py", "--task", "ff", "--ckpt", student / "ckpt.pt", "--json", tmp_path / "d.json"], 2,
         ["--task ff takes --ckpt STUDENT and labels files"]),
        (["train.py", *TINY, "--data", labels, "--out", student, "--resume", "--cutoff", "4"], 1,
         ["--cutoff 4.0 (checkpoint: 5.0)", "cannot change"]),
        (["train.py", *TINY, "--data", labels, "--out", student, "--resume", "--force-weight", "3"], 1,
         ["--force-weight 3.0 (checkpoint: 10.0)", "--override"]),
        (["train.py", *TINY, "--data", other, "--out", student, "--resume", "--override"], 1,
         ["learned emt", "other_teacher.h5", "A student learns one teacher"]),
        (["sample.py", "--ckpt", student / "ckpt.pt", "--n", "2", "--out", tmp_path], 1,
         ["is a student force field", "not a generative model"]),
    ]
    for command, status, words in cases:
        proc = run(*command, check=False)
        assert proc.returncode == status and "Traceback" not in proc.stderr, (command, proc.stderr[-2000:])
        assert all(w in proc.stdout + proc.stderr for w in words), (command, words, proc.stderr[-2000:])
    with pytest.raises(CheckpointError, match="not a student force field"):
        load_student(gen / "ckpt.pt")
