"""Teacher force fields behind one ASE-calculator interface, and the labels HDF5 file (DESIGN.md, "Data contracts").

TEACHERS maps a name to a factory(device) -> Teacher. A Teacher wraps an ase Calculator with its name,
version, the elements it supports and whether molecules must be put in a periodic vacuum box.
`Teacher.label(atoms)` returns (energy eV, forces eV/A [n,3], stress eV/A^3 Voigt [6], NaN for molecules).

The labels file is written by LabelWriter in blocks and read by read_labels. Crash safety: the file is
opened only while a block is written (the teacher runs with the file closed, so a kill -9 then cannot
damage it); per-atom rows are written before the per-structure rows that point at them, and the file
attribute `n_structures` is raised last. Readers trust only `n_structures`; a writer reopening the file
cuts every dataset back to it, dropping a half-written block.
"""
from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from models.data import atomic_write

FORMAT = "molgen-bench-labels-v1"
UNITS = {"energy": "eV", "positions": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3 (Voigt xx yy zz yz xz xy)",
         "cell": "Angstrom"}
PER_ATOM = {"numbers": ((), np.int16), "positions": ((3,), np.float32), "forces": ((3,), np.float32)}
PER_STRUCT = {"n_atoms": ((), np.int32), "offset": ((), np.int64), "energy": ((), np.float64), "stress": ((6,), np.float32),
              "cell": ((3, 3), np.float32), "pbc": ((3,), bool), "source": ((), "str"), "key": ((), "str")}


class TeacherError(RuntimeError):
    """A teacher that cannot be built: the message says what to install or download."""


class UnsupportedElements(ValueError):
    """The structure has elements the teacher has no parameters for (a recorded failure, not a crash)."""


class LabelsError(ValueError):
    """A labels file that cannot be used (another teacher, not a labels file)."""


def _version(pkg: str) -> str:
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

    def as_seen(self, atoms):
        """A copy of atoms as the calculator gets it: a molecule for a periodic-only model is boxed in vacuum."""
        a = atoms.copy()
        if not a.pbc.any() and self.molecule_vacuum is not None:
            a.center(vacuum=self.molecule_vacuum)  # >= vacuum A to every face: no interaction with its images
            a.pbc = True
        return a

    def label(self, atoms):
        """(energy, forces [n,3], stress [6]) of a copy of atoms; raises on unsupported elements or teacher errors."""
        if self.elements is not None:
            bad = sorted({s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers) if z not in self.elements})
            if bad:
                raise UnsupportedElements(f"teacher {self.name} does not support element(s) {bad}")
        periodic = bool(atoms.pbc.any())
        a = self.as_seen(atoms)
        a.calc = self.calc
        energy = float(a.get_potential_energy())
        forces = np.asarray(a.get_forces(), dtype=np.float64)
        stress = np.asarray(a.get_stress(voigt=True), dtype=np.float64) if periodic else np.full(6, np.nan)
        return energy, forces, stress


def _emt(device: str) -> Teacher:
    from ase.calculators.emt import EMT, parameters
    from ase.data import atomic_numbers

    # EMT has parameters for a handful of metals plus H, C, N, O only; others are reported as failures.
    return Teacher("emt", f"ase {_version('ase')}", EMT(), elements={atomic_numbers[s] for s in parameters})


def _xtb(device: str) -> Teacher:
    try:
        from tblite.ase import TBLite
    except ImportError as e:
        raise TeacherError(f"teacher xtb needs tblite: `pip install tblite` ({e})") from None
    # verbosity 0: tblite otherwise prints an SCF log for every structure. CPU only (device is ignored).
    return Teacher("xtb", f"tblite {_version('tblite')} GFN2-xTB", TBLite(method="GFN2-xTB", verbosity=0))


def _chgnet(device: str) -> Teacher:
    try:
        from chgnet.model.dynamics import CHGNetCalculator
    except ImportError as e:
        raise TeacherError(f"teacher chgnet needs chgnet: `pip install chgnet` (weights ship in the wheel) ({e})") from None
    calc = CHGNetCalculator(use_device=device)
    model_version = getattr(calc.model, "version", None) or "unknown"
    # CHGNet is trained on periodic crystals: a molecule is labelled in a box with 10 A of vacuum.
    return Teacher("chgnet", f"chgnet {_version('chgnet')} model {model_version}", calc, molecule_vacuum=10.0)


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
    return Teacher("sevennet", f"sevenn {_version('sevenn')} 7net-0", calc, molecule_vacuum=10.0)


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
    return Teacher("orb-v2", f"orb-models {_version('orb-models')} orb-v2", ORBCalculator(model, device=device), molecule_vacuum=10.0)


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
    return Teacher("mace-mp", f"mace-torch {_version('mace-torch')} mace-mp medium", calc, molecule_vacuum=10.0)


TEACHERS = {"emt": _emt, "xtb": _xtb, "chgnet": _chgnet, "sevennet": _sevennet, "orb-v2": _orb_v2, "mace-mp": _mace_mp}


def get_teacher(name: str, device: str = "cpu") -> Teacher:
    if name not in TEACHERS:
        raise TeacherError(f"unknown teacher {name!r}; known: {sorted(TEACHERS)}")
    return TEACHERS[name](device)


