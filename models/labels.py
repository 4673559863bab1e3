"""The labels file: teacher energies, forces and stresses of many structures, written by label.py and read by
its report and merge, the student force field and evaluate.py. Layout in models/README.md, "Data contracts".

    per atom, ragged and concatenated in structure order: numbers int16 [A], positions float32 [A, 3],
        forces float32 [A, 3] (eV/A)
    per structure: n_atoms int32 [S], offset int64 [S] (first atom row), energy float64 [S] (eV),
        stress float32 [S, 6] (eV/A^3, Voigt xx yy zz yz xz xy; NaN for molecules), cell float32 [S, 3, 3],
        pbc bool [S, 3], source str [S], key str [S] (stable id: resume and de-duplication),
        teacher_version str [S]
    attributes: format, teacher, teacher_version (of the file's first labels), units (JSON), created,
        code_version, n_structures, label_seconds (labelling wall time summed over runs), journal_seq

Crash safety. A kill in the middle of an HDF5 metadata update can leave a file that does not open at all, so
the HDF5 file is never modified in place:
  1. a committed block is a file of its own in the journal directory OUT.journal/, named by a sequence number and
     written atomically (temporary file, fsync, rename). The block is committed once that file exists;
  2. now and then (and when the writer closes or reopens) the journal is folded into the HDF5 file: a copy of the
     file gets the blocks appended and the last folded sequence number in `journal_seq`, then replaces the file
     by a rename, and only then are the folded block files deleted. A block numbered <= journal_seq is already in
     the file and is never applied twice;
  3. readers read the HDF5 file plus the journal blocks numbered above its journal_seq.
So a kill at any instant leaves the old file with every committed block beside it, or the new file with blocks
it already holds (tests/test_hostile.py kills the writer at hundreds of points inside `append`). One writer at a
time: LabelWriter holds an exclusive lock on OUT.lock for its whole life and names the holder to a second one.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np


from models.fileio import Busy, ExclusiveLock, atomic_write, remove_stale_temporaries, require_free_space, save_npz

FORMAT = "molgen-bench-labels-v2"
FORMAT_V1 = "molgen-bench-labels-v1"  # read, and upgraded when appended to (no journal, no per-structure version)
UNITS = {"energy": "eV", "positions": "Angstrom", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3 (Voigt xx yy zz yz xz xy)",
         "cell": "Angstrom"}
PER_ATOM = {"numbers": ((), np.int16), "positions": ((3,), np.float32), "forces": ((3,), np.float32)}
PER_STRUCT = {"n_atoms": ((), np.int32), "offset": ((), np.int64), "energy": ((), np.float64), "stress": ((6,), np.float32),
              "cell": ((3, 3), np.float32), "pbc": ((3,), bool), "source": ((), "str"), "key": ((), "str"),
              "teacher_version": ((), "str")}
FOLD_ROWS = 4096  # fold the journal once it holds this many structures, or half the file's, whichever is more
FOLD_FILES = 256  # ... or this many block files
H5_SLACK = 4 << 20  # bytes beyond the data that an HDF5 write may allocate (chunks of every dataset, metadata)


class LabelsError(ValueError):
    """A labels file that cannot be used (not one, damaged, another teacher, busy); the message names it."""


def offsets_of(n_atoms: np.ndarray) -> np.ndarray:
    """Start row of each structure in ragged per-atom arrays, from the structures' atom counts [S] -> int64 [S]."""
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    return np.cumsum(n_atoms) - n_atoms


def atom_rows(offset: np.ndarray, n_atoms: np.ndarray, index) -> np.ndarray:
    """Rows of ragged per-atom arrays that belong to the structures `index`, in that order."""
    if not len(index):
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(offset[s], offset[s] + n_atoms[s]) for s in index])


def code_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def journal_dir(path: Path) -> Path:
    return Path(path).with_name(Path(path).name + ".journal")


def _journal_blocks(path: Path, after: int) -> list[tuple[int, Path]]:
    """(sequence number, file) of the committed blocks numbered above `after`, in order."""
    d = journal_dir(path)
    if not d.is_dir():
        return []
    return sorted((int(p.stem), p) for p in d.glob("*.npz") if p.stem.isdigit() and int(p.stem) > after)


