"""Metrics of generated molecules (QM9, explicit hydrogens), following the EDM protocol.

EDM (Hoogeboom et al. 2022, "Equivariant Diffusion for Molecule Generation in 3D") infers bonds from
interatomic distances alone: a pair is bonded when its distance is below a typical bond length plus a
margin, with triple bonds tested first, then double, then single. From those bond orders come

- stability: an atom is stable when its summed bond order equals its valence (H 1, C 4, N 3, O 2,
  F 1); a molecule is stable when all its atoms are;
- validity: RDKit sanitises the distance-built molecule (RDKit may add implicit hydrogens to
  under-bonded atoms, so validity is a weaker test than stability);
- uniqueness and novelty of the canonical SMILES of the largest fragment of each valid molecule.

On top of EDM's numbers this module reports distribution metrics against the test set: mean QED, SA
score and logP of valid molecules, Wasserstein-1 distances of those properties and of bond lengths,
bond angles and atom counts, the Frechet ChemNet Distance (FCD) and fingerprint coverage.

SMILES convention (one pipeline for samples, test and train, so that string equality means "same
molecule"): distances -> EDM bond orders -> RDKit sanitisation -> largest fragment (by atom count,
hydrogens included, as EDM) -> hydrogens made implicit -> RDKit canonical SMILES. There is no
stereochemistry (bonds come from distances only). QM9's own SMILES are not used: they come from a
different perception (charges, stereo) and would make real molecules look novel.

Entry points: `stability` (cheap, used during training), `evaluate_molecules` (everything), and the
pieces `evaluate.py` uses to also draw figures: `molecule_statistics`, `reference_statistics`,
`training_smiles`, `score`.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from models.fileio import save_npz
from models.threads import one_torch_thread

# ----------------------------------------------------------------------------------------------
# Bond orders from distances (EDM tables)

# Typical bond lengths in pm for H C N O F (EDM's tables, taken from standard reference tables).
# Pairs absent from BOND2 / BOND3 have no double / triple bond.
BOND1 = {("H", "H"): 74, ("H", "C"): 109, ("H", "N"): 101, ("H", "O"): 96, ("H", "F"): 92,
         ("C", "C"): 154, ("C", "N"): 147, ("C", "O"): 143, ("C", "F"): 135,
         ("N", "N"): 145, ("N", "O"): 140, ("N", "F"): 136,
         ("O", "O"): 148, ("O", "F"): 142, ("F", "F"): 142}
BOND2 = {("C", "C"): 134, ("C", "N"): 129, ("C", "O"): 120, ("N", "N"): 125, ("N", "O"): 121, ("O", "O"): 121}
BOND3 = {("C", "C"): 120, ("C", "N"): 116, ("C", "O"): 113, ("N", "N"): 110}
# A distance counts as a bond of order k when it is below table_k + margin_k (pm). EDM tuned the
# margins to maximise the stability of real QM9 molecules.
MARGINS = (10, 5, 3)
VALENCE = {1: 1, 6: 4, 7: 3, 8: 2, 9: 1}  # allowed valence by atomic number (neutral atoms only)
SYMBOL = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
_Z = {s: z for z, s in SYMBOL.items()}
_NZ = 128  # lookup tables are indexed by atomic number; anything else maps to 0 (no bonds, no valence)


def _threshold_table(table: dict, margin: int) -> np.ndarray:
    """[_NZ, _NZ] thresholds in pm, symmetric; 0 where the pair has no bond of this order (d < 0 never holds)."""
    t = np.zeros((_NZ, _NZ))
    for (a, b), length in table.items():
        t[_Z[a], _Z[b]] = t[_Z[b], _Z[a]] = length + margin
    return t


# THRESHOLDS[k - 1] holds the order-k thresholds. Every pair's thresholds fall with the order (asserted;
# so a pair with a triple bond also has a double one), hence counting the thresholds a distance is below
# (vectorised in `bond_orders`) is the same as EDM's nested test "triple, else double, else single".
THRESHOLDS = np.stack([_threshold_table(t, m) for t, m in zip((BOND1, BOND2, BOND3), MARGINS)])
assert (np.diff(THRESHOLDS, axis=0) <= 0).all()
_VALENCE = np.full(_NZ, -1)  # -1: no allowed valence, so atoms of other elements are never stable
for _z, _v in VALENCE.items():
    _VALENCE[_z] = _v


def _safe_numbers(numbers) -> np.ndarray:
    """Atomic numbers as indices into the lookup tables; unknown or out-of-range elements -> 0."""
    z = np.asarray(numbers).astype(np.int64).reshape(-1)
    return np.where((z > 0) & (z < _NZ), z, 0)


def bond_order(z1: int, z2: int, distance_angstrom: float) -> int:
    """EDM bond order (0 none, 1 single, 2 double, 3 triple) of atoms z1, z2 at this distance (Angstrom)."""
    a, b = _safe_numbers([z1, z2])
    d = 100.0 * distance_angstrom  # the tables are in pm
    for order in (3, 2, 1):  # EDM tests the shortest (highest-order) bond first
        if d < THRESHOLDS[order - 1, a, b]:
            return order
    return 0


def bond_orders(numbers, positions) -> np.ndarray:
    """[n, n] int matrix of EDM bond orders between all atom pairs (0 on the diagonal and for NaN distances)."""
    z = _safe_numbers(numbers)
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    d = 100.0 * np.linalg.norm(x[:, None] - x[None], axis=-1)
    orders = (d[None] < THRESHOLDS[:, z[:, None], z[None, :]]).sum(0)
    np.fill_diagonal(orders, 0)
    return orders


def stability(numbers, positions) -> tuple[bool, int, int]:
    """EDM stability: (molecule_stable, n_stable_atoms, n_atoms).

    An atom is stable when its summed bond order equals its valence. Degenerate input never raises:
    an empty molecule, non-finite positions or unknown elements make the molecule (and with non-finite
    positions every atom) unstable.
    """
    z = _safe_numbers(numbers)
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = len(z)
    if n == 0 or len(x) != n or not np.isfinite(x).all():
        return False, 0, n
    stable = bond_orders(z, x).sum(1) == _VALENCE[z]
    return bool(stable.all()), int(stable.sum()), n


# ----------------------------------------------------------------------------------------------
# RDKit molecules, validity and SMILES


def build_mol(numbers, positions):
    """Unsanitised RDKit Mol with the atoms, the EDM bonds and a 3D conformer (Angstrom).

    Raises ValueError for elements other than H C N O F or non-finite positions: such samples are
    invalid, which `valid_mol` reports as None.
    """
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    z = np.asarray(numbers).astype(np.int64).reshape(-1)
    x = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if not set(z.tolist()) <= VALENCE.keys() or len(x) != len(z) or not np.isfinite(x).all():
        raise ValueError("only finite positions of H, C, N, O, F atoms make a molecule")
    bond_type = {1: Chem.BondType.SINGLE, 2: Chem.BondType.DOUBLE, 3: Chem.BondType.TRIPLE}
    mol = Chem.RWMol()
    for zi in z:
        mol.AddAtom(Chem.Atom(int(zi)))
    orders = bond_orders(z, x)
    for i, j in zip(*np.nonzero(np.triu(orders))):
        mol.AddBond(int(i), int(j), bond_type[int(orders[i, j])])
    conf = Chem.Conformer(len(z))
    for i, p in enumerate(x):
        conf.SetAtomPosition(i, Point3D(*p))
    mol.AddConformer(conf, assignId=True)
    return mol.GetMol()


def valid_mol(numbers, positions):
    """EDM validity: the largest fragment (hydrogens implicit) if the whole molecule sanitises, else None."""
    from rdkit import Chem, rdBase

    if len(numbers) == 0:
        return None
    try:
        mol = build_mol(numbers, positions)
    except ValueError:
        return None
    with rdBase.BlockLogs():  # invalid samples are expected; do not print a valence error for each
        if Chem.SanitizeMol(mol, catchErrors=True) != Chem.SanitizeFlags.SANITIZE_NONE:
            return None
        largest = max(Chem.GetMolFrags(mol, asMols=True), key=lambda m: m.GetNumAtoms())
        return Chem.RemoveHs(largest)


def smiles_of(numbers, positions) -> str | None:
    """Canonical SMILES of the largest fragment of a valid molecule (see `valid_mol`), else None."""
    from rdkit import Chem

    mol = valid_mol(numbers, positions)
    return None if mol is None else Chem.MolToSmiles(mol)


# ----------------------------------------------------------------------------------------------
# Per-molecule statistics of a set of molecules


def _sascorer():
    """RDKit's contributed SA score (Ertl & Schuffenhauer 2009); it is not an importable package."""
    from rdkit import RDConfig

    path = os.path.join(RDConfig.RDContribDir, "SA_Score")
    if not os.path.isfile(os.path.join(path, "sascorer.py")):
        raise ImportError(f"RDKit's SA score is missing: {path}/sascorer.py not found")
    if path not in sys.path:
        sys.path.append(path)
    import sascorer

    return sascorer