# ----------------------------------------------------------------------------------------------
# The labels HDF5 file


def code_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _committed(f) -> int:
    return int(f.attrs.get("n_structures", 0))


class LabelWriter:
    """Append blocks of labelled structures to path; creates the file, or checks that it is ours and its teacher."""

    def __init__(self, path: Path, teacher: Teacher, block_rows: int = 1024):
        import h5py

        self.path, self.teacher = Path(path), teacher
        if not self.path.exists():
            atomic_write(self.path, lambda tmp: self._create(tmp, teacher, block_rows))  # never a half-made file
        try:
            f = h5py.File(self.path, "a")
        except OSError as e:  # not HDF5, or damaged beyond what the block protocol protects against
            raise LabelsError(f"{self.path}: cannot open as a labels file for appending ({e}); use another --out") from None
        with f:
            if f.attrs.get("format") != FORMAT:
                raise LabelsError(f"{self.path}: not a labels file (format {f.attrs.get('format')!r})")
            if f.attrs["teacher"] != teacher.name:
                raise LabelsError(f"{self.path} was labelled by teacher {f.attrs['teacher']!r} "
                                  f"({f.attrs.get('teacher_version')}), not {teacher.name!r}; use another --out")
            if f.attrs.get("teacher_version") != teacher.version:  # same model family, other release: say so
                f.attrs["teacher_version_appended"] = teacher.version
            self._truncate(f)

    @staticmethod
    def _create(path, teacher: Teacher, block_rows: int) -> None:
        import h5py

        with h5py.File(path, "w") as f:
            for name, (shape, dt) in {**PER_ATOM, **PER_STRUCT}.items():
                dt = h5py.string_dtype("utf-8") if dt == "str" else dt
                chunk = 4 * block_rows if name in PER_ATOM else block_rows
                f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt, chunks=(chunk, *shape))
            f.attrs.update(format=FORMAT, teacher=teacher.name, teacher_version=teacher.version,
                           units=json.dumps(UNITS), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           code_version=code_version(), n_structures=0, label_seconds=0.0)

    @staticmethod
    def _truncate(f) -> None:
        """Drop rows of a block that was in flight when a previous run died."""
        s = _committed(f)
        a = int(f["offset"][s - 1] + f["n_atoms"][s - 1]) if s else 0
        for name in PER_ATOM:
            if len(f[name]) != a:
                f[name].resize(a, axis=0)
        for name in PER_STRUCT:
            if len(f[name]) != s:
                f[name].resize(s, axis=0)

    def keys(self) -> set[str]:
        import h5py

        with h5py.File(self.path, "r") as f:
            return set(f["key"].asstr()[: _committed(f)])

    def append(self, rows: list[dict], seconds: float = 0.0) -> int:
        """rows: dicts with numbers, positions, forces, energy, stress, cell, pbc, source, key; seconds: the wall
        time spent producing them (failures included), summed in the attribute `label_seconds` so that a file
        labelled over several runs or shards still has a throughput. Returns n_structures."""
        import h5py

        if not rows and not seconds:
            return len(self)
        with h5py.File(self.path, "a") as f:
            self._truncate(f)
            s0 = _committed(f)
            if rows:  # a block of failures only carries its time
                a0 = len(f["numbers"])
                n_atoms = np.array([len(r["numbers"]) for r in rows], dtype=np.int32)
                cols = {"n_atoms": n_atoms, "offset": a0 + np.concatenate([[0], np.cumsum(n_atoms)[:-1]]).astype(np.int64)}
                for name in PER_ATOM:  # 1. per-atom data, flushed
                    data = np.concatenate([r[name] for r in rows]).astype(PER_ATOM[name][1])
                    f[name].resize(a0 + len(data), axis=0)
                    f[name][a0:] = data
                f.flush()
                for name, (shape, dt) in PER_STRUCT.items():  # 2. per-structure rows that point at it
                    data = cols[name] if name in cols else [r[name] for r in rows]
                    data = np.array(data, dtype=object) if dt == "str" else np.asarray(data, dtype=dt)
                    f[name].resize(s0 + len(rows), axis=0)
                    f[name][s0:] = data
                f.flush()
            f.attrs["label_seconds"] = float(f.attrs.get("label_seconds", 0.0)) + seconds
            f.attrs["n_structures"] = s0 + len(rows)  # 3. commit
            f.flush()
            return s0 + len(rows)

    def __len__(self) -> int:
        import h5py

        with h5py.File(self.path, "r") as f:
            return _committed(f)


def read_labels(path: Path) -> dict:
    """All committed labels as numpy arrays (DESIGN.md layout; `source` and `key` as str arrays) plus `attrs`."""
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise LabelsError(f"{path}: not a labels file (format {f.attrs.get('format')!r})")
        s = _committed(f)
        out = {name: (f[name].asstr()[:s] if PER_STRUCT[name][1] == "str" else f[name][:s]) for name in PER_STRUCT}
        a = int(out["offset"][-1] + out["n_atoms"][-1]) if s else 0
        out.update({name: f[name][:a] for name in PER_ATOM})
        out["source"], out["key"] = np.asarray(out["source"], dtype=str), np.asarray(out["key"], dtype=str)
        out["attrs"] = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        return out
