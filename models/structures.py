"""Structure readers and checks for label.py: files of any supported kind in, (key, source, Atoms) out.

Every record gets a stable key "<path>:<record>" used for resume and dedup:
  - <path> is the input file's path relative to the labels file's directory (anchor), so the key does not
    change when label.py is run from another working directory, nor when the inputs and the labels file
    move together;
  - <record> is the CDVAE `material_id` (CSV), the QM9 index (qm9pack CSV or the pseudo input `qm9[:split]`),
    or the 0-based frame / data-block / molecule index (extxyz, xyz, CIF, SDF).
`source` says where a structure came from: "<parent dir>/<file name>" (e.g. "perov_5/test.csv",
"qm9_gnn_flow_small/samples.extxyz": the run directory names the generator) or "qm9".
A record that cannot be read, or a CIF site that is not one whole atom, is yielded as (key, source,
Failure(reason)) so the caller records it and goes on; only an input that cannot be used at all (QM9 that
does not load, a CSV that is not UTF-8 or gives two records one id) raises InputError.

iter_records yields (key, source, load) with the parsing deferred to load() where a record can be found
without parsing it (CSV rows, QM9 molecules): a resumed run or one shard of many then parses only the
records it labels. iter_structures is the same with every record loaded.
"""
from __future__ import annotations

import csv
import functools
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.fileio import DataError

EXTENSIONS = {".extxyz": "extxyz", ".xyz": "extxyz", ".sdf": "sdf", ".cif": "cif", ".csv": "csv"}


class InputError(ValueError):
    """An input that cannot be used at all (not one bad record of it): label.py stops with this message."""


@dataclass
class Failure:
    reason: str
    kind: str = "input"  # label.py's failure kinds: input (unreadable), check (failed check_structure)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Files and directories (searched recursively, sorted) -> files of a supported kind; 'qm9[:split]' kept."""
    out = []
    for item in inputs:
        p = Path(item)
        if item.split(":")[0] == "qm9" and not p.exists():
            out.append(item)
        elif p.is_dir():
            out += [str(f) for f in sorted(p.rglob("*")) if f.is_file() and f.suffix.lower() in EXTENSIONS]
        else:
            out.append(item)  # a missing file or unknown suffix becomes a recorded failure in iter_structures
    return out


def _key_path(path: str, anchor: Path) -> str:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(anchor))


def source_name(path: str) -> str:
    """'<parent dir>/<file name>' of a path, e.g. 'perov_5/test.csv'."""
    p = Path(os.path.abspath(path))
    return f"{p.parent.name}/{p.name}"


def _loaded(atoms):
    return lambda: atoms


def iter_records(inputs: list[str], anchor: Path = Path(".")):
    """Yield (key, source, load) for every record of every input, in input order; load() -> ase.Atoms | Failure."""
    for item in expand_inputs(inputs):
        if item.split(":")[0] == "qm9" and not Path(item).exists():
            yield from _read_qm9(item)
            continue
        kp, source = _key_path(item, anchor), source_name(item)
        kind = EXTENSIONS.get(Path(item).suffix.lower())
        if kind is None:
            yield kp, source, _loaded(Failure(f"{item}: unsupported file type (known: {sorted(EXTENSIONS)})"))
            continue
        if not Path(item).is_file():
            yield kp, source, _loaded(Failure(f"{item}: no such file"))
            continue
        if os.path.getsize(item) == 0:
            yield kp, source, _loaded(Failure(f"{item}: empty file"))
            continue
        reader = {"extxyz": _read_ase, "cif": _read_ase, "sdf": _read_sdf, "csv": _read_csv}[kind]
        yield from ((f"{kp}:{rec}", source, load) for rec, load in reader(item, kind))


def iter_structures(inputs: list[str], anchor: Path = Path(".")):
    """Yield (key, source, ase.Atoms | Failure) for every record of every input, in input order."""
    for key, source, load in iter_records(inputs, anchor):
        yield key, source, load()


