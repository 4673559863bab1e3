"""The molecule domain's data, QM9: load, cache, split and batch.

Source of truth is the CSV that the `qm9pack` wheel ships (all 130,831 characterised molecules with
B3LYP coordinates). Without qm9pack, the original QM9 release (one .xyz file per molecule in a
tar.bz2, plus the list of 3,054 uncharacterised molecules) is downloaded and parsed instead. Either
way the molecules are converted once into a compact .npz cache that later loads read in well under a
second.

Inside the models a batch is a dense padded tensor set (models/README.md, "Data contracts"):
    types [B, N] long (index into ATOM_SYMBOLS), pos [B, N, 3] float (centred), mask [B, N] bool.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.fileio import DataError, check_writable_dir, download, finite_number, save_npz
from models.geometry import remove_mean
from models.labels import atom_rows, offsets_of

ATOM_SYMBOLS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
SYMBOL_TO_TYPE = {s: i for i, s in enumerate(ATOM_SYMBOLS)}
NUMBER_TO_TYPE = {z: i for i, z in enumerate(ATOMIC_NUMBERS)}

# EDM / Cormorant split of the 130,831 characterised molecules (sorted by QM9 index):
# a permutation from np.random.seed(0), then 100,000 train / 17,748 valid / 13,083 test.
QM9_N_MOLECULES = 130_831
QM9_SPLIT_SIZES = {"train": 100_000, "valid": 17_748, "test": 13_083}
QM9_SPLIT_SEED = 0

QM9_XYZ_URL = "https://springernature.figshare.com/ndownloader/files/3195389"  # dsgdb9nsd.xyz.tar.bz2
QM9_EXCLUDED_URL = "https://springernature.figshare.com/ndownloader/files/3195404"  # uncharacterized.txt
CACHE_VERSION = 2  # 2: the conditioning properties

HARTREE_IN_MEV = 27211.386
# The six properties of EDM's conditional table, in EDM's units: name -> (qm9pack CSV column, field of the original
# release's second line "gdb <index> A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv", factor to the unit, unit).
PROPERTIES = {
    "alpha": ("Polarizability_bohr3", 6, 1.0, "Bohr^3"),
    "gap": ("HOMO_LUMO_gap_au", 9, HARTREE_IN_MEV, "meV"),
    "homo": ("HOMO_au", 7, HARTREE_IN_MEV, "meV"),
    "lumo": ("LUMO_au", 8, HARTREE_IN_MEV, "meV"),
    "mu": ("Dipole_debye", 5, 1.0, "D"),
    "Cv": ("Heatcapacity_Cv_cal_mol_K", 16, 1.0, "cal/(mol K)"),
}


@dataclass
class MoleculeSet:
    """Molecules as ragged, concatenated arrays (the same layout as the labels HDF5 file).

    numbers [A] int8 atomic numbers, positions [A, 3] float32 Angstrom (as in the source, not centred),
    n_atoms [S] int32, offset [S] int64, smiles [S] str, ids [S] int32 (QM9 index, 1-based), properties [S, 6]
    float64: PROPERTIES in their order and units, NaN where the source has none.
    """

    numbers: np.ndarray
    positions: np.ndarray
    n_atoms: np.ndarray
    offset: np.ndarray
    smiles: np.ndarray
    ids: np.ndarray
    properties: np.ndarray

    def __len__(self) -> int:
        return len(self.n_atoms)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(atomic numbers [n], positions [n, 3]) of molecule i."""
        lo, n = int(self.offset[i]), int(self.n_atoms[i])
        return self.numbers[lo:lo + n], self.positions[lo:lo + n]

    def subset(self, idx) -> "MoleculeSet":
        idx = np.asarray(idx, dtype=np.int64)
        rows = atom_rows(self.offset, self.n_atoms, idx)
        return MoleculeSet(self.numbers[rows], self.positions[rows], self.n_atoms[idx], offsets_of(self.n_atoms[idx]),
                           self.smiles[idx], self.ids[idx], self.properties[idx])

    def property_values(self, name: str) -> np.ndarray:
        """[S] values of one of PROPERTIES, in its unit; DataError if the source had none."""
        values = self.properties[:, list(PROPERTIES).index(name)]
        if np.isnan(values).any():
            raise DataError(f"QM9 property {name} is missing for {int(np.isnan(values).sum())} of {len(values)} molecules "
                            "(a cache or CSV without the property columns): rebuild the cache from qm9pack")
        return values

    def to_atoms(self, i: int):
        import ase
        numbers, positions = self[i]
        return ase.Atoms(numbers=numbers.astype(int), positions=positions.astype(np.float64))

    def n_atoms_histogram(self, n_max: int | None = None) -> np.ndarray:
        """Probability of each molecule size 0..n_max, used to pick sizes at sampling time."""
        n_max = int(self.n_atoms.max()) if n_max is None else n_max
        counts = np.bincount(self.n_atoms, minlength=n_max + 1)[: n_max + 1].astype(np.float64)
        return counts / counts.sum()

    def type_indices(self) -> np.ndarray:
        """Atom-type indices [A] (H C N O F -> 0..4)."""
        lut = np.full(128, -1, dtype=np.int64)
        for z, t in NUMBER_TO_TYPE.items():
            lut[z] = t
        return lut[self.numbers]


