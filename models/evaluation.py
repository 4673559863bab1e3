"""What the evaluations of every domain share (evaluate.py; models/molecule_evaluation.py, crystal_evaluation.py and
student_evaluation.py): the reader of generated structures, the fixed test subset of a reference row, and the
metrics JSON.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

from models.fileio import DataError, atomic_write


SAMPLE_FORMATS = "extended XYZ or XYZ (.extxyz, .xyz), SDF (.sdf) for molecules, CIF (.cif, multi-block) for crystals, or a directory of such files"


def read_frames(path: Path) -> list[tuple[str, object]]:
    """(where, ase.Atoms) of every structure of a samples file or directory, in order: sample.py's extended XYZ, or an
    outside model's XYZ, SDF, CIF (multi-block) or a directory of these (SAMPLE_FORMATS; read as label.py reads its
    inputs, models/structures.py). `where` locates the structure in messages: "line 9" (its atom-count line) in an
    XYZ file, "record 3" (0-based) in an SDF or CIF file, "<file> record 0" in a directory. A structure that cannot be
    read raises DataError naming the file and where it is.

    XYZ frames are split here (atom count line, comment line, atoms) and parsed one at a time, so an error names the
    structure and line where it is (ASE's own reader indexes the whole file before it parses). A frame of no atoms,
    or with ASE's dummy atom X (atomic number 0), is read as it is: each domain counts it as a sample that failed."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in (".sdf", ".cif"):
        return _read_other(path)
    import ase.io

    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    frames, start = [], 0
    while start < len(lines):
        if not lines[start].strip():  # blank lines between or after frames
            start += 1
            continue
        where = f"{path}: structure {len(frames) + 1} (line {start + 1})"
        try:
            n = int(lines[start])
            if n < 0:
                raise ValueError(f"{n} atoms")
            atoms = ase.io.read(io.StringIO("".join(lines[start:start + n + 2])), format="extxyz")
        except Exception as e:  # ASE raises many exception types for malformed input; all mean "unreadable"
            raise DataError(f"{where} is not valid extended XYZ ({type(e).__name__}: {e})") from None
        frames.append((f"line {start + 1}", atoms))
        start += n + 2
    if not frames:
        raise DataError(f"{path}: no structures (empty file)")
    return frames


def _read_other(path: Path) -> list[tuple[str, object]]:
    """SDF, CIF or a directory through models/structures.py's readers; the first record that cannot be read (or a
    CIF site that is not one whole atom) raises DataError with the reader's reason."""
    from models.structures import Failure, iter_structures

    frames = []
    for key, _, atoms in iter_structures([str(path)], anchor=path if path.is_dir() else path.parent):
        name, record = key.rsplit(":", 1)
        if name.lower().endswith(".csv"):
            raise DataError(f"{path}: {name} is a CSV; samples come as {SAMPLE_FORMATS}")
        if isinstance(atoms, Failure):
            raise DataError(f"{path}: {atoms.reason}")
        frames.append((f"{name} record {record}" if path.is_dir() else f"record {record}", atoms))
    if not frames:  # a file without structures is a Failure above; this is a directory without samples files
        raise DataError(f"{path}: a directory with no samples files ({SAMPLE_FORMATS})")
    return frames


def ordinals(indices: list[int], lines: list[str], most: int = 5) -> str:
    """'structures 2 (line 9), 5 (line 30) and 3 more': the structures at `indices` (0-based) of a file whose
    structures start at `lines` (read_frames')."""
    shown = ", ".join(f"{i + 1} ({lines[i]})" for i in indices[:most])
    more = f" and {len(indices) - most} more" if len(indices) > most else ""
    return f"structure{'s' if len(indices) > 1 else ''} {shown}{more}"


def reference_subset(n: int, n_test: int | None) -> list[int]:
    """The test structures a reference row scores, of n: with --n-test, the same random n_test every time (seed 0),
    in their file order, so that the row can have a model row's sample count; all without it."""
    if n_test is None or n_test >= n:
        return list(range(n))
    return sorted(np.random.default_rng(0).choice(n, n_test, replace=False).tolist())


def _nan_to_none(v):
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_metrics(path: Path, result: dict) -> None:
    """The metrics JSON, written atomically (models/fileio.py; a full disk raises DiskFull naming the file). JSON has
    no NaN: undefined metrics (and other non-finite values) are written as null."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(_nan_to_none(result), indent=2) + "\n"))