def rows_to_block(rows: list[dict], teacher_version: str) -> dict[str, np.ndarray]:
    """Row dicts (numbers, positions, forces, energy, stress, cell, pbc, source, key; teacher_version optional,
    by default the writer's) -> columns (no offset)."""
    block = {name: np.concatenate([np.asarray(r[name]).reshape(-1, *shape) for r in rows]).astype(dt) if rows
             else np.zeros((0, *shape), dt) for name, (shape, dt) in PER_ATOM.items()}
    block["n_atoms"] = np.array([len(r["numbers"]) for r in rows], dtype=np.int32)
    for name, (shape, dt) in PER_STRUCT.items():
        if name in ("n_atoms", "offset"):
            continue
        if name == "teacher_version":  # rows copied from another file (merge) keep theirs
            block[name] = np.array([str(r.get(name, teacher_version)) for r in rows], dtype=str)
        elif dt == "str":
            block[name] = np.array([str(r[name]) for r in rows], dtype=str)
        else:
            block[name] = np.array([r[name] for r in rows], dtype=dt).reshape(len(rows), *shape)
    return block


def _read_block(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _h5_create(path, teacher: str, teacher_version: str, block_rows: int = 1024) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        for name, (shape, dt) in {**PER_ATOM, **PER_STRUCT}.items():
            dt = h5py.string_dtype("utf-8") if dt == "str" else dt
            chunk = 4 * block_rows if name in PER_ATOM else block_rows
            f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt, chunks=(chunk, *shape))
        f.attrs.update(format=FORMAT, teacher=teacher, teacher_version=teacher_version, units=json.dumps(UNITS),
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), code_version=code_version(),
                       n_structures=0, label_seconds=0.0, journal_seq=0)


def _h5_append(f, block: dict[str, np.ndarray], seconds: float) -> None:
    """Append a block's columns to an open v2 file (only ever a copy that is not yet the labels file)."""
    s0, a0 = len(f["key"]), len(f["numbers"])
    n_atoms = block["n_atoms"]
    columns = {**block, "offset": a0 + offsets_of(n_atoms)}
    for name, (shape, dt) in {**PER_ATOM, **PER_STRUCT}.items():
        data = columns[name]
        data = np.array(data, dtype=object) if dt == "str" else np.asarray(data, dtype=dt)
        start = a0 if name in PER_ATOM else s0
        f[name].resize(start + len(data), axis=0)
        f[name][start:] = data
    f.attrs["n_structures"] = s0 + len(n_atoms)
    f.attrs["label_seconds"] = float(f.attrs.get("label_seconds", 0.0)) + float(seconds)


def _read_h5(path: Path) -> dict:
    """Committed contents of the HDF5 file alone (no journal), v1 or v2, as numpy arrays plus `attrs`."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise LabelsError(f"{path}: no such labels file") from None
    except OSError as e:
        raise LabelsError(f"{path}: not a readable HDF5 labels file ({e})") from None
    with f:
        fmt = f.attrs.get("format")
        if fmt not in (FORMAT, FORMAT_V1):
            raise LabelsError(f"{path}: not a labels file (format {fmt!r}, expected {FORMAT!r})")
        try:
            s = int(f.attrs.get("n_structures", 0))  # v1 kept rows of a half-written block past this count
            out = {name: (f[name].asstr()[:s] if dt == "str" else f[name][:s])
                   for name, (_, dt) in PER_STRUCT.items() if name != "teacher_version" or fmt == FORMAT}
            a = int(out["offset"][-1] + out["n_atoms"][-1]) if s else 0
            out.update({name: f[name][:a] for name in PER_ATOM})
        except KeyError as e:
            raise LabelsError(f"{path}: damaged labels file, dataset missing ({e})") from None
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    if fmt == FORMAT_V1:
        out["teacher_version"] = np.array([attrs.get("teacher_version", "unknown")] * s, dtype=str)
        attrs["journal_seq"] = 0
    for name in ("source", "key", "teacher_version"):
        out[name] = np.asarray(out[name], dtype=str)
    if any(len(out[k]) != a for k in PER_ATOM) or any(len(out[k]) != s for k in PER_STRUCT):
        raise LabelsError(f"{path}: damaged labels file ({s} structures, {a} atoms expected, {len(out['numbers'])} stored)")
    _check_layout(path, out["n_atoms"], out["key"], len(out["numbers"]), out["offset"])
    out["attrs"] = attrs
    return out


def _check_layout(path: Path, n_atoms: np.ndarray, keys: np.ndarray, rows: int, offset: np.ndarray | None = None) -> None:
    """The atom counts must tile the per-atom rows: every reader slices atoms by them, and one count that disagrees
    shifts every later structure onto its neighbour's atoms."""
    n_atoms = np.asarray(n_atoms, dtype=np.int64)
    expected = offsets_of(n_atoms)
    if (n_atoms < 0).any():
        s = int(np.flatnonzero(n_atoms < 0)[0])
        raise LabelsError(f"{path}: damaged labels file: structure {s} (key {str(keys[s])!r}) has n_atoms {n_atoms[s]}")
    if offset is not None and (np.asarray(offset) != expected).any():
        s = int(np.flatnonzero(np.asarray(offset) != expected)[0])
        if s == 0:
            raise LabelsError(f"{path}: damaged labels file: structure 0 (key {str(keys[0])!r}) starts at atom row {offset[0]}, not 0")
        raise LabelsError(f"{path}: damaged labels file: structure {s - 1} (key {str(keys[s - 1])!r}) has n_atoms {n_atoms[s - 1]}, "
                          f"but the next structure starts {offset[s] - offset[s - 1]} atom rows after it")
    if int(n_atoms.sum()) != rows:
        raise LabelsError(f"{path}: damaged labels file: the atom counts (n_atoms) of its {len(n_atoms)} structures add up "
                          f"to {int(n_atoms.sum())} atoms, and it holds {rows}")