def _read_ase(path: str, kind: str):
    """extxyz / xyz / multi-block CIF through ase.io.iread; a parse error ends the file (ASE cannot skip it)."""
    import ase.io

    i = 0
    try:
        for atoms in ase.io.iread(path, index=":", format=kind):
            yield i, _loaded(whole_atoms(atoms, f"{path}, data block {i}") if kind == "cif" else atoms)
            i += 1
    except Exception as e:  # ASE raises many types for malformed text; a KeyError is an unknown element symbol
        what = f"unknown element {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        yield i, _loaded(Failure(f"{path}, record {i}: cannot parse {kind} ({what}); later records of this file are skipped"))
    if i == 0:
        yield 0, _loaded(Failure(f"{path}: no structures in file"))


def _read_sdf(path: str, kind: str):
    """Multi-molecule SDF through RDKit, hydrogens kept, no sanitisation (generated molecules may not sanitise)."""
    import ase
    from rdkit import Chem

    n = 0
    for i, mol in enumerate(Chem.SDMolSupplier(path, removeHs=False, sanitize=False)):
        n += 1
        if mol is None or mol.GetNumConformers() == 0:
            yield i, _loaded(Failure(f"{path}, molecule {i}: RDKit cannot parse it"))
            continue
        yield i, _loaded(ase.Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()], positions=mol.GetConformer().GetPositions()))
    if n == 0:
        yield 0, _loaded(Failure(f"{path}: no molecules in SDF file"))


def utf8_lines(f, path, what: str):
    """The lines of a file opened in binary, decoded one at a time as UTF-8: a byte that is not UTF-8 raises
    DataError naming the file and its line, where the csv reader would end in a UnicodeDecodeError. what: the kind
    of file, for the message."""
    for number, line in enumerate(f, 1):
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}, line {number}: not UTF-8 text ({e.reason} at column {e.start + 1}); {what} "
                            f"is UTF-8") from None


def _read_csv(path: str, kind: str):
    """CDVAE CSV (a `cif` column, `material_id` as record id) or a qm9pack CSV (`XYZ_Ang`, `Index`); a row's
    CIF / XYZ text is parsed only when it is loaded. A file that is not UTF-8, or that gives two records the same
    id, raises InputError: the id is the record's key, so one of the two would never be labelled."""
    csv.field_size_limit(1 << 24)
    with open(path, "rb") as f:
        reader = csv.DictReader(utf8_lines(f, path, "a CSV file"))
        try:
            cols = set(reader.fieldnames or [])
            if "cif" not in cols and "XYZ_Ang" not in cols:
                yield "", _loaded(Failure(f"{path}: CSV has neither a `cif` (CDVAE) nor an `XYZ_Ang` (qm9pack) column"))
                return
            first_line, seen = reader.line_num + 1, {}  # record id -> (its lines, its row)
            for row in reader:
                id_column = next((c for c in ("material_id", "Index") if row.get(c)), None)
                rec = row[id_column] if id_column else f"row{reader.line_num}"
                lines, first_line = f"lines {first_line}-{reader.line_num}", reader.line_num + 1
                if rec in seen:
                    earlier, earlier_row = seen[rec]
                    what = "the same row twice" if earlier_row == row else "two different structures"
                    raise InputError(f"{path}: {earlier} and {lines} have the same {id_column} {rec} ({what}); label.py keys "
                                     f"a record by its file and {id_column}, so only one of them would be labelled. Give "
                                     f"each record its own {id_column}, or delete the repeated one")
                seen[rec] = lines, row
                yield rec, functools.partial(_parse_csv_row, row, f"{path}, {lines} ({id_column or 'record'} {rec})")
        except DataError as e:  # not UTF-8
            raise InputError(str(e)) from None


