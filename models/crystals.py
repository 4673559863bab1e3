"""The crystal domain's data: the CDVAE benchmark sets (perov-5, carbon-24, MP-20), loaded, cached and batched.

Source: the CSV files of the CDVAE release (Xie et al. 2022), one row per crystal with its CIF text in the
`cif` column and an id in `material_id`; each set comes as train / val / test files, the published splits
every paper since reports on. A file is looked for at DATA_DIR/cdvae/<set>/<split>.csv (DATA_DIR is
--data-dir, else $MOLGEN_DATA, else ./data) and, when absent, downloaded from the release at a pinned
commit and checked against that commit's git blob id, so the bytes are exactly the ones the papers used.
Offline, put the files there yourself; without the train file, `train_split="val"` trains on the
validation split (models/EXPERIMENTS.md, "Crystals").

Each crystal is read with pymatgen, Niggli-reduced and rebuilt from its six lattice parameters (CDVAE's
canonical form: the same cell whatever orientation the CIF had), and parsed once into DATA_DIR/
cdvae_<set>_<split>.npz; later loads read only that cache.

In the models a batch of crystals is a dense padded tensor set (models/README.md, "Data contracts"):
    types [B, N] long (index into the data set's element vocabulary), frac [B, N, 3] in [0, 1),
    lengths [B, 3] (A), angles [B, 3] (degrees), mask [B, N] bool.
"""
from __future__ import annotations

import csv
import os
import sys
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.fileio import DataError, check_writable_dir, download, finite_number, git_blob_sha1, save_npz
from models.labels import atom_rows, offsets_of
from models.molecules import default_data_dir
from models.structures import partial_site, utf8_lines

CDVAE_COMMIT = "f857f598d6f6cca5dc1ea0582d228f12dcc2c2ea"
# $MOLGEN_CDVAE_URL points at a mirror of the release (same layout; {folder} and {split} are filled in, and
# {commit} when present); the files are checked against the pinned blob ids wherever they come from
CDVAE_URL = os.environ.get("MOLGEN_CDVAE_URL", "https://raw.githubusercontent.com/txie-93/cdvae/{commit}/data/{folder}/{split}.csv")


@dataclass(frozen=True)
class CrystalSetInfo:
    folder: str  # the release's folder name
    max_atoms: int  # largest cell of the set
    blob_sha1: dict  # split -> git blob id of the file at CDVAE_COMMIT
    coverage_cutoffs: tuple[float, float]  # CDVAE's (structure, composition) fingerprint distance thresholds
    conditions: tuple = ()  # the CRYSTAL_PROPERTIES a generator of this set may be conditioned on (train.py --condition)


CRYSTAL_SETS = {
    "perov5": CrystalSetInfo("perov_5", 5, {"train": "0769074b5d51d293b765c4371b8f55c468c9c9f2",
                                            "val": "4a2c8dde98347dd0e01fa83dcf3982c2abe98f9f",
                                            "test": "d3c5d5af4b27a2a139149f2bb73c8a3dba9d8ac1"}, (0.2, 4.0), ("heat_ref",)),
    "carbon24": CrystalSetInfo("carbon_24", 24, {"train": "5e7ae970fbad8ddc46b6963e8cd6e425f11783a6",
                                                 "val": "b3e29b927883642426ca1d9632d00359b412742b",
                                                 "test": "9beca843fde489de1fe288b32f9e3ff710d42803"}, (0.2, 4.0),
                                ("energy_per_atom",)),
    "mp20": CrystalSetInfo("mp_20", 20, {"train": "b1c9d498565ac2fd8d075a51ff2ef5e51ba6c21f",
                                         "val": "7efe4d7ebeb4f460ceaad35e5326c42111d9c9a1",
                                         "test": "5dc643041df53f5ce4970a79930ad262b4f07acd"}, (0.4, 10.0),
                            ("formation_energy_per_atom", "band_gap")),
}
SPLITS = ("train", "val", "test")
# The CDVAE files' property columns a generator can be conditioned on, with their units: perov-5's heat of
# formation, carbon-24's energy per atom, MP-20's formation energy and band gap (MP-20: untested, its files cannot
# be had offline). A set's CrystalSetInfo.conditions says which of them it has.
CRYSTAL_PROPERTIES = {"heat_ref": "eV/atom", "energy_per_atom": "eV/atom", "formation_energy_per_atom": "eV/atom", "band_gap": "eV"}
CACHE_VERSION = 2  # 2: the property columns
MIN_DISTANCE = 0.5  # A: closer atoms (periodic images included) make a record unusable, as in structural validity


