"""The students that ship in models/pretrained/: a fresh clone loads each in one call, runs 20 steps of NVE MD that
conserve energy, and gets its teacher's forces, not an untrained model's (models/EXPERIMENTS.md, "Distilling a
student force field", says how they were trained)."""
import importlib.util
import json

import ase.io
import numpy as np
import pytest
import torch
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet

from conftest import QM9_FIXTURE, ROOT, run_script
from models.checkpoint import load_student
from models.forcefield import ForceField, load_student_calculator, student_calculator
from models.molecules import read_qm9pack_csv
from models.structures import iter_structures
from models.teachers import get_teacher

PRETRAINED = ROOT / "models" / "pretrained"
# file: (teacher, what it is used on)
STUDENTS = {"qm9_student_xtb.pt": ("xtb", "molecules"), "crystal_student_chgnet.pt": ("chgnet", "crystals")}


def _structures(kind: str) -> list:
    """Real structures of the kind the student serves: QM9 molecules, or perov-5 and carbon-24 crystals as 2x2x2
    supercells (their 5- and 6-atom cells are too small to move in)."""
    if kind == "molecules":
        molecules = read_qm9pack_csv([QM9_FIXTURE])
        return [molecules.to_atoms(i) for i in (0, 7, 42, 99, 150, 299)]
    return [a.repeat(2) for _, _, a in iter_structures([str(ROOT / "tests/data/perov5_sample.csv"),
                                                         str(ROOT / "tests/data/carbon24_sample.csv")])][::2]


@pytest.mark.parametrize("name", STUDENTS)
def test_shipped_student_loads_and_runs_md(name):
    path = PRETRAINED / name
    assert path.stat().st_size < 5e6
    atoms = _structures(STUDENTS[name][1])[1]
    atoms.calc = load_student_calculator(path)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=np.random.default_rng(0))
    start = atoms.get_total_energy()
    VelocityVerlet(atoms, 0.5 * units.fs).run(20)
    assert np.isfinite(atoms.positions).all()
    # A conservative force field at 0.5 fs keeps the total energy to well under a meV per atom over 20 steps.
    assert abs(atoms.get_total_energy() - start) / len(atoms) < 1e-3


@pytest.mark.parametrize("name", STUDENTS)
def test_shipped_student_has_its_teachers_forces(name):
    """The student's forces against its teacher's on real structures, beside an untrained student's of the same
    shape: a file that loads the wrong weights, or none, fails."""
    teacher_name, kind = STUDENTS[name]
    if importlib.util.find_spec({"xtb": "tblite", "chgnet": "chgnet"}[teacher_name]) is None:
        pytest.skip(f"teacher {teacher_name} not installed")
    model, meta = load_student(PRETRAINED / name)
    assert meta["teacher"] == teacher_name
    torch.manual_seed(0)
    untrained = ForceField(model.config).to(next(model.parameters()).dtype).eval()
    untrained.reference_energy.copy_(model.reference_energy)
    untrained.energy_scale.copy_(model.energy_scale)
    teacher = get_teacher(teacher_name, "cpu")
    errors = {"trained": [], "untrained": []}
    for atoms in _structures(kind):
        _, teacher_forces, _ = teacher.label(atoms)
        for label, student in (("trained", model), ("untrained", untrained)):
            a = atoms.copy()
            a.calc = student_calculator(student)
            errors[label].append(np.abs(a.get_forces() - teacher_forces).mean())
    trained, untrained_error = np.mean(errors["trained"]), np.mean(errors["untrained"])
    # The shipped students score 44-120 meV/A on real held-out structures (EXPERIMENTS.md); 150 leaves room for
    # these few structures and another machine's arithmetic.
    assert trained < 0.15 and trained < 0.5 * untrained_error, (trained, untrained_error)


def test_scoring_a_shipped_student_writes_nothing_into_the_package(tmp_path):
    """evaluate.py --task ff on a shipped student writes its report to out/<student>/ of the working directory, not
    beside the checkpoint: models/pretrained is tracked by a clone and shared by both students."""
    if importlib.util.find_spec("tblite") is None:
        pytest.skip("teacher xtb not installed")
    molecules = _structures("molecules")[:3]
    rng = np.random.default_rng(0)
    for atoms in molecules:  # moved off QM9's geometries, so that none is a structure the student trained on
        atoms.positions += rng.normal(0, 0.02, atoms.positions.shape)
    ase.io.write(tmp_path / "molecules.extxyz", molecules)
    run_script(ROOT / "label.py", tmp_path / "molecules.extxyz", "--teacher", "xtb", "--out", tmp_path / "labels.h5", "--quiet")
    before = sorted(p.name for p in PRETRAINED.iterdir())
    run_script(ROOT / "evaluate.py", "--task", "ff", "--ckpt", PRETRAINED / "qm9_student_xtb.pt", tmp_path / "labels.h5",
               "--no-teacher", "--speed-structures", "1", "--md-structures", "0", cwd=tmp_path)
    assert sorted(p.name for p in PRETRAINED.iterdir()) == before
    report = tmp_path / "out" / "qm9_student_xtb"
    assert json.loads((report / "ff_metrics.json").read_text())["held_out"] == 3
    assert (report / "evaluate.log").exists()
