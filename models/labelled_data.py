"""Labelled structures as a training set for the student force field: label.py's files of one teacher, a
validation split by structure, and flat batches with their neighbour lists.

Everything is read into memory once (120,000 QM9-sized molecules are about 60 MB), so a batch is a gather
from numpy arrays plus a neighbour search; the training loop prefetches it on a thread while the step runs.
"""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import torch

from models.forcefield import neighbour_edges
from models.labels import LabelsError, atom_rows, offsets_of, read_labels

EV_PER_A3_IN_GPA = 160.21766208  # stress unit conversion for reports


def is_validation(keys: np.ndarray, fraction: float) -> np.ndarray:
    """Validation membership [S] bool by a hash of each structure's key: a structure keeps its side of the
    split when files are added, merged or reordered, and a student never trains on what it is scored on."""
    return np.array([zlib.crc32(k.encode()) % 100_000 < fraction * 100_000 for k in keys], dtype=bool)


class LabelledStructures:
    """Structures with teacher energies, forces and stresses; one teacher (and teacher version) throughout."""

    def __init__(self, columns: dict, teacher: str, teacher_version: str, files: list[str]):
        self.c, self.teacher, self.teacher_version, self.files = columns, teacher, teacher_version, files

    @classmethod
    def load(cls, paths: list[Path]) -> "LabelledStructures":
        """Read labels files; refuse files of several teachers or teacher versions, and non-finite labels."""
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
        columns["offset"] = offsets_of(columns["n_atoms"])
        data = cls(columns, teacher, version, [str(p) for p, _ in labs])
        data._check()
        return data

    def _check(self) -> None:
        c = self.c
        periodic = c["pbc"].all(axis=1)
        if (c["pbc"].any(axis=1) & ~periodic).any():
            s = int(np.flatnonzero(c["pbc"].any(axis=1) & ~periodic)[0])
            raise LabelsError(f"{self.where(s)}: periodic in some directions only ({c['pbc'][s].tolist()}); the student "
                              f"takes molecules and 3D crystals")
        atom_struct = np.repeat(np.arange(len(self)), c["n_atoms"])
        bad_atoms = ~np.isfinite(c["forces"]).all(axis=1) | ~np.isfinite(c["positions"]).all(axis=1)
        bad = ~np.isfinite(c["energy"]) | (periodic & ~np.isfinite(c["stress"]).all(axis=1)) \
            | (np.bincount(atom_struct[bad_atoms], minlength=len(self)) > 0)
        if bad.any():
            s = np.flatnonzero(bad)
            raise LabelsError(f"{self.where(int(s[0]))}: non-finite (NaN / Inf) energy, forces, stress or positions"
                              f"{f' (and {len(s) - 1} more structures)' if len(s) > 1 else ''}; label.py never writes "
                              f"these: relabel the file, or drop those structures")

    def where(self, s: int) -> str:
        """Structure s named by its file, its index in that file and its key."""
        f = self.c["file"]
        return f"{self.files[int(f[s])]}, structure {int((f[:s] == f[s]).sum())} (key {str(self.c['key'][s])!r})"

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
        return float(np.sqrt(np.mean(self.c["forces"].astype(np.float64) ** 2))) if len(self.c["forces"]) else 1.0

    def stress_rms(self) -> float:
        s = self.c["stress"][self.periodic].astype(np.float64)
        return float(np.sqrt(np.mean(s ** 2))) if len(s) else 1.0

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