def _parse_csv_row(row: dict, where: str):
    import ase
    import ase.io

    from models.molecules import parse_qm9pack_row

    try:
        if "cif" in row:
            return read_p1_cif(row["cif"]) or whole_atoms(ase.io.read(io.StringIO(row["cif"]), format="cif"), where)
        symbols, xyz = parse_qm9pack_row(row)
        return ase.Atoms(symbols=symbols, positions=xyz.reshape(-1, 3))
    except Exception as e:  # corrupt CIF text, unknown element (KeyError), malformed numbers
        what = f"unknown element {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        return Failure(f"{where}: cannot parse ({what})")


OCCUPANCY_TOLERANCE = 1e-3  # an occupancy printed as 0.9999 or 1.0001 is a full site, rounded when it was written


def partial_site(occupancies: dict) -> str | None:
    """None for a site of one element at occupancy 1 (within OCCUPANCY_TOLERANCE), else what it holds, e.g.
    "Cu at occupancy 0.5 and Au at occupancy 0.5". occupancies: element -> occupancy, as pymatgen's site.species
    or ASE's info["occupancy"] give them. A generator and a teacher see whole atoms only: a partial, mixed, empty or
    over-full site would become a whole atom of one of its elements, or no atom at all."""
    if len(occupancies) == 1 and abs(float(next(iter(occupancies.values()))) - 1) <= OCCUPANCY_TOLERANCE:
        return None
    # pymatgen (check_occu=False) keeps an occupancy of 0 or below as 1e-8
    return " and ".join(f"{el} at occupancy {'<= 0' if 0 < occ <= 1e-6 else f'{occ:g}'}"
                        for el, occ in ((str(el), float(occ)) for el, occ in occupancies.items()))


def whole_atoms(atoms, where: str):
    """A crystal ASE read from CIF, or a Failure naming its first site that is not one whole atom. ASE makes every
    site a whole atom whatever its occupancy (0.5, -1, a Cu/Au mix: it keeps the occupancies in info), and keeps one
    atom where two rows of the CIF's _atom_site loop give the same position (spacegroup_kinds then lacks a row)."""
    occupancy = atoms.info.get("occupancy") or {}
    for row, occupancies in occupancy.items():
        if held := partial_site(occupancies):
            return Failure(f"{where}: the site of row {int(row) + 1} of the _atom_site loop holds {held}; only sites of "
                           f"one element at occupancy 1 can be labelled")
    if "spacegroup_kinds" in atoms.arrays:
        if merged := sorted(set(map(int, occupancy)) - set(atoms.arrays["spacegroup_kinds"].tolist())):
            return Failure(f"{where}: row {merged[0] + 1} of the _atom_site loop is at the position of another row; the "
                           f"site would be one atom, not two")
    return atoms


P1_CELL_TAGS = ["_cell_length_a", "_cell_length_b", "_cell_length_c", "_cell_angle_alpha", "_cell_angle_beta", "_cell_angle_gamma"]