FP_BITS = 2048  # Morgan fingerprint (radius 2) used for coverage
STATISTICS = ("n_atoms", "mol_stable", "n_stable_atoms", "smiles", "qed", "sa", "logp", "fingerprint", "bond_length",
              "bond_pair", "bond_angle")  # what molecule_statistics returns


def _geometry(z: np.ndarray, x: np.ndarray):
    """Lengths (Angstrom) and pair codes of EDM bonds, and bond angles (degrees) of one molecule."""
    orders = bond_orders(z, x)
    i, j = np.nonzero(np.triu(orders))
    lengths = np.linalg.norm(x[i] - x[j], axis=1)
    # Pair code 100 * heavier Z + lighter Z (606 = C-C, 601 = C-H), so each element pair has one code.
    pairs = 100 * np.maximum(z[i], z[j]) + np.minimum(z[i], z[j])
    angles = []
    for c in range(len(z)):  # every pair of bonds sharing atom c makes an angle at c
        v = x[np.nonzero(orders[c])[0]] - x[c]
        norm = np.linalg.norm(v, axis=1)
        v = v[norm > 0] / norm[norm > 0, None]  # a bond to an atom on top of c has no direction
        if len(v) < 2:
            continue
        a, b = np.triu_indices(len(v), 1)
        angles.append(np.degrees(np.arccos(np.clip((v[a] * v[b]).sum(1), -1.0, 1.0))))
    return lengths, pairs, (np.concatenate(angles) if angles else np.zeros(0))