def read_labels(path: Path) -> dict:
    """All committed labels of a file (the HDF5 file and its journal) as numpy arrays in the layout above, with
    `source`, `key` and `teacher_version` as str arrays and the file attributes under `attrs`."""
    path = Path(path)
    for _ in range(10):  # a writer may fold a block into the file between our two reads: read again
        main = _read_h5(path)
        try:
            blocks = [_read_block(p) for _, p in _journal_blocks(path, int(main["attrs"].get("journal_seq", 0)))]
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError) as e:  # a block file is only ever renamed into place whole
            raise LabelsError(f"{journal_dir(path)}: damaged journal block ({type(e).__name__}: {e})") from None
        if not blocks:
            return main
        out = {k: np.concatenate([main[k]] + [b[k] for b in blocks]) for k in {**PER_ATOM, **PER_STRUCT} if k != "offset"}
        _check_layout(journal_dir(path), out["n_atoms"], out["key"], len(out["numbers"]))
        out["offset"] = offsets_of(out["n_atoms"])
        out["attrs"] = {**main["attrs"], "n_structures": len(out["key"]),
                        "label_seconds": float(main["attrs"].get("label_seconds", 0.0)) + sum(float(b["seconds"]) for b in blocks)}
        return out
    raise LabelsError(f"{path}: the journal kept changing while it was read; is a writer folding it? try again")