def read_p1_cif(text: str):
    """The CIFs pymatgen writes, as in every CDVAE / MP-20 CSV row (space group P 1, the identity as the only
    symmetry operation, full occupancy), read 5x faster than ase.io.read: its general CIF machinery is
    most of label.py's own cost per crystal. Gives the same Atoms as ASE (tests/test_label.py checks it);
    returns None for anything else, which ASE then reads."""
    import ase
    from ase.data import atomic_numbers
    from ase.geometry import cellpar_to_cell

    tags, loops, lines = {}, [], text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        if line.startswith("data_"):
            if tags or loops:
                return None  # a second data block
            continue
        if line == "loop_":
            cols, rows = [], []
            while i < len(lines) and lines[i].strip().startswith("_"):
                cols.append(lines[i].strip())
                i += 1
            while i < len(lines) and lines[i].strip() and not lines[i].strip().startswith(("_", "loop_", "data_", "#")):
                rows.append(lines[i].strip())
                i += 1
            loops.append((cols, rows))
        elif line.startswith("_"):
            name, _, value = line.partition(" ")
            tags[name] = value.strip().strip("'\"")
        else:
            return None  # multi-line values and anything else unusual
    try:
        cellpar = [float(tags[t]) for t in P1_CELL_TAGS]
        (sym_cols, sym_rows), (site_cols, site_rows) = loops
    except (KeyError, ValueError):
        return None
    if tags.get("_symmetry_space_group_name_H-M") != "P 1" or sym_cols[-1] != "_symmetry_equiv_pos_as_xyz" or \
            [r.split(None, 1)[-1].strip("'\"") for r in sym_rows] != ["x, y, z"]:
        return None
    need = ["_atom_site_type_symbol", "_atom_site_fract_x", "_atom_site_fract_y", "_atom_site_fract_z"]
    if not set(need) <= set(site_cols):
        return None
    table = [r.split() for r in site_rows]
    if not table or any(len(r) != len(site_cols) for r in table):
        return None
    col = {c: k for k, c in enumerate(site_cols)}
    try:
        numbers = [atomic_numbers[r[col["_atom_site_type_symbol"]]] for r in table]
        frac = np.array([[float(r[col[c]]) for c in need[1:]] for r in table])
        if "_atom_site_occupancy" in col and any(float(r[col["_atom_site_occupancy"]]) != 1.0 for r in table):
            return None
    except (KeyError, ValueError):  # an unknown symbol or an uncertainty like 0.25(3): ASE says what is wrong
        return None
    # ASE's path, step for step, so the floats agree to the last bit: fractional -> Cartesian -> fractional
    # (ase.io.cif builds an unsymmetrised Atoms first), wrapped into the cell (ase.spacegroup), -> Cartesian.
    cell = cellpar_to_cell(cellpar)
    frac = (ase.Atoms(numbers=numbers, scaled_positions=frac, cell=cell).get_scaled_positions() + 0.0) % 1.0
    diff = frac[:, None] - frac[None]
    diff -= np.rint(diff)
    if np.all(np.abs(diff) < 1e-3, axis=-1).sum() > len(frac):  # ASE merges sites this close; leave that to it
        return None
    return ase.Atoms(numbers=numbers, scaled_positions=frac, cell=cell, pbc=True)


def _read_qm9(item: str):
    """'qm9' (all) or 'qm9:train|valid|test' (EDM split) via models.molecules.load_qm9 (cached in ./data or $MOLGEN_DATA)."""
    from models.molecules import load_qm9

    split = item.split(":")[1] if ":" in item else None
    if split not in (None, "train", "valid", "test"):
        raise InputError(f"{item}: unknown QM9 split {split!r}; use qm9, qm9:train, qm9:valid or qm9:test")
    try:
        mols = load_qm9(split)
    except Exception as e:
        raise InputError(f"{item}: cannot load QM9 ({type(e).__name__}: {e})") from None
    for i, qm9_id in enumerate(mols.ids.tolist()):
        yield f"qm9:{qm9_id}", "qm9", functools.partial(mols.to_atoms, i)


# ----------------------------------------------------------------------------------------------
# Checks (before the teacher is called) and the duplicate fingerprint


def unknown_elements(atoms, known) -> list[str]:
    """The symbols of atoms' elements whose atomic numbers are not in `known` (a teacher's or a student's), sorted."""
    return sorted({s for s, z in zip(atoms.get_chemical_symbols(), atoms.numbers) if z not in known})


def check_structure(atoms, min_dist: float = 0.5, isolated_dist: float = 4.0) -> str | None:
    """None if the structure can be labelled, else the reason. Distances include periodic images (minimum
    image and beyond), so a 1-atom unit cell is not 'isolated'."""
    n = len(atoms)
    if n == 0:
        return "no atoms"
    z = atoms.numbers
    if (z <= 0).any() or (z > 118).any():
        return f"unknown element(s) with atomic number {sorted(set(z[(z <= 0) | (z > 118)].tolist()))}"
    if not np.isfinite(atoms.positions).all():
        return "non-finite (NaN or Inf) positions"
    if atoms.pbc.any():
        if not np.isfinite(atoms.cell.array).all() or abs(atoms.cell.volume) < 1e-3:
            return f"degenerate or non-finite cell (volume {atoms.cell.volume:.3g} A^3)"
        if not atoms.pbc.all():
            return f"mixed periodicity {atoms.pbc.tolist()} is not supported"
    cutoff = max(min_dist, isolated_dist)
    if cutoff <= 0:
        return None
    nearest, (i, j, d) = nearest_neighbours(atoms, cutoff)
    if min_dist > 0 and d < min_dist:
        return f"overlapping atoms {i} and {j}: {d:.3f} A apart (< --min-dist {min_dist})"
    if isolated_dist > 0 and (n > 1 or atoms.pbc.any()):
        lonely = np.flatnonzero(nearest >= isolated_dist)
        if len(lonely):
            return f"isolated atom(s) {lonely[:5].tolist()}: no neighbour within --isolated-dist {isolated_dist} A"
    return None