# ----------------------------------------------------------------------------------------------
# Parsing


def _check_molecule(symbols: list[str], xyz: np.ndarray, where: str) -> np.ndarray:
    """Validate one molecule and return its atomic numbers; `where` names the file and record."""
    unknown = sorted({s for s in symbols if s not in SYMBOL_TO_TYPE})
    if unknown:
        raise DataError(f"{where}: unknown element(s) {unknown}; QM9 has only {list(ATOM_SYMBOLS)}")
    if xyz.shape != (len(symbols), 3):
        raise DataError(f"{where}: {len(symbols)} elements but coordinates of shape {xyz.shape}")
    if len(symbols) == 0:
        raise DataError(f"{where}: molecule has no atoms")
    if not np.isfinite(xyz).all():
        raise DataError(f"{where}: non-finite (NaN or Inf) coordinates")
    if len(symbols) > 1:
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1) + np.eye(len(symbols)) * 1e9
        if d.min() < 0.5:
            i, j = np.unravel_index(d.argmin(), d.shape)
            raise DataError(f"{where}: atoms {i} and {j} overlap ({d.min():.3f} A apart)")
    return np.array([ATOMIC_NUMBERS[SYMBOL_TO_TYPE[s]] for s in symbols], dtype=np.int8)


def _pack(records: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray]]) -> MoleculeSet:
    """records: (qm9 index, smiles, numbers [n], positions [n, 3], properties [6]) -> MoleculeSet sorted by index."""
    records.sort(key=lambda r: r[0])
    n_atoms = np.array([len(r[2]) for r in records], dtype=np.int32)
    return MoleculeSet(
        numbers=np.concatenate([r[2] for r in records]).astype(np.int8),
        positions=np.concatenate([r[3] for r in records]).astype(np.float32),
        n_atoms=n_atoms,
        offset=offsets_of(n_atoms),
        smiles=np.array([r[1] for r in records]),
        ids=np.array([r[0] for r in records], dtype=np.int32),
        properties=np.array([r[4] for r in records], dtype=np.float64).reshape(len(records), len(PROPERTIES)),
    )


def _properties(values: list, where: str) -> np.ndarray:
    """The PROPERTIES of one record from its source strings (None: the source has no such column) -> [6] in their
    units."""
    out = np.full(len(PROPERTIES), np.nan)
    for i, ((name, (_, _, factor, _)), text) in enumerate(zip(PROPERTIES.items(), values)):
        if text is not None:  # the release writes Mathematica exponents (1.2*^-6)
            out[i] = finite_number(text.replace("*^", "e"), f"property {name}", where) * factor
    return out


