"""Teacher force fields behind one ASE-calculator interface (the labels file they fill: models/labels.py).

TEACHERS maps a name to a factory(device) -> Teacher; `student:PATH` names a student force field trained by
train.py --task ff (so label.py and its bench run a student exactly as they run its teacher). A Teacher wraps an
ase Calculator with its name, version, the elements it supports and whether molecules must be put in a periodic
vacuum box. `Teacher.label(atoms)` returns (energy eV, forces eV/A [n,3], stress eV/A^3 Voigt [6], NaN for
molecules); `Teacher.label_many(structures)` the same for a list, in one batched call where the teacher can batch
(CHGNet), one structure at a time otherwise.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata

import numpy as np


class TeacherError(RuntimeError):
    """A teacher that cannot be built: the message says what to install or download."""


class UnsupportedElements(ValueError):
    """The structure has elements the teacher has no parameters for (a recorded failure, not a crash)."""


def package_version(pkg: str) -> str:
    """The installed version of a package, or "unknown"."""
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "unknown"


@dataclass
class Teacher:
    name: str
    version: str
    calc: object  # ase.calculators.calculator.Calculator
    elements: set[int] | None = None  # supported atomic numbers; None: all
    molecule_vacuum: float | None = None  # periodic-only models: molecules go in a box with this much vacuum
    meta: dict = field(default_factory=dict)
    # list of structures as the calculator sees them (as_seen) -> [(energy, forces, stress [3, 3] or Voigt [6])], one
    # batched forward; None: the teacher labels one structure at a time.
    batch: Callable[[list], list] | None = None

    def as_seen(self, atoms):
        """A copy of atoms as the calculator gets it: a molecule for a periodic-only model is boxed in vacuum."""
        a = atoms.copy()
        if not a.pbc.any() and self.molecule_vacuum is not None:
            a.center(vacuum=self.molecule_vacuum)  # >= vacuum A to every face: no interaction with its images
            a.pbc = True
        return a

    def check_elements(self, atoms) -> None:
        """Raises UnsupportedElements where atoms hold an element the teacher has no parameters for."""
        if self.elements is not None:
            from models.structures import unknown_elements
            if bad := unknown_elements(atoms, self.elements):
                raise UnsupportedElements(f"teacher {self.name} does not support element(s) {bad}")

    def label(self, atoms):
        """(energy, forces [n,3], stress [6]) of a copy of atoms; raises on unsupported elements or teacher errors."""
        self.check_elements(atoms)
        periodic = bool(atoms.pbc.any())
        a = self.as_seen(atoms)
        a.calc = self.calc
        energy = float(a.get_potential_energy())
        forces = np.asarray(a.get_forces(), dtype=np.float64)
        stress = np.asarray(a.get_stress(voigt=True), dtype=np.float64) if periodic else np.full(6, np.nan)
        return energy, forces, stress

    def label_many(self, structures: list) -> list[tuple]:
        """label() of each structure, in one batched call where the teacher batches; the first unsupported element
        raises, as label() does."""
        if self.batch is None:
            return [self.label(a) for a in structures]
        for atoms in structures:
            self.check_elements(atoms)
        from ase.stress import full_3x3_to_voigt_6_stress

        labels = []
        for atoms, (energy, forces, stress) in zip(structures, self.batch([self.as_seen(a) for a in structures])):
            stress = np.asarray(stress, dtype=np.float64)
            stress = full_3x3_to_voigt_6_stress(stress) if stress.shape == (3, 3) else stress
            labels.append((float(energy), np.asarray(forces, dtype=np.float64),
                           stress if atoms.pbc.any() else np.full(6, np.nan)))
        return labels


def _emt(device: str) -> Teacher:
    from ase.calculators.emt import EMT, parameters
    from ase.data import atomic_numbers

    # EMT has parameters for a handful of metals plus H, C, N, O only; others are reported as failures.
    return Teacher("emt", f"ase {package_version('ase')}", EMT(), elements={atomic_numbers[s] for s in parameters})


def _xtb(device: str) -> Teacher:
    try:
        from tblite.ase import TBLite
    except ImportError as e:
        raise TeacherError(f"teacher xtb needs tblite: `pip install tblite` ({e})") from None
    # verbosity 0: tblite otherwise prints an SCF log for every structure. CPU only (device is ignored).
    return Teacher("xtb", f"tblite {package_version('tblite')} GFN2-xTB", TBLite(method="GFN2-xTB", verbosity=0))


def _chgnet(device: str) -> Teacher:
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as e:
        raise TeacherError(f"teacher chgnet needs chgnet: `pip install chgnet` (weights ship in the wheel) ({e})") from None
    calc = CHGNetCalculator(use_device=device)
    model_version = getattr(calc.model, "version", None) or "unknown"

    def batch(structures: list) -> list[tuple]:
        """CHGNet's own batching (one graph per structure, one forward for all), converted as its ASE calculator
        converts: energy per atom -> eV, stress GPa -> eV/A^3."""
        from pymatgen.io.ase import AseAtomsAdaptor

        predictions = calc.model.predict_structure([AseAtomsAdaptor.get_structure(a) for a in structures], task="efs",
                                                   batch_size=len(structures))
        predictions = [predictions] if isinstance(predictions, dict) else predictions  # one structure: a dict
        return [(p["e"] * (len(a) if calc.model.is_intensive else 1), p["f"], p["s"] * calc.stress_weight)
                for a, p in zip(structures, predictions)]

    # CHGNet is trained on periodic crystals: a molecule is labelled in a box with 10 A of vacuum.
    return Teacher("chgnet", f"chgnet {package_version('chgnet')} model {model_version}", calc, molecule_vacuum=10.0,
                   batch=batch)


def _missing(name: str, pkg: str, weights: str) -> TeacherError:
    return TeacherError(f"teacher {name}: {pkg} is not installed (`pip install {pkg}`); {weights}")


def _sevennet(device: str) -> Teacher:
    try:
        from sevenn.calculator import SevenNetCalculator
    except ImportError:
        raise _missing("sevennet", "sevenn", "the 7net-0 weights ship in the package") from None
    try:
        calc = SevenNetCalculator("7net-0", device=device)
    except Exception as e:
        raise TeacherError(f"teacher sevennet: cannot load the 7net-0 weights ({type(e).__name__}: {e})") from None
    return Teacher("sevennet", f"sevenn {package_version('sevenn')} 7net-0", calc, molecule_vacuum=10.0)


def _orb_v2(device: str) -> Teacher:
    try:
        from orb_models.forcefield import pretrained
        from orb_models.forcefield.calculator import ORBCalculator
    except ImportError:
        raise _missing("orb-v2", "orb-models", "its weights download on first use (needs internet once)") from None
    try:
        model = pretrained.orb_v2(device=device)
    except Exception as e:
        raise TeacherError(f"teacher orb-v2: cannot load the orb-v2 weights; they download on first use into the torch hub "
                           f"cache, so run once with internet or copy that cache here ({type(e).__name__}: {e})") from None
    return Teacher("orb-v2", f"orb-models {package_version('orb-models')} orb-v2", ORBCalculator(model, device=device), molecule_vacuum=10.0)


def _mace_mp(device: str) -> Teacher:
    try:
        from mace.calculators import mace_mp
    except ImportError:
        raise _missing("mace-mp", "mace-torch", "its weights download on first use (needs internet once)") from None
    try:
        calc = mace_mp(model="medium", device=device, default_dtype="float64")
    except Exception as e:
        raise TeacherError(f"teacher mace-mp: cannot load the MACE-MP medium weights; they download on first use into "
                           f"~/.cache/mace, so run once with internet or copy that file here ({type(e).__name__}: {e})") from None
    return Teacher("mace-mp", f"mace-torch {package_version('mace-torch')} mace-mp medium", calc, molecule_vacuum=10.0)


def _student(path: str, device: str) -> Teacher:
    import hashlib

    from models.checkpoint import CheckpointError, load_student
    from models.forcefield import student_calculator

    try:
        model, meta = load_student(path, device)
    except CheckpointError as e:
        raise TeacherError(f"teacher student:{path}: {e}") from None
    with open(path, "rb") as f:  # the weights' identity: another student is another teacher version
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return Teacher("student", f"student {digest} (step {meta['step']}) of {meta['teacher']} {meta['teacher_version']}",
                   student_calculator(model, device), elements=set(model.config.elements), meta=meta)


TEACHERS = {"emt": _emt, "xtb": _xtb, "chgnet": _chgnet, "sevennet": _sevennet, "orb-v2": _orb_v2, "mace-mp": _mace_mp}
STUDENT_PREFIX = "student:"  # student:PATH/ckpt.pt


def teacher_name(value: str) -> str:
    """argparse type of --teacher: a name of TEACHERS or student:PATH to an existing checkpoint."""
    import argparse

    if value.startswith(STUDENT_PREFIX):
        if not os.path.isfile(value[len(STUDENT_PREFIX):]):
            raise argparse.ArgumentTypeError(f"{value}: no such student checkpoint file")
        return value
    if value not in TEACHERS:
        raise argparse.ArgumentTypeError(f"unknown teacher {value!r}; known: {', '.join(sorted(TEACHERS))}, or "
                                         f"{STUDENT_PREFIX}PATH to a train.py --task ff checkpoint")
    return value


def get_teacher(name: str, device: str = "cpu") -> Teacher:
    if name.startswith(STUDENT_PREFIX):
        return _student(name[len(STUDENT_PREFIX):], device)
    if name not in TEACHERS:
        raise TeacherError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}")
    return TEACHERS[name](device)