@dataclass
class CrystalSet:
    """Crystals as ragged, concatenated arrays.

    numbers [A] int16 atomic numbers, frac [A, 3] float64 fractional coordinates in [0, 1),
    lengths [S, 3] float64 (A), angles [S, 3] float64 (degrees), n_atoms [S] int32, offset [S] int64,
    ids [S] str (material_id), properties [S, 4] float64: CRYSTAL_PROPERTIES in order, NaN where the file has none."""

    numbers: np.ndarray
    frac: np.ndarray
    lengths: np.ndarray
    angles: np.ndarray
    n_atoms: np.ndarray
    offset: np.ndarray
    ids: np.ndarray
    properties: np.ndarray

    def __len__(self) -> int:
        return len(self.n_atoms)

    def property_values(self, name: str) -> np.ndarray:
        """[S] values of one of CRYSTAL_PROPERTIES; DataError if a crystal has none."""
        values = self.properties[:, list(CRYSTAL_PROPERTIES).index(name)]
        if np.isnan(values).any():
            raise DataError(f"{int(np.isnan(values).sum())} of {len(values)} crystals have no {name} (material_id "
                            f"{self.ids[np.flatnonzero(np.isnan(values))[0]]}, ...)")
        return values

    def atoms_of(self, i: int) -> slice:
        return slice(int(self.offset[i]), int(self.offset[i]) + int(self.n_atoms[i]))

    def arrays(self) -> list[tuple]:
        """Every crystal as (numbers [n], frac [n, 3], lengths [3], angles [3]): the form the metrics take."""
        return [(self.numbers[self.atoms_of(i)], self.frac[self.atoms_of(i)], self.lengths[i], self.angles[i])
                for i in range(len(self))]

    def subset(self, idx) -> "CrystalSet":
        idx = np.asarray(idx, dtype=np.int64)
        rows = atom_rows(self.offset, self.n_atoms, idx)
        return CrystalSet(self.numbers[rows], self.frac[rows], self.lengths[idx], self.angles[idx], self.n_atoms[idx],
                          offsets_of(self.n_atoms[idx]), self.ids[idx], self.properties[idx])

    def elements(self) -> list[int]:
        """Atomic numbers present, ascending: the element vocabulary of a generator trained on this set."""
        return sorted(int(z) for z in np.unique(self.numbers))

    def n_atoms_histogram(self, n_max: int | None = None) -> np.ndarray:
        """Probability of each cell size 0..n_max, used to pick sizes for de novo generation."""
        n_max = int(self.n_atoms.max()) if n_max is None else n_max
        counts = np.bincount(self.n_atoms, minlength=n_max + 1)[: n_max + 1].astype(np.float64)
        return counts / counts.sum()

    def to_structure(self, i: int):
        """Crystal i as a pymatgen Structure."""
        from pymatgen.core import Lattice, Structure

        rows = self.atoms_of(i)
        return Structure(Lattice.from_parameters(*self.lengths[i], *self.angles[i]), self.numbers[rows].tolist(),
                         self.frac[rows], coords_are_cartesian=False)

    def to_atoms(self, i: int):
        """Crystal i as ase.Atoms with its cell and full periodicity."""
        return crystal_atoms(self.numbers[self.atoms_of(i)], self.frac[self.atoms_of(i)], self.lengths[i], self.angles[i])


