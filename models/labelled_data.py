"""Labelled structures as a training set for the student force field: label.py's files of one teacher, a
validation split by structure, and flat batches with their neighbour lists.

Everything is read into memory once (120,000 QM9-sized molecules are about 60 MB), so a batch is a gather
from numpy arrays plus a neighbour search; the training loop prefetches it on a thread while the step runs.
"""
from __future__ import annotations

import hashlib
import zlib
from pathlib import Path

import numpy as np
import torch

from models.forcefield import neighbour_edges
from models.labels import LabelsError, atom_rows, offsets_of, read_labels

EV_PER_A3_IN_GPA = 160.21766208  # stress unit conversion for reports
# eV/A: the default bound on an atom's force (train.py --max-force). A real teacher's forces on generated molecules
# have an RMS of about 1.5 eV/A and strongly overlapping atoms give tens to hundreds: a structure past this bound
# is a broken label or a collision, whose squared error would outweigh that of thousands of ordinary atoms.
MAX_FORCE = 100.0


def is_validation(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Validation membership [S] bool by a hash of each structure's key: a structure keeps its side of the
    split when files are added, merged or reordered, and a student never trains on what it is scored on."""
    return np.array([zlib.crc32(k.encode()) % 100_000 < fraction * 100_000 for k in keys], dtype=bool)


def key_hashes(keys) -> np.ndarray:
    """64-bit hashes (BLAKE2b) of structure keys, int64 [S]. A student's checkpoint keeps those of the structures it
    trained on (8 bytes each, where the keys run to tens), so evaluate.py tells them from held-out ones in whatever
    file they come: a copy, a move or a merge keeps the keys. Two of a million keys collide with probability 3e-8."""
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little", signed=True)
                     for k in keys], dtype=np.int64)


class LabelledStructures:
    """Structures with teacher energies, forces and stresses; one teacher (and teacher version) throughout.
    `warnings`: what load() left out and why, one line each, for the caller to log."""

    def __init__(self, columns: dict, teacher: str, teacher_version: str, files: list[str]):
        self.c, self.teacher, self.teacher_version, self.files = columns, teacher, teacher_version, files
        self.warnings: list[str] = []

    @classmethod
    def load(cls, paths: list[Path], max_force: float = MAX_FORCE) -> "LabelledStructures":
        """Read labels files; refuse files of several teachers or teacher versions, and labels no teacher gives
        (elements outside 1-118, empty or non-finite structures). A structure whose key an earlier one has is used
        once (a key names one structure, so two different structures under one key are refused), and one with an
        atom's force above max_force eV/A is left out; both with a warning."""
        labs = [(Path(p), read_labels(p)) for p in paths]
        origins = {}  # (teacher, version) -> files holding such labels
        for p, lab in labs:
            for v in sorted(set(lab["teacher_version"].tolist())):
                origins.setdefault((lab["attrs"]["teacher"], v), []).append(str(p))
        if len(origins) > 1:
            said = "; ".join(f"{t} ({v}) in {', '.join(files)}" for (t, v), files in sorted(origins.items()))
            raise LabelsError(f"labels of more than one teacher: {said}. A student learns one teacher: give files "
                              f"labelled by one teacher version (label.py report lists them)")
        if not origins:
            raise LabelsError(f"{', '.join(map(str, paths))}: no labelled structures")
        (teacher, version), = origins
        names = ("numbers", "positions", "forces", "n_atoms", "energy", "stress", "cell", "pbc", "key", "source")
        columns = {k: np.concatenate([lab[k] for _, lab in labs]) for k in names}
        columns["file"] = np.concatenate([np.full(len(lab["key"]), i) for i, (_, lab) in enumerate(labs)])
        columns["record"] = np.concatenate([np.arange(len(lab["key"])) for _, lab in labs])  # index in its file
        columns["offset"] = offsets_of(columns["n_atoms"])
        data = cls(columns, teacher, version, [str(p) for p, _ in labs])
        data._check()
        keep, warnings = data._repeated()
        strong = data._strong_forces(max_force)
        if strong.any():
            warnings.append(data._force_warning(np.flatnonzero(strong & keep), max_force))
            keep &= ~strong
        if not keep.any():
            raise LabelsError(f"{', '.join(data.files)}: every structure has an atom's force above {max_force:g} eV/A "
                              f"(train.py --max-force): no labels to learn or score")
        if not keep.all():
            data = data.subset(np.flatnonzero(keep))
        data.warnings = [w for w in warnings if w]
        return data

    def _check(self) -> None:
        c = self.c
        if (c["n_atoms"] < 1).any():
            s = int(np.flatnonzero(c["n_atoms"] < 1)[0])
            raise LabelsError(f"{self.where(s)}: a structure without atoms; label.py never writes one: relabel the file")
        atom_struct = np.repeat(np.arange(len(self)), c["n_atoms"])
        unknown = (c["numbers"] < 1) | (c["numbers"] > 118)
        if unknown.any():
            s = np.unique(atom_struct[unknown])
            z = int(c["numbers"][np.flatnonzero(unknown & (atom_struct == s[0]))[0]])
            raise LabelsError(f"{self.where(int(s[0]))}: atomic number {z}, not an element (1 to 118)"
                              f"{f' (and {len(s) - 1} more structures)' if len(s) > 1 else ''}; label.py never writes "
                              f"these: relabel the file, or drop those structures")
        periodic = c["pbc"].all(axis=1)
        if (c["pbc"].any(axis=1) & ~periodic).any():
            s = int(np.flatnonzero(c["pbc"].any(axis=1) & ~periodic)[0])
            raise LabelsError(f"{self.where(s)}: periodic in some directions only ({c['pbc'][s].tolist()}); the student "
                              f"takes molecules and 3D crystals")
        bad_atoms = ~np.isfinite(c["forces"]).all(axis=1) | ~np.isfinite(c["positions"]).all(axis=1)
        bad = ~np.isfinite(c["energy"]) | (periodic & ~np.isfinite(c["stress"]).all(axis=1)) \
            | (periodic & ~np.isfinite(c["cell"]).all(axis=(1, 2))) \
            | (np.bincount(atom_struct[bad_atoms], minlength=len(self)) > 0)
        if bad.any():
            s = np.flatnonzero(bad)
            raise LabelsError(f"{self.where(int(s[0]))}: non-finite (NaN / Inf) energy, forces, stress, cell or positions"
                              f"{f' (and {len(s) - 1} more structures)' if len(s) > 1 else ''}; label.py never writes "
                              f"these: relabel the file, or drop those structures")

    def _repeated(self) -> tuple[np.ndarray, list[str]]:
        """(keep [S] bool, warnings): a structure whose key an earlier one has is kept once, so a file given twice, or
        a merge given beside one of its inputs, does not count its structures twice. Both must hold the same atoms
        at the same positions: two structures under one key are refused, since the split and the student's
        held-out set go by key."""
        c = self.c
        _, first, inverse = np.unique(c["key"], return_index=True, return_inverse=True)
        original = first[inverse.ravel()]
        repeats = np.flatnonzero(original != np.arange(len(self)))
        keep = np.ones(len(self), dtype=bool)
        keep[repeats] = False
        pairs = {}  # (file of the first, file of the repeat) -> repeats
        for s in repeats:
            a = int(original[s])
            atoms_a, atoms_s = slice(c["offset"][a], c["offset"][a] + c["n_atoms"][a]), slice(c["offset"][s], c["offset"][s] + c["n_atoms"][s])
            same = c["n_atoms"][a] == c["n_atoms"][s] and np.array_equal(c["numbers"][atoms_a], c["numbers"][atoms_s]) \
                and np.array_equal(c["positions"][atoms_a], c["positions"][atoms_s]) and np.array_equal(c["pbc"][a], c["pbc"][s]) \
                and (not c["pbc"][a].any() or np.array_equal(c["cell"][a], c["cell"][s]))
            if not same:
                raise LabelsError(f"{self.where(a)} and {self.where(int(s))} share a key but hold different structures; a key "
                                  f"names one structure (the validation split and the student's held-out set go by key): "
                                  f"give one of them")
            pairs.setdefault((int(c["file"][a]), int(c["file"][s])), []).append(s)
        warnings = []
        for (fa, fs), members in pairs.items():
            a, b = self.files[fa], self.files[fs]
            n = f"{len(members)} structure{'s' if len(members) > 1 else ''}"
            if fa == fs:
                said = f"{n} of {a} appear in it more than once (the same keys and atoms); each is used once"
            elif a == b:
                said = f"{a} is given more than once; its {n} are used once"
            else:
                said = f"{n} of {b} are also in {a} (the same keys and atoms); each is used once"
            warnings.append(f"warning: {said}")
        return keep, warnings

    def _strong_forces(self, max_force: float) -> np.ndarray:
        """[S] bool: structures with an atom whose force exceeds max_force (eV/A)."""
        c = self.c
        return np.maximum.reduceat(np.linalg.norm(c["forces"].astype(np.float64), axis=1), c["offset"]) > max_force

    def _force_warning(self, structures: np.ndarray, max_force: float) -> str | None:
        if not len(structures):
            return None
        c = self.c
        norms = np.linalg.norm(c["forces"].astype(np.float64), axis=1)
        named = "; ".join(f"{self.where(int(s))}, {norms[c['offset'][s]:c['offset'][s] + c['n_atoms'][s]].max():.3g} eV/A"
                          for s in structures[:5])
        return (f"warning: {len(structures)} structure{'s' if len(structures) > 1 else ''} with an atom's force above {max_force:g} eV/A (train.py "
                f"--max-force) are left out: {named}{f'; and {len(structures) - 5} more' if len(structures) > 5 else ''}")

    def where(self, s: int) -> str:
        """Structure s named by its file, its index in that file and its key."""
        c = self.c
        return f"{self.files[int(c['file'][s])]}, structure {int(c['record'][s])} (key {str(c['key'][s])!r})"

    def __len__(self) -> int:
        return len(self.c["key"])

    def atom_rows(self, index: np.ndarray) -> np.ndarray:
        """Rows of the per-atom arrays that belong to the structures `index`, in that order."""
        return atom_rows(self.c["offset"], self.c["n_atoms"], index)

    def subset(self, index) -> "LabelledStructures":
        index = np.asarray(index, dtype=np.int64)
        c = self.c
        atoms = self.atom_rows(index)
        per_atom = {k: c[k][atoms] for k in ("numbers", "positions", "forces")}
        per_struct = {k: c[k][index] for k in c if k not in per_atom and k != "offset"}
        per_struct["offset"] = offsets_of(per_struct["n_atoms"])
        return LabelledStructures({**per_atom, **per_struct}, self.teacher, self.teacher_version, self.files)

    def split(self, val_fraction: float) -> tuple["LabelledStructures", "LabelledStructures"]:
        val = is_validation(self.c["key"], val_fraction)
        return self.subset(np.flatnonzero(~val)), self.subset(np.flatnonzero(val))

    @property
    def elements(self) -> list[int]:
        return sorted(int(z) for z in np.unique(self.c["numbers"]))

    @property
    def periodic(self) -> np.ndarray:
        return self.c["pbc"].all(axis=1)

    def structure_numbers(self) -> list[np.ndarray]:
        c = self.c
        return [c["numbers"][o:o + n] for o, n in zip(c["offset"], c["n_atoms"])]

    def force_rms(self) -> float:
        """The force RMS (eV/A), the student's unit of force error; at least 0.01 eV/A, so that labels all at rest
        (crystals at equilibrium) do not divide the loss by zero."""
        return max(float(np.sqrt(np.mean(self.c["forces"].astype(np.float64) ** 2))) if len(self.c["forces"]) else 1.0, 0.01)

    def stress_rms(self) -> float:
        """The crystals' stress RMS (eV/A^3), the unit of stress error; at least 1e-4 eV/A^3 (0.016 GPa), likewise."""
        s = self.c["stress"][self.periodic].astype(np.float64)
        return max(float(np.sqrt(np.mean(s ** 2))) if len(s) else 1.0, 1e-4)

    def batch(self, index, device, cutoff: float, dtype=torch.float32, global_index=None, world: int = 1) -> dict:
        """A flat batch of the structures `index` (see models/forcefield.py): numbers, pos, batch, cell, pbc, the
        neighbour edges within `cutoff`, the labels energy [S] float64, forces [A, 3], stress [S, 3, 3] (zeros
        for molecules), n_atoms [S], and `counts` [3]: the structures, force components and crystal stress
        components the loss averages over. Under DDP (`index` is this rank's part of `global_index`, over `world`
        ranks) they are the global batch's divided by world: ranks hold different numbers of atoms, and averaging
        their gradients then gives exactly the gradient of the global batch's mean."""
        index = np.asarray(index, dtype=np.int64)
        c = self.c
        whole = np.asarray(index if global_index is None else global_index, dtype=np.int64)
        counts = torch.tensor([len(whole), 3 * c["n_atoms"][whole].sum(), 9 * c["pbc"][whole].all(axis=1).sum()],
                              dtype=torch.float64) / world
        n_atoms = c["n_atoms"][index]
        atoms = self.atom_rows(index)
        pbc = torch.from_numpy(c["pbc"][index].all(axis=1))
        voigt = np.nan_to_num(c["stress"][index].astype(np.float64))
        stress = voigt[:, [[0, 5, 4], [5, 1, 3], [4, 3, 2]]]  # Voigt xx yy zz yz xz xy -> [S, 3, 3]
        b = {"numbers": torch.from_numpy(c["numbers"][atoms].astype(np.int64)),
             "pos": torch.from_numpy(c["positions"][atoms]).to(dtype),
             "batch": torch.repeat_interleave(torch.arange(len(index)), torch.from_numpy(n_atoms.astype(np.int64))),
             "cell": torch.from_numpy(c["cell"][index]).to(dtype), "pbc": pbc,
             "energy": torch.from_numpy(c["energy"][index].astype(np.float64)),
             "forces": torch.from_numpy(c["forces"][atoms]).to(dtype),
             "stress": torch.from_numpy(stress).to(dtype), "n_atoms": torch.from_numpy(n_atoms.astype(np.int64)),
             "counts": counts}
        b["edges"] = neighbour_edges(b["pos"], b["batch"], b["cell"], b["pbc"], cutoff)
        return {k: tuple(e.to(device) for e in v) if k == "edges" else v.to(device) for k, v in b.items()}

    def to_atoms(self, s: int):
        """Structure s as ase.Atoms (positions and cell as labelled; no calculator)."""
        import ase

        c = self.c
        o, n = c["offset"][s], c["n_atoms"][s]
        return ase.Atoms(numbers=c["numbers"][o:o + n], positions=c["positions"][o:o + n].astype(np.float64),
                         cell=c["cell"][s].astype(np.float64), pbc=c["pbc"][s])