def parse_qm9pack_row(row: dict) -> tuple[list[str], np.ndarray]:
    """The `Elements` and `XYZ_Ang` strings of one qm9pack CSV row -> (symbols, flat float64 coordinates).

    No checks: callers decide what a bad row means (an error here, a recorded failure in label.py).
    Raises TypeError / ValueError / AttributeError on text that is not a list of symbols and numbers."""
    symbols = [s.strip(" '\"") for s in row["Elements"].strip("[] ").split(",") if s.strip()]
    flat = row["XYZ_Ang"].replace("[", " ").replace("]", " ").replace(",", " ").split()
    return symbols, np.array([float(v) for v in flat], dtype=np.float64)


def read_qm9pack_csv(paths: list[Path]) -> MoleculeSet:
    """Read qm9pack's CSV files (columns Index, SMILES, Elements, XYZ_Ang, ...)."""
    import csv

    csv.field_size_limit(1 << 24)
    records = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"Index", "SMILES", "Elements", "XYZ_Ang"} - set(reader.fieldnames or [])
            if missing:
                raise DataError(f"{path}: not a qm9pack CSV, missing column(s) {sorted(missing)}")
            for row in reader:
                where = f"{path}, line {reader.line_num} (QM9 index {row.get('Index')})"
                try:
                    index = int(row["Index"])
                    symbols, xyz = parse_qm9pack_row(row)
                except (TypeError, ValueError, AttributeError) as e:
                    raise DataError(f"{where}: malformed row ({e})") from None
                if xyz.size % 3:
                    raise DataError(f"{where}: {xyz.size} coordinate values, not a multiple of 3")
                numbers = _check_molecule(symbols, xyz.reshape(-1, 3), where)
                properties = _properties([row.get(column) for column, _, _, _ in PROPERTIES.values()], where)
                records.append((index, row["SMILES"], numbers, xyz.reshape(-1, 3), properties))
    if not records:
        raise DataError(f"{', '.join(map(str, paths))}: no molecules")
    return _pack(records)


def parse_qm9_xyz(text: str, where: str) -> tuple[int, str, np.ndarray, np.ndarray, np.ndarray]:
    """One file of the original QM9 release -> (index, relaxed SMILES, numbers, positions, properties).

    Layout: n atoms; 'gdb <index> <17 properties>'; n lines 'El x y z charge'; frequencies;
    'SMILES_GDB SMILES_B3LYP'; InChIs. Numbers may use Mathematica exponents ('1.2*^-6').
    """
    lines = text.splitlines()
    try:
        n = int(lines[0])
        index = int(lines[1].split()[1])
        symbols, xyz = [], []
        for line in lines[2:2 + n]:
            fields = line.replace("*^", "e").split()
            symbols.append(fields[0])
            xyz.append([float(v) for v in fields[1:4]])
        smiles = lines[3 + n].split()[-1]
        header = lines[1].split()
        properties = _properties([header[field] for _, field, _, _ in PROPERTIES.values()], where)
    except (IndexError, ValueError) as e:
        raise DataError(f"{where}: malformed QM9 xyz record ({e})") from None
    numbers = _check_molecule(symbols, np.array(xyz, dtype=np.float64).reshape(-1, 3), where)
    return index, smiles, numbers, np.array(xyz, dtype=np.float64), properties


def read_qm9_tarball(tar_path: Path, excluded_path: Path | None) -> MoleculeSet:
    """The original release: dsgdb9nsd.xyz.tar.bz2, minus the uncharacterised molecules."""
    excluded: set[int] = set()
    if excluded_path is not None:
        # uncharacterized.txt: a header, then rows whose first column is the QM9 index.
        for line in Path(excluded_path).read_text().splitlines():
            fields = line.split()
            if fields and fields[0].isdigit():
                excluded.add(int(fields[0]))
    records = []
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(".xyz"):
                    continue
                text = tar.extractfile(member).read().decode()
                rec = parse_qm9_xyz(text, f"{tar_path}:{member.name}")
                if rec[0] not in excluded:
                    records.append(rec)
    except (tarfile.TarError, EOFError, OSError) as e:  # truncated or corrupt archives
        raise DataError(f"{tar_path}: not a readable tar archive ({e})") from None
    if not records:
        raise DataError(f"{tar_path}: no .xyz molecules found")
    return _pack(records)