def crystal_atoms(numbers, frac, lengths, angles):
    """ase.Atoms of a crystal from atomic numbers [n], fractional coordinates [n, 3], lengths and angles."""
    import ase
    from ase.geometry import cellpar_to_cell

    cell = cellpar_to_cell(np.concatenate([np.asarray(lengths, float), np.asarray(angles, float)]))
    return ase.Atoms(numbers=np.asarray(numbers, int), scaled_positions=np.asarray(frac, float), cell=cell, pbc=True)


# ----------------------------------------------------------------------------------------------
# Parsing


def full_sites(structure, where: str):
    """The structure with every site one whole atom: a site of one element at occupancy 1 (within
    models.structures.OCCUPANCY_TOLERANCE) becomes that element; any other site raises DataError naming it."""
    for site in structure:
        if held := partial_site(site.species):
            x, y, z = site.frac_coords
            raise DataError(f"{where}: the site {site.label} at fractional ({x:.4f}, {y:.4f}, {z:.4f}) holds {held}; "
                            f"only sites of one element at occupancy 1 can be learned")
    if structure.is_ordered:
        return structure
    from pymatgen.core import Structure
    return Structure(structure.lattice, [site.species.elements[0] for site in structure], structure.frac_coords)


def canonical_crystal(structure, where: str):
    """Niggli-reduce and rebuild from the six lattice parameters (CDVAE's canonical cell), after checking the
    record (whole atoms, as full_sites leaves them): at least one atom, finite coordinates, no two atoms (or
    images) closer than MIN_DISTANCE. Returns (atomic numbers [n], frac [n, 3] in [0, 1), lengths [3], angles [3])."""
    from pymatgen.core import Lattice, Structure
    from pymatgen.core.periodic_table import DummySpecies

    if len(structure) == 0:
        raise DataError(f"{where}: the crystal has no atoms")
    if unknown := sorted({str(sp) for sp in structure.species if isinstance(sp, DummySpecies)}):
        raise DataError(f"{where}: unknown element(s) {unknown}")
    if not (np.isfinite(structure.frac_coords).all() and np.isfinite(structure.lattice.matrix).all()):
        raise DataError(f"{where}: non-finite (NaN or Inf) coordinates or cell")
    if structure.volume < 0.1:
        raise DataError(f"{where}: cell volume {structure.volume:.3g} A^3 (degenerate cell)")
    reduced = structure.get_reduced_structure()
    canonical = Structure(Lattice.from_parameters(*reduced.lattice.parameters), reduced.species, reduced.frac_coords)
    if len(canonical) > 1:
        d = canonical.distance_matrix + np.eye(len(canonical)) * 1e9
        if d.min() < MIN_DISTANCE:
            i, j = np.unravel_index(d.argmin(), d.shape)
            raise DataError(f"{where}: atoms {i} and {j} overlap ({d.min():.3f} A apart, periodic images included)")
    self_image = min((canonical.lattice.abc))  # an atom and its own image one cell away
    if self_image < MIN_DISTANCE:
        raise DataError(f"{where}: a cell vector is {self_image:.3f} A long: atoms overlap their own images")
    frac = canonical.frac_coords % 1.0
    return (np.array(canonical.atomic_numbers, dtype=np.int16), frac, np.array(canonical.lattice.abc),
            np.array(canonical.lattice.angles))