def molecule_statistics(molecules, progress: bool = False, desc: str = "molecules") -> dict[str, np.ndarray]:
    """Everything the metrics need from a set of molecules, one pass of RDKit over each.

    molecules: a sequence of (atomic numbers [n], positions [n, 3]) pairs, e.g. a `MoleculeSet`.
    Returns arrays aligned with the molecules (smiles '' and properties NaN when invalid):
      n_atoms, mol_stable, n_stable_atoms, smiles, qed, sa, logp, fingerprint [S, FP_BITS / 8] (packed bits),
    and pooled over all molecules with finite positions: bond_length, bond_pair (code, see `_geometry`),
    bond_angle.
    """
    from rdkit import Chem
    from rdkit.Chem import QED, Crippen, rdFingerprintGenerator
    from tqdm import tqdm

    sascorer = _sascorer()
    fpgen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=FP_BITS)
    S = len(molecules)
    out = {"n_atoms": np.zeros(S, np.int32), "mol_stable": np.zeros(S, bool), "n_stable_atoms": np.zeros(S, np.int32),
           "smiles": [""] * S, "qed": np.full(S, np.nan), "sa": np.full(S, np.nan), "logp": np.full(S, np.nan),
           "fingerprint": np.zeros((S, FP_BITS // 8), np.uint8)}
    lengths, pairs, angles = [], [], []
    for s in tqdm(range(S), desc=desc, disable=not progress, mininterval=2):
        numbers, positions = molecules[s]
        z, x = np.asarray(numbers).astype(np.int64), np.asarray(positions, dtype=np.float64).reshape(-1, 3)
        out["mol_stable"][s], out["n_stable_atoms"][s], out["n_atoms"][s] = stability(z, x)
        if len(z) and len(x) == len(z) and np.isfinite(x).all():
            length, pair, angle = _geometry(_safe_numbers(z), x)
            lengths.append(length)
            pairs.append(pair)
            angles.append(angle)
        mol = valid_mol(z, x)
        if mol is None:
            continue
        out["smiles"][s] = Chem.MolToSmiles(mol)
        out["qed"][s], out["sa"][s], out["logp"][s] = QED.qed(mol), sascorer.calculateScore(mol), Crippen.MolLogP(mol)
        out["fingerprint"][s] = np.packbits(fpgen.GetFingerprintAsNumPy(mol).astype(bool))
    out["smiles"] = np.array(out["smiles"], dtype=str)
    out["bond_length"] = np.concatenate([np.zeros(0)] + lengths)
    out["bond_pair"] = np.concatenate([np.zeros(0, np.int16)] + pairs).astype(np.int16)
    out["bond_angle"] = np.concatenate([np.zeros(0)] + angles)
    return out


# ----------------------------------------------------------------------------------------------
# Reference statistics (test set) and training SMILES, cached next to the QM9 cache

DEFAULT_N_REF = None  # all 13,083 QM9 test molecules: about a minute once, then cached (evaluate.py --n-ref)
CACHE_VERSION = 1  # bump when the pipeline above changes, so stale caches are not read
FCD_MIN_MOLECULES = 2  # a covariance needs at least two molecules


def _content_hash(mols) -> str:
    """Short hash of a MoleculeSet and of the library versions that turn it into statistics, so a cache is never
    reused for other molecules, nor after an RDKit release that canonicalises SMILES differently (novelty) or
    another ChemNet (FCD)."""
    from importlib import metadata

    h = hashlib.sha1()
    for a in (mols.ids, mols.n_atoms, mols.numbers, mols.positions):
        h.update(np.ascontiguousarray(a).tobytes())
    for pkg in ("rdkit", "fcd"):
        try:
            h.update(f"{pkg} {metadata.version(pkg)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{pkg} missing".encode())
    return h.hexdigest()[:12]


def _write_cache(path: Path, arrays: dict) -> None:
    """Write a statistics cache; a cache that cannot be written (full disk, read-only directory) only costs the
    next run the time to compute it again, so it is a warning, not an error."""
    try:
        save_npz(path, arrays)
    except OSError as e:
        print(f"warning: could not write the cache {path} ({e}); it will be computed again next time", file=sys.stderr)


def _read_cache(path: Path, keys: tuple[str, ...]) -> dict | None:
    """A statistics cache as a dict, or None (with a warning naming the file) when it is unreadable or lacks one
    of `keys`: caches are derived data, so a damaged one is recomputed and rewritten, never trusted."""
    try:
        with np.load(path, allow_pickle=False) as f:
            out = dict(f)
        missing = [k for k in keys if k not in out]
        if not missing:
            return out
        why = f"arrays {missing} missing"
    except Exception as e:  # truncated zip, garbage, pickled objects we refuse: all mean "rebuild"
        why = f"{type(e).__name__}: {e}"
    print(f"warning: {path} is not a usable cache ({why}); recomputing it", file=sys.stderr)
    return None


def chemnet_activations(smiles) -> np.ndarray:
    """[n, 512] ChemNet penultimate-layer activations (the `fcd` package; its weights ship in the wheel)."""
    import fcd

    with one_torch_thread():
        return fcd.get_predictions(fcd.load_ref_model(), list(smiles))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians: |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = Tr (R S2 R)^(1/2) with R = S1^(1/2) symmetric, so two symmetric eigendecompositions
    give it: ~0.1 s at 512 x 512, where scipy.linalg.sqrtm (what the fcd package uses) took 1-10 s.
    """
    import torch

    with one_torch_thread():
        s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
        w, v = torch.linalg.eigh(s1)
        root1 = (v * w.clamp(min=0).sqrt()) @ v.T
        cross = torch.linalg.eigvalsh(root1 @ s2 @ root1).clamp(min=0).sqrt().sum().item()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * cross)


def frechet_chemnet_distance(smiles, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FCD of these SMILES against reference ChemNet statistics; NaN with fewer than two molecules."""
    if len(smiles) < FCD_MIN_MOLECULES or not np.isfinite(mu_ref).all():
        return float("nan")
    act = chemnet_activations(smiles)
    return frechet_distance(act.mean(0), np.cov(act.T), mu_ref, sigma_ref)


def reference_statistics(ref_set, n_ref: int | None = DEFAULT_N_REF, cache_dir: str | Path | None = None,
                         fcd: bool = True, progress: bool = True) -> dict[str, np.ndarray]:
    """`molecule_statistics` of (a fixed random subset of at most n_ref molecules of) the reference set
    (the test set, usually), plus ChemNet mean and covariance (`fcd_mu`, `fcd_sigma`) of its valid SMILES
    when fcd is set.

    With cache_dir, the result is read from / written to cache_dir/qm9_ref_<n>_<hash>_v<version>.npz,
    keyed by the subset size and a hash of the molecules; a cache without FCD statistics is completed.
    """
    n = len(ref_set) if n_ref is None else min(n_ref, len(ref_set))
    path = Path(cache_dir) / f"qm9_ref_{n}_{_content_hash(ref_set)}_v{CACHE_VERSION}.npz" if cache_dir else None
    ref = _read_cache(path, STATISTICS) if path is not None and path.exists() else None
    cached = ref is not None
    if not cached:
        subset = np.sort(np.random.RandomState(0).choice(len(ref_set), n, replace=False)) if n < len(ref_set) \
            else np.arange(n)
        ref = molecule_statistics(ref_set.subset(subset), progress=progress, desc="reference statistics")
    if fcd and "fcd_mu" not in ref:
        valid = ref["smiles"][ref["smiles"] != ""]
        if len(valid) >= FCD_MIN_MOLECULES:
            act = chemnet_activations(valid)
            ref["fcd_mu"], ref["fcd_sigma"] = act.mean(0), np.cov(act.T)
        else:
            ref["fcd_mu"], ref["fcd_sigma"] = np.full(512, np.nan), np.full((512, 512), np.nan)
        cached = False
    if path is not None and not cached:
        _write_cache(path, ref)
    return ref


def training_smiles(train, cache_dir: str | Path | None = None, progress: bool = True) -> set[str]:
    """SMILES of the training molecules through the same pipeline as samples (the novelty reference).

    Passing train molecules through distances -> bonds -> SMILES (rather than canonicalising QM9's
    SMILES) makes a sample that reproduces a training molecule's bonds compare equal to it.
    Cached in cache_dir/qm9_train_smiles_<n>_<hash>_v<version>.npz (the hash covers the RDKit version).
    """
    from tqdm import tqdm

    path = Path(cache_dir) / f"qm9_train_smiles_{len(train)}_{_content_hash(train)}_v{CACHE_VERSION}.npz" \
        if cache_dir else None
    cached = _read_cache(path, ("smiles",)) if path is not None and path.exists() else None
    if cached is not None:
        return set(cached["smiles"].tolist())
    smiles = [smiles_of(*train[i]) for i in tqdm(range(len(train)), desc="training SMILES", disable=not progress,
                                                 mininterval=2)]
    smiles = np.array(sorted({s for s in smiles if s}), dtype=str)
    if path is not None:
        _write_cache(path, {"smiles": smiles})
    return set(smiles.tolist())


# ----------------------------------------------------------------------------------------------
# Metrics


def _w1(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance of two empirical distributions (NaN values dropped; NaN if one is empty)."""
    from scipy.stats import wasserstein_distance

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    return float(wasserstein_distance(a, b)) if len(a) and len(b) else float("nan")


def _nearest_tanimoto(fp_a: np.ndarray, fp_b: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Packed fingerprints [A, B/8], [B, B/8] -> max Tanimoto of each a to any b, and of each b to any a."""
    a = np.unpackbits(fp_a, axis=1).astype(np.float32)
    b = np.unpackbits(fp_b, axis=1).astype(np.float32)
    na, nb = a.sum(1), b.sum(1)
    best_a, best_b = np.zeros(len(a)), np.zeros(len(b))
    for lo in range(0, len(a), chunk):  # chunks bound memory at chunk x len(b) floats
        inter = a[lo:lo + chunk] @ b.T
        sim = inter / np.maximum(na[lo:lo + chunk, None] + nb[None] - inter, 1.0)
        best_a[lo:lo + chunk] = sim.max(1)
        best_b = np.maximum(best_b, sim.max(0))
    return best_a, best_b


def _pair_name(code: int) -> str:
    """Pair code (see `_geometry`) -> chemists' name, carbon first and hydrogen last: 'C-H', 'C-O', 'N-H'."""
    names = sorted((SYMBOL.get(code // 100, "?"), SYMBOL.get(code % 100, "?")), key="CNOF?H".index)
    return "-".join(names)


def score(stats: dict, ref: dict, train_smiles, fcd: bool = True, coverage_threshold: float = 0.4) -> dict:
    """Metrics of sample statistics against reference (test) statistics; see `evaluate_molecules`."""
    S = len(stats["n_atoms"])
    valid = stats["smiles"] != ""
    smiles = stats["smiles"][valid]
    unique = set(smiles.tolist())
    train_smiles = train_smiles if isinstance(train_smiles, (set, frozenset)) else set(train_smiles)
    n_novel = len(unique - train_smiles)
    nan = float("nan")
    ref_valid = ref["smiles"] != ""
    m = {
        "n_samples": S,
        "atom_stability": stats["n_stable_atoms"].sum() / max(stats["n_atoms"].sum(), 1),
        "mol_stability": stats["mol_stable"].mean() if S else nan,
        "validity": valid.mean() if S else nan,
        "uniqueness": len(unique) / valid.sum() if valid.any() else nan,
        "novelty": n_novel / len(unique) if unique else nan,
        "validity_x_uniqueness": len(unique) / S if S else nan,
        "qed": np.mean(stats["qed"][valid]) if valid.any() else nan,
        "sa": np.mean(stats["sa"][valid]) if valid.any() else nan,
        "logp": np.mean(stats["logp"][valid]) if valid.any() else nan,
    }
    for key in ("qed", "sa", "logp", "n_atoms", "bond_length", "bond_angle"):
        m[f"w1_{key}"] = _w1(np.asarray(stats[key], float), np.asarray(ref[key], float))
    m["w1_bond_length_by_pair"] = {}
    for code in sorted(set(ref["bond_pair"].tolist()) & set(stats["bond_pair"].tolist())):
        m["w1_bond_length_by_pair"][_pair_name(code)] = _w1(stats["bond_length"][stats["bond_pair"] == code],
                                                             ref["bond_length"][ref["bond_pair"] == code])
    m["fcd"] = frechet_chemnet_distance(smiles, ref["fcd_mu"], ref["fcd_sigma"]) if fcd else nan
    if valid.any() and ref_valid.any():
        best_sample, best_ref = _nearest_tanimoto(stats["fingerprint"][valid], ref["fingerprint"][ref_valid])
        m["coverage_recall"] = (best_ref >= coverage_threshold).mean()
        m["coverage_precision"] = (best_sample >= coverage_threshold).mean()
    else:
        m["coverage_recall"] = m["coverage_precision"] = nan
    m["coverage_threshold"] = coverage_threshold
    m["n_ref"] = len(ref["n_atoms"])
    return {k: v if isinstance(v, (dict, int)) else float(v) for k, v in m.items()}  # plain Python numbers


def evaluate_molecules(samples, train_smiles, test, fcd: bool = True, progress: bool = True,
                       n_ref: int | None = DEFAULT_N_REF, cache_dir: str | Path | None = None,
                       coverage_threshold: float = 0.4) -> dict:
    """All molecule metrics of samples against QM9 (EDM protocol plus distribution metrics).

    samples: sequence of (atomic numbers [n], positions [n, 3] Angstrom) numpy pairs.
    train_smiles: iterable of SMILES from the same pipeline (`training_smiles(load_qm9('train'))`).
    test: MoleculeSet, the reference for distributions; at most n_ref of its molecules (a fixed random
      subset) are used, and their statistics are cached in cache_dir when given (`reference_statistics`).
    fcd: compute the Frechet ChemNet Distance (ChemNet takes about 15 s per 10,000 SMILES on one CPU core).

    Returns floats (fractions in [0, 1], NaN where undefined, e.g. uniqueness without valid samples):
      n_samples, atom_stability, mol_stability, validity, uniqueness (unique / valid),
      novelty (unique not in train / unique), validity_x_uniqueness (unique / samples);
      qed, sa, logp: means over valid samples;
      w1_qed, w1_sa, w1_logp (valid molecules), w1_n_atoms, w1_bond_length (Angstrom, all EDM bonds pooled),
      w1_bond_angle (degrees), w1_bond_length_by_pair (dict, e.g. 'C-H'): Wasserstein-1 to the reference;
      fcd: FCD of valid sample SMILES vs reference SMILES (NaN with < 2 valid samples; it falls as the
      number of samples grows, so compare models at equal sample counts);
      coverage_recall: fraction of valid reference molecules whose most similar valid sample has Morgan
      (radius 2, 2048 bits) Tanimoto similarity >= coverage_threshold; coverage_precision: fraction of
      valid samples whose most similar reference molecule does; coverage_threshold; n_ref.
    """
    ref = reference_statistics(test, n_ref=n_ref, cache_dir=cache_dir, fcd=fcd, progress=progress)
    stats = molecule_statistics(samples, progress=progress, desc="samples")
    return score(stats, ref, train_smiles, fcd=fcd, coverage_threshold=coverage_threshold)