def qm9pack_csv_files() -> list[Path] | None:
    """qm9pack's data files, found without importing qm9pack (its import needs pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    files = sorted(data.glob("qm9_part*.csv"))
    return files or None


# ----------------------------------------------------------------------------------------------
# Cache and splits


def default_data_dir() -> Path:
    return Path(os.environ.get("MOLGEN_DATA", "data"))


def save_cache(mols: MoleculeSet, path: Path) -> None:
    save_npz(path, dict(version=CACHE_VERSION, numbers=mols.numbers, positions=mols.positions, n_atoms=mols.n_atoms,
                        offset=mols.offset, smiles=mols.smiles.astype(str), ids=mols.ids, properties=mols.properties))


CACHE_ARRAYS = ("version", "numbers", "positions", "n_atoms", "offset", "smiles", "ids", "properties")


def load_cache(path: Path) -> MoleculeSet:
    """Read data/qm9.npz; DataError naming the file when it is unreadable, incomplete, inconsistent or stale."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in CACHE_ARRAYS if k not in z.files]
            if missing:
                raise DataError(f"{path}: QM9 cache lacks arrays {missing}")
            if int(z["version"]) != CACHE_VERSION:
                raise DataError(f"{path}: QM9 cache version {int(z['version'])}, expected {CACHE_VERSION}")
            mols = MoleculeSet(z["numbers"], z["positions"], z["n_atoms"], z["offset"], z["smiles"], z["ids"], z["properties"])
    except DataError:
        raise
    except Exception as e:  # truncated zip, garbage, pickled objects (refused), bad dtypes
        raise DataError(f"{path}: unreadable QM9 cache ({type(e).__name__}: {e})") from None
    S, A = len(mols.n_atoms), len(mols.numbers)
    consistent = (S > 0 and len(mols.offset) == len(mols.smiles) == len(mols.ids) == S and mols.positions.shape == (A, 3)
                  and mols.properties.shape == (S, len(PROPERTIES))
                  and int(mols.offset[-1]) + int(mols.n_atoms[-1]) == A and np.isfinite(mols.positions).all())
    if not consistent:
        raise DataError(f"{path}: QM9 cache is inconsistent ({S} molecules, {A} atoms)")
    return mols