def cdvae_rows(path: Path, progress: bool = False):
    """(where, row) for each record of a CDVAE CSV file (columns material_id and cif, at least), in file order;
    where is "<path>, lines <first>-<last> (material_id <id>)": a record spans several lines (the CIF text)."""
    from tqdm import tqdm

    csv.field_size_limit(1 << 26)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        reader = csv.DictReader(utf8_lines(f, path, "a CDVAE CSV file"))
        missing = {"material_id", "cif"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: not a CDVAE CSV file, missing column(s) {sorted(missing)}")
        first_line = reader.line_num + 1
        for row in tqdm(reader, desc=f"reading {path.name}", unit=" crystals", disable=not progress,
                        mininterval=0.5 if sys.stderr.isatty() else 30):
            yield f"{path}, lines {first_line}-{reader.line_num} (material_id {row.get('material_id')})", row
            first_line = reader.line_num + 1


def record_where(path: Path, material_id: str) -> str:
    """Where the first record of `material_id` is in a CDVAE CSV file, as cdvae_rows names it (the file alone if
    it no longer holds one): for messages about a record the cache gave."""
    return next((where for where, row in cdvae_rows(Path(path)) if row["material_id"] == material_id),
                f"{path} (material_id {material_id})")


def read_cdvae_csv(path: Path, progress: bool = True) -> CrystalSet:
    """One CDVAE CSV file -> CrystalSet, in file order. A bad row raises DataError naming the file, the lines and
    the material_id."""
    from pymatgen.io.cif import CifParser

    path = Path(path)
    records = []
    for where, row in cdvae_rows(path, progress):
        try:
            with warnings.catch_warnings():  # pymatgen warns about rounded occupancies and the like
                warnings.simplefilter("ignore")
                # check_occu=False: every site as the CIF gives it, for full_sites to judge (pymatgen's own check
                # drops a site of occupancy 0 or below without a word, and a whole block with an over-full site)
                parsed = CifParser.from_str(row["cif"] or "").parse_structures(primitive=False, check_occu=False)[0]
        except Exception as e:  # pymatgen raises many kinds (ValueError, KeyError, IndexError, ...) for bad CIF
            raise DataError(f"{where}: unreadable CIF ({type(e).__name__}: {e})") from None
        # in the order pymatgen's default parse gives (by electronegativity), which the caches hold
        structure = full_sites(parsed, where).get_sorted_structure()
        records.append((str(row["material_id"]), *canonical_crystal(structure, where), crystal_properties(row, where)))
    if not records:
        raise DataError(f"{path}: no crystals")
    n_atoms = np.array([len(r[1]) for r in records], dtype=np.int32)
    return CrystalSet(
        numbers=np.concatenate([r[1] for r in records]), frac=np.concatenate([r[2] for r in records]),
        lengths=np.stack([r[3] for r in records]), angles=np.stack([r[4] for r in records]), n_atoms=n_atoms,
        offset=offsets_of(n_atoms), ids=np.array([r[0] for r in records]), properties=np.stack([r[5] for r in records]))


def crystal_properties(row: dict, where: str) -> np.ndarray:
    """[4] CRYSTAL_PROPERTIES of one CSV record: NaN for a column the file lacks or leaves empty; DataError naming the
    record for a value that is not a finite number."""
    out = np.full(len(CRYSTAL_PROPERTIES), np.nan)
    for i, name in enumerate(CRYSTAL_PROPERTIES):
        text = (row.get(name) or "").strip()
        if text:
            out[i] = finite_number(text, name, where)
    return out


# ----------------------------------------------------------------------------------------------
# Files, cache and splits


def split_file(name: str, split: str, data_dir: Path, download_missing: bool = True) -> Path:
    """DATA_DIR/cdvae/<folder>/<split>.csv, downloaded from the pinned CDVAE release when missing."""
    info = CRYSTAL_SETS[name]
    path = data_dir / "cdvae" / info.folder / f"{split}.csv"
    if path.exists() or not download_missing:
        return path
    url = CDVAE_URL.format(commit=CDVAE_COMMIT, folder=info.folder, split=split)
    try:
        check_writable_dir(path.parent, f"the {name} data directory")
        download(url, path, blob_sha1=info.blob_sha1[split])
    except OSError as e:
        hint = " (train.py --train-split val trains on the validation split)" if split == "train" else ""
        raise DataError(f"{path} is missing and cannot be downloaded from {url} ({e}). Offline, copy the CDVAE release's "
                        f"{info.folder}/{split}.csv there{hint}") from None
    return path


CACHE_ARRAYS = ("version", "source_sha1", "numbers", "frac", "lengths", "angles", "n_atoms", "offset", "ids", "properties")


def load_cache(path: Path, source_sha1: str) -> CrystalSet:
    """A cdvae_<set>_<split>.npz; DataError naming it when it is unreadable, inconsistent, stale, or was parsed
    from another file than the one now in place."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if missing := [k for k in CACHE_ARRAYS if k not in z.files]:
                raise DataError(f"{path}: crystal cache lacks arrays {missing}")
            if int(z["version"]) != CACHE_VERSION:
                raise DataError(f"{path}: crystal cache version {int(z['version'])}, expected {CACHE_VERSION}")
            if str(z["source_sha1"]) != source_sha1:
                raise DataError(f"{path}: parsed from another version of its CSV file")
            crystals = CrystalSet(*(z[k] for k in CACHE_ARRAYS[2:]))
    except DataError:
        raise
    except Exception as e:  # truncated zip, garbage, pickled objects (refused)
        raise DataError(f"{path}: unreadable crystal cache ({type(e).__name__}: {e})") from None
    S, A = len(crystals.n_atoms), len(crystals.numbers)
    consistent = (S > 0 and crystals.lengths.shape == crystals.angles.shape == (S, 3) and len(crystals.ids) == S
                  and crystals.properties.shape == (S, len(CRYSTAL_PROPERTIES))
                  and crystals.frac.shape == (A, 3) and int(crystals.offset[-1]) + int(crystals.n_atoms[-1]) == A)
    if not consistent:
        raise DataError(f"{path}: crystal cache is inconsistent ({S} crystals, {A} atoms)")
    return crystals


def load_crystals(name: str, split: str, data_dir: str | Path | None = None, progress: bool = True) -> CrystalSet:
    """One split ('train', 'val' or 'test') of a CDVAE set ('perov5', 'carbon24', 'mp20'), in file order.

    The first load parses the CSV (downloading it if absent) and writes DATA_DIR/cdvae_<name>_<split>.npz;
    later loads read the cache, which is rebuilt when damaged or when the CSV file changed."""
    if name not in CRYSTAL_SETS:
        raise DataError(f"unknown crystal data set {name!r}; known: {sorted(CRYSTAL_SETS)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r} of {name}; the CDVAE splits are {SPLITS}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    source = split_file(name, split, data_dir)
    if not source.is_file():
        raise DataError(f"{source}: the {name} {split} split is not a file (a directory?); it must be the CDVAE CSV file")
    source_sha1 = git_blob_sha1(source)
    cache = data_dir / f"cdvae_{name}_{split}.npz"
    if cache.exists():
        try:
            return load_cache(cache, source_sha1)
        except DataError as e:
            print(f"warning: {e}; parsing {source} again", file=sys.stderr)
    crystals = read_cdvae_csv(source, progress=progress)
    try:
        save_npz(cache, dict(version=CACHE_VERSION, source_sha1=source_sha1, numbers=crystals.numbers, frac=crystals.frac,
                             lengths=crystals.lengths, angles=crystals.angles, n_atoms=crystals.n_atoms,
                             offset=crystals.offset, ids=crystals.ids.astype(str), properties=crystals.properties))
    except OSError as e:  # a read-only data directory: the crystals are still good, only the next load is slower
        print(f"warning: cannot write the cache {cache} ({e})", file=sys.stderr)
    return crystals


def holdout_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """True for the ids held out for validation: by a CRC-32 of the id, so a crystal keeps its side whatever else
    the file holds. Used when the validation split itself is the training set."""
    return np.array([zlib.crc32(str(i).encode()) % 10_000 < fraction * 10_000 for i in ids], dtype=bool)


# ----------------------------------------------------------------------------------------------
# Batches


class PaddedCrystals:
    """Crystals as padded tensors, all padded to the same n_max so every batch has one shape.

    types [S, n_max] long (index into `elements`), frac [S, n_max, 3] float32, lengths [S, 3], angles [S, 3]
    float32, mask [S, n_max] bool; with a condition [S, C] (normalised properties, models/condition.py), every batch
    carries its rows. An element outside `elements` raises DataError naming the crystal."""

    def __init__(self, crystals: CrystalSet, elements: list[int], n_max: int | None = None, name: str = "crystals",
                 condition: torch.Tensor | None = None):
        n_max = int(crystals.n_atoms.max()) if n_max is None else n_max
        if crystals.n_atoms.max() > n_max:
            raise DataError(f"{name}: a crystal has {crystals.n_atoms.max()} atoms, more than n_max={n_max}")
        lut = np.full(256, -1, dtype=np.int64)
        lut[np.asarray(elements)] = np.arange(len(elements))
        type_of_atom = lut[crystals.numbers]
        if (type_of_atom < 0).any():
            atom = int(np.flatnonzero(type_of_atom < 0)[0])
            crystal = int(np.searchsorted(crystals.offset, atom, side="right") - 1)
            raise DataError(f"{name}: crystal {crystals.ids[crystal]} has element Z={int(crystals.numbers[atom])}, which "
                            f"is not in the model's vocabulary {elements}")
        S = len(crystals)
        mask = np.arange(n_max)[None, :] < crystals.n_atoms[:, None]
        types, frac = np.zeros((S, n_max), np.int64), np.zeros((S, n_max, 3), np.float32)
        types[mask], frac[mask] = type_of_atom, crystals.frac
        self.types, self.frac, self.mask = torch.from_numpy(types), torch.from_numpy(frac), torch.from_numpy(mask)
        self.lengths = torch.from_numpy(crystals.lengths.astype(np.float32))
        self.angles = torch.from_numpy(crystals.angles.astype(np.float32))
        self.n_max = n_max
        self.condition = condition

    def __len__(self) -> int:
        return len(self.types)

    def batch(self, idx, device: torch.device | str = "cpu", width: int | None = None) -> dict[str, torch.Tensor]:
        """The crystals idx, padded to n_max atoms, or to `width` (at least their largest) to save work."""
        atoms = slice(0, width or self.n_max)
        per_atom = {k: getattr(self, k)[idx, atoms].to(device) for k in ("types", "frac", "mask")}
        batch = {**per_atom, "lengths": self.lengths[idx].to(device), "angles": self.angles[idx].to(device)}
        if self.condition is not None:
            batch["condition"] = self.condition[idx].to(device)
        return batch


def unpad(batch: dict[str, torch.Tensor], elements) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """A padded batch (PaddedCrystals.batch or a process's samples; types index `elements`) back to one
    (atomic numbers, frac [n, 3], lengths [3], angles [3]) per crystal, in float64 on the CPU: the form the
    metrics and crystal_atoms take."""
    z_of = np.asarray(elements)
    b = {k: v.detach().cpu() for k, v in batch.items()}
    crystals = []
    for types, frac, lengths, angles, mask in zip(*(b[k] for k in ("types", "frac", "lengths", "angles", "mask"))):
        crystals.append((z_of[types[mask].numpy()], frac[mask].double().numpy(), lengths.double().numpy(),
                         angles.double().numpy()))
    return crystals


def write_cif(path: Path, structures: list, names: list[str]) -> None:
    """pymatgen Structures as one multi-block CIF file (a `data_<name>` block each; pymatgen and ASE read all
    blocks back), written atomically."""
    from pymatgen.io.cif import CifWriter

    from models.fileio import atomic_write

    blocks = []
    for structure, name in zip(structures, names):
        lines = [line for line in str(CifWriter(structure)).splitlines() if not line.startswith("#")]
        blocks.append("\n".join(f"data_{name}" if line.startswith("data_") else line for line in lines))

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("# generated by MolGen-Bench sample.py\n" + "\n".join(blocks))

    atomic_write(path, write)