DENSE_LIMIT = 1 << 20  # image-pair distances computed at once; above it, ASE's cell-list neighbour search


def nearest_neighbours(atoms, cutoff: float, dense_limit: int = DENSE_LIMIT):
    """Distance from each atom to its nearest neighbour ([n], inf where none is within cutoff) and the closest
    pair (i, j, d) (d = inf if none), periodic images included. Small structures (all of this project's
    molecules and unit cells) use all image pairs at once in numpy, about 20x faster than
    ase.neighborlist for them; large ones use the neighbour list, whose cost grows linearly."""
    pos, n = atoms.positions, len(atoms)
    shifts = np.zeros((1, 3))
    if atoms.pbc.any():
        cell = atoms.cell.array
        pos = (np.linalg.solve(cell.T, pos.T).T % 1.0) @ cell  # wrapped: fractional differences lie in (-1, 1)
        # an image t_k cells away along axis k is at least (|t_k| - 1) layer widths away
        widths = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        reps = np.ceil(cutoff / widths).astype(int)
        grid = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in reps], indexing="ij"), -1).reshape(-1, 3)
        shifts = grid @ cell  # [T, 3]; the zero shift is the middle row
    if len(shifts) * n * n > dense_limit:
        from ase.neighborlist import neighbor_list

        i, j, d = neighbor_list("ijd", atoms, cutoff)
        nearest = np.full(n, np.inf)
        np.minimum.at(nearest, i, d)
        k = np.argmin(d) if len(d) else None
        return nearest, ((int(i[k]), int(j[k]), float(d[k])) if k is not None else (-1, -1, np.inf))
    d = np.linalg.norm(pos[None, :, None] - pos[None, None, :] - shifts[:, None, None], axis=-1)  # [T, n, n]
    d[len(shifts) // 2, np.arange(n), np.arange(n)] = np.inf  # an atom is not its own neighbour
    d[d >= cutoff] = np.inf
    nearest = d.min(axis=(0, 2))
    t, i, j = np.unravel_index(np.argmin(d), d.shape)
    return nearest, (int(i), int(j), float(d[t, i, j]))


def fingerprint(numbers: np.ndarray, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, decimals: int = 2) -> str:
    """Duplicate fingerprint: same composition and geometry after rounding to 0.01 A, any atom order.
    Molecules are centred first (translation invariant); crystals are compared as given (wrapped into
    the cell), so a shifted or rotated copy of a crystal is not caught."""
    pos = np.asarray(positions, dtype=np.float64)
    if np.asarray(pbc).any():
        frac = np.linalg.solve(np.asarray(cell, np.float64).T, pos.T).T % 1.0
        pos = np.round(frac, decimals + 1) % 1.0 @ np.asarray(cell, np.float64)
    else:
        pos = pos - pos.mean(0)
    rows = np.round(np.column_stack([numbers, pos]), decimals) + 0.0  # + 0.0 turns -0.0 into 0.0
    rows = rows[np.lexsort(rows.T[::-1])]
    h = hashlib.sha1(rows.tobytes())
    h.update(np.round(np.asarray(cell, np.float64), decimals).tobytes() + np.asarray(pbc, bool).tobytes())
    return h.hexdigest()