def load_qm9(split: str | None = None, data_dir: str | Path | None = None, source: str = "auto") -> MoleculeSet:
    """All of QM9 (split=None) or one of 'train' / 'valid' / 'test' (the EDM split).

    source: 'auto' (qm9pack if installed, else download), 'qm9pack' or 'download'.
    The first call writes data_dir/qm9.npz; later calls read only that. A damaged or stale cache is reported
    (naming the file) and rebuilt from the source.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    cache = data_dir / "qm9.npz"
    mols = None
    if cache.exists():
        try:
            mols = load_cache(cache)
        except DataError as e:
            print(f"warning: {e}; rebuilding it from the QM9 source", file=sys.stderr)
    if mols is None:
        try:  # before minutes of parsing, not after
            check_writable_dir(data_dir, "the QM9 cache directory")
        except OSError as e:
            raise DataError(f"{e} (pass --data-dir or set $MOLGEN_DATA to a writable directory)") from None
        mols = _read_source(data_dir, source)
        save_cache(mols, cache)
    if split is None:
        return mols
    return mols.subset(split_indices(len(mols))[split])


def _read_source(data_dir: Path, source: str) -> MoleculeSet:
    csvs = qm9pack_csv_files() if source in ("auto", "qm9pack") else None
    if csvs:
        return read_qm9pack_csv(csvs)
    if source == "qm9pack":
        raise DataError("qm9pack is not installed: `pip install qm9pack` (or use source='download')")
    raw = data_dir / "raw"
    tar, excluded = raw / "dsgdb9nsd.xyz.tar.bz2", raw / "uncharacterized.txt"
    for url, dest in ((QM9_XYZ_URL, tar), (QM9_EXCLUDED_URL, excluded)):
        if not dest.exists():
            try:
                download(url, dest)
            except OSError as e:  # offline, proxy, HTTP error
                raise DataError(f"cannot download QM9 from {url} into {dest} ({e}); `pip install qm9pack` carries QM9 "
                                f"offline") from None
    return read_qm9_tarball(tar, excluded)


def split_indices(n: int) -> dict[str, np.ndarray]:
    """EDM sizes on the full set; a smaller set (a test fixture) is split in the same proportions."""
    perm = np.random.RandomState(QM9_SPLIT_SEED).permutation(n)
    if n == QM9_N_MOLECULES:
        n_train, n_valid = QM9_SPLIT_SIZES["train"], QM9_SPLIT_SIZES["valid"]
    else:
        n_test = int(0.1 * n)
        n_train = int(round(n * QM9_SPLIT_SIZES["train"] / QM9_N_MOLECULES))
        n_valid = n - n_train - n_test
    return {"train": perm[:n_train], "valid": perm[n_train:n_train + n_valid], "test": perm[n_train + n_valid:]}


# ----------------------------------------------------------------------------------------------
# Batches


class PaddedMolecules:
    """Molecules as padded tensors, all padded to the same n_max so every batch has one shape.

    types [S, n_max] long, pos [S, n_max, 3] float32 (centre of geometry at 0), mask [S, n_max] bool; with a
    condition [S, C] (normalised properties, models/condition.py), every batch carries its rows.
    """

    def __init__(self, mols: MoleculeSet, n_max: int | None = None, condition: torch.Tensor | None = None):
        n_max = int(mols.n_atoms.max()) if n_max is None else n_max
        if mols.n_atoms.max() > n_max:
            raise DataError(f"a molecule has {mols.n_atoms.max()} atoms, more than n_max={n_max}")
        S = len(mols)
        types = np.zeros((S, n_max), dtype=np.int64)
        pos = np.zeros((S, n_max, 3), dtype=np.float32)
        mask = np.arange(n_max)[None, :] < mols.n_atoms[:, None]
        all_types = mols.type_indices()
        types[mask] = all_types
        pos[mask] = mols.positions
        self.types = torch.from_numpy(types)
        self.pos = remove_mean(torch.from_numpy(pos), torch.from_numpy(mask))
        self.mask = torch.from_numpy(mask)
        self.n_max = n_max
        self.condition = condition

    def __len__(self) -> int:
        return len(self.types)

    def batch(self, idx: torch.Tensor, device: torch.device | str = "cpu", width: int | None = None) -> dict[str, torch.Tensor]:
        """The molecules idx, padded to n_max atoms, or to `width` (at least their largest) to save work."""
        atoms = slice(0, width or self.n_max)
        batch = {"types": self.types[idx, atoms].to(device), "pos": self.pos[idx, atoms].to(device),
                 "mask": self.mask[idx, atoms].to(device)}
        if self.condition is not None:
            batch["condition"] = self.condition[idx].to(device)
        return batch



def write_sdf(path: Path, structures: list) -> int:
    """ase.Atoms molecules as SDF with bonds inferred from geometry (models/molecule_metrics.py's bond orders), each
    named by its info['sample_index'], written atomically; returns how many RDKit could not write."""
    from rdkit import Chem

    from models.fileio import atomic_write
    from models.molecule_metrics import build_mol

    failed = 0

    def write(tmp):
        nonlocal failed
        writer = Chem.SDWriter(tmp)
        writer.SetKekulize(False)  # bond orders come from distances, not an aromaticity model
        for atoms in structures:
            try:
                mol = build_mol(atoms.numbers, atoms.positions)
                mol.SetProp("_Name", f"sample_{atoms.info['sample_index']}")
                writer.write(mol)
            except Exception:  # a geometry RDKit refuses (e.g. impossible valence) is skipped, not fatal
                failed += 1
        writer.close()

    atomic_write(path, write)
    return failed