class LabelWriter:
    """Appends labelled structures to a labels file for one teacher, holding the file's lock until close().

    Creates the file; refuses a file of another teacher, or of another version of the same teacher unless
    mixed_versions (every structure records its teacher version). `fresh` deletes what the file held first.
    Keys already in the file are skipped on append, so a block committed twice (a Ctrl-C between the commit and
    the caller's bookkeeping) is stored once."""

    def __init__(self, path: Path, teacher: str, teacher_version: str, fresh: bool = False, mixed_versions: bool = False,
                 fold_rows: int = FOLD_ROWS, lock: ExclusiveLock | None = None):
        """lock: the file's lock when the caller took it already (it is released by close())."""
        self.path, self.teacher, self.teacher_version, self.fold_rows = Path(path), teacher, teacher_version, fold_rows
        try:
            self.lock = lock or ExclusiveLock(self.path)
        except Busy as e:
            raise LabelsError(str(e)) from None
        try:
            self._open(fresh, mixed_versions)
        except BaseException:
            self.lock.release()
            raise

    def _open(self, fresh: bool, mixed_versions: bool) -> None:
        path, journal = self.path, journal_dir(self.path)
        remove_stale_temporaries(path)  # ours to clean: we hold the lock
        if fresh:
            path.unlink(missing_ok=True)
        if fresh or not path.exists():
            shutil.rmtree(journal, ignore_errors=True)  # blocks of a deleted file must not join a new one
            require_free_space(path, H5_SLACK)
            atomic_write(path, lambda tmp: _h5_create(tmp, self.teacher, self.teacher_version))
        journal.mkdir(exist_ok=True)
        for p in journal.glob("*.tmp"):
            p.unlink()
        lab = read_labels(path)
        attrs = lab["attrs"]
        if attrs["teacher"] != self.teacher:
            raise LabelsError(f"{path} was labelled by teacher {attrs['teacher']!r} ({attrs.get('teacher_version')}), "
                              f"not {self.teacher!r}; use another --out")
        versions = sorted(set(lab["teacher_version"].tolist()) | {attrs["teacher_version"]})
        if versions != [self.teacher_version] and not mixed_versions:
            raise LabelsError(f"{path} holds labels of {', '.join(versions)}; the teacher now is {self.teacher_version}. "
                              f"Label into another --out, or pass --mixed-versions to append (each structure records "
                              f"its teacher version)")
        if attrs["format"] == FORMAT_V1:  # rewrite once in the journalled format, versions per structure
            import h5py

            def upgrade(tmp):
                _h5_create(tmp, self.teacher, attrs["teacher_version"])
                with h5py.File(tmp, "a") as f:
                    _h5_append(f, {k: lab[k] for k in {**PER_ATOM, **PER_STRUCT} if k != "offset"}, attrs.get("label_seconds", 0.0))
                    f.attrs["created"] = attrs.get("created", f.attrs["created"])
            atomic_write(path, upgrade)
        self.folded_seq = int(attrs["journal_seq"])  # of the HDF5 file (0 for a v1 file, upgraded or not)
        blocks = _journal_blocks(path, 0)
        self.seq = max([self.folded_seq] + [s for s, _ in blocks])
        self._keys = set(lab["key"].tolist())
        self.n = len(lab["key"])
        self.fold()  # replay what a killed writer committed, and drop blocks a killed fold already applied

    def keys(self) -> set[str]:
        return set(self._keys)

    def __len__(self) -> int:
        return self.n

    def append(self, rows: list[dict], seconds: float = 0.0) -> int:
        """Commit rows (dicts with numbers, positions, forces, energy, stress, cell, pbc, source, key) as one journal
        block; `seconds` is the wall time spent producing them (failures included), summed into `label_seconds`.
        Returns the number of structures in the file."""
        fresh, seen = [], set()
        for r in rows:
            if r["key"] not in self._keys and r["key"] not in seen:
                seen.add(r["key"])
                fresh.append(r)
        if rows and not fresh:
            seconds = 0.0  # a block stored already: its time is counted already too
        if not fresh and not seconds:
            return self.n
        block = rows_to_block(fresh, self.teacher_version)
        self.seq += 1
        save_npz(journal_dir(self.path) / f"{self.seq:012d}.npz", {**block, "seconds": np.float64(seconds)})
        self._keys |= seen
        self.n += len(fresh)
        if self.seq - self.folded_seq >= FOLD_FILES or self.n - self._rows_in_file >= max(self.fold_rows, self._rows_in_file // 2):
            self.fold()
        return self.n

    def fold(self) -> None:
        """Append the journal's blocks to a copy of the file, rename it over the file, delete the blocks."""
        import h5py

        blocks = _journal_blocks(self.path, self.folded_seq)
        if blocks:
            require_free_space(self.path, self.path.stat().st_size + sum(p.stat().st_size for _, p in blocks) + H5_SLACK)

            def write(tmp):
                shutil.copyfile(self.path, tmp)
                with h5py.File(tmp, "a") as f:
                    for _, p in blocks:
                        b = _read_block(p)
                        _h5_append(f, b, float(b.pop("seconds")))
                    f.attrs["journal_seq"] = blocks[-1][0]
            atomic_write(self.path, write)
            self.folded_seq = blocks[-1][0]
        for p in journal_dir(self.path).glob("*.npz"):  # blocks the file holds now (or held before a killed fold)
            if p.stem.isdigit() and int(p.stem) <= self.folded_seq:
                p.unlink()
        self._rows_in_file = self.n

    def close(self) -> None:
        """Fold the journal and release the lock (also on errors: what is committed stays committed)."""
        if self.lock.fd is None:
            return
        try:
            self.fold()
            if not any(journal_dir(self.path).iterdir()):
                journal_dir(self.path).rmdir()
        finally:
            self.lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
