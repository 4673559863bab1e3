"""Metrics of generated crystals, following the CDVAE protocol (Xie et al. 2022) as DiffCSP and FlowMM apply it.

- structural validity: every interatomic distance, periodic images included, at least 0.5 A, and a cell
  volume of at least 0.1 A^3;
- compositional validity (SMACT): a crystal of one element, or of metals only (an alloy), is valid; otherwise
  some assignment of each element's known oxidation states must make the reduced formula charge-neutral and
  pass the Pauling electronegativity test (cations less electronegative than anions);
- structure prediction: pymatgen's StructureMatcher (stol 0.5, ltol 0.3, angle_tol 10) against the true
  crystal of the same composition; a sample counts as a match only when both it and the true crystal are
  valid (structurally and compositionally), as in DiffCSP's evaluation, and the RMSE is the matcher's RMS
  displacement (normalised by (V / n)^(1/3)) averaged over matches. With several samples per composition, a
  composition matches when any of its samples does, with the smallest RMSE.

StructureMatcher is slow (tens of ms a pair, seconds for an awkward one): `match_crystals` runs it on every
core, in chunks, and the callers report the time it took.
"""
from __future__ import annotations

import itertools
import logging
import os
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np

MIN_DISTANCE = 0.5  # A
MIN_VOLUME = 0.1  # A^3
MATCHER = dict(stol=0.5, ltol=0.3, angle_tol=10)  # CDVAE's settings
MAX_OXIDATION_COMBINATIONS = 10 ** 7  # CDVAE gives up (invalid) on compositions with more combinations

log = logging.getLogger(__name__)


def structure_valid(numbers, frac, lengths, angles) -> bool:
    """Structural validity of one crystal given as arrays (fractional coordinates, lengths A, angles degrees)."""
    from pymatgen.core import Lattice

    if not (np.isfinite(frac).all() and np.isfinite(lengths).all() and np.isfinite(angles).all()) or min(lengths) <= 0:
        return False
    lattice = Lattice.from_parameters(*lengths, *angles)
    if not lattice.volume >= MIN_VOLUME:  # also False for NaN (a degenerate angle set)
        return False
    if len(numbers) == 1:
        return min(lattice.abc) >= MIN_DISTANCE
    d = lattice.get_all_distances(frac, frac) + np.eye(len(numbers)) * 1e9
    return bool(d.min() >= MIN_DISTANCE) and min(lattice.abc) >= MIN_DISTANCE


@lru_cache(maxsize=None)
def _smact_valid(symbols: tuple[str, ...], counts: tuple[int, ...]) -> bool:
    import smact
    from smact.screening import pauling_test

    if len(symbols) == 1:
        return True
    if all(s in smact.metals for s in symbols):
        return True
    space = smact.element_dictionary(symbols)
    oxidation_states = [space[s].oxidation_states for s in symbols]
    electronegativities = [space[s].pauling_eneg for s in symbols]
    if np.prod([len(o) for o in oxidation_states], dtype=float) > MAX_OXIDATION_COMBINATIONS:
        return False
    stoichs = [(c,) for c in counts]
    for states in itertools.product(*oxidation_states):
        if smact.neutral_ratios(states, stoichs=stoichs, threshold=max(counts)):
            try:
                if pauling_test(states, electronegativities):
                    return True
            except TypeError:  # an element without an electronegativity: the test cannot refuse it
                return True
    return False


def composition_valid(numbers) -> bool:
    """SMACT validity of the reduced formula of the atomic numbers [n]."""
    from ase.data import chemical_symbols

    elements, counts = np.unique(np.asarray(numbers, dtype=int), return_counts=True)
    counts = counts // np.gcd.reduce(counts)
    if (elements < 1).any() or (elements >= len(chemical_symbols)).any():
        return False
    return _smact_valid(tuple(chemical_symbols[z] for z in elements), tuple(int(c) for c in counts))


def _structure(crystal):
    from pymatgen.core import Lattice, Structure

    numbers, frac, lengths, angles = crystal
    return Structure(Lattice.from_parameters(*lengths, *angles), [int(z) for z in numbers], frac)


def _rms(pair) -> float | None:
    """The matcher's normalised RMS displacement of (sample, truth), None when they do not match."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    sample, truth = pair
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rms = StructureMatcher(**MATCHER).get_rms_dist(_structure(sample), _structure(truth))
    except Exception:  # a sample the matcher cannot handle (degenerate cell) is no match
        return None
    return None if rms is None else float(rms[0])


def match_crystals(pairs: list, workers: int | None = None, progress: bool = True) -> list[float | None]:
    """RMS distance or None for each (sample, truth) pair; each crystal is (numbers, frac, lengths, angles).
    Runs over `workers` processes (default: every core)."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(pairs), desc="StructureMatcher", unit=" pairs", disable=not progress, mininterval=1)
    if workers == 1 or len(pairs) < 8:
        return [_rms(p) for p in tqdm(pairs, **bar)]
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return list(tqdm(pool.imap(_rms, pairs, chunksize=max(1, min(64, len(pairs) // (8 * workers)))), **bar))


def is_valid(crystal) -> bool:
    numbers, frac, lengths, angles = crystal
    return structure_valid(numbers, frac, lengths, angles) and composition_valid(numbers)


def csp_metrics(samples: list[list], truths: list, workers: int | None = None, progress: bool = True) -> dict:
    """Structure-prediction metrics: samples[i] holds the k samples (crystal tuples) of truths[i]'s composition.
    Returns match_rate and rmse (mean over matched compositions, each at its best sample) for k = 1 (the first
    sample) and, when k > 1, for all k; plus the validity of the samples and of the truths."""
    truth_valid = [is_valid(t) for t in truths]
    sample_valid = [[is_valid(s) for s in group] for group in samples]
    pairs, where = [], []
    for i, group in enumerate(samples):
        for j, s in enumerate(group):
            if truth_valid[i] and sample_valid[i][j]:
                pairs.append((s, truths[i]))
                where.append((i, j))
    rms = match_crystals(pairs, workers, progress)
    best = np.full((len(truths), max(len(g) for g in samples)), np.nan)
    for (i, j), r in zip(where, rms):
        if r is not None:
            best[i, j] = r
    k = best.shape[1]
    out = {"n_compositions": len(truths), "samples_per_composition": k,
           "valid_truths": float(np.mean(truth_valid)),
           "structural_validity": float(np.mean([structure_valid(*s) for g in samples for s in g])),
           "compositional_validity": float(np.mean([composition_valid(s[0]) for g in samples for s in g])),
           "validity": float(np.mean([v for g in sample_valid for v in g]))}
    for name, cols in (("1", best[:, :1]), (str(k), best)) if k > 1 else (("1", best),):
        matched = ~np.isnan(cols).all(1)
        out[f"match_rate@{name}"] = float(matched.mean())
        out[f"rmse@{name}"] = float(np.nanmin(cols[matched], axis=1).mean()) if matched.any() else None
    return out


# ----------------------------------------------------------------------------------------------
# De novo generation: distribution, coverage, uniqueness and novelty


def density(crystal) -> float:
    """Mass density in g/cm^3."""
    return float(_structure(crystal).density)


def n_elements(crystal) -> int:
    return len(set(np.asarray(crystal[0]).tolist()))


def wasserstein_distances(samples: list, reference: list, n_max: int = 1000, seed: int = 0) -> dict:
    """CDVAE's distribution distances: Wasserstein-1 of density and of the number of elements between at most
    n_max valid samples (a fixed random subset) and the reference crystals."""
    from scipy.stats import wasserstein_distance

    valid = [s for s in samples if is_valid(s)]
    if not valid:
        return {"wdist_density": None, "wdist_num_elements": None}
    pick = np.random.default_rng(seed).permutation(len(valid))[:n_max]
    valid = [valid[i] for i in pick]
    return {"wdist_density": float(wasserstein_distance([density(s) for s in valid], [density(r) for r in reference])),
            "wdist_num_elements": float(wasserstein_distance([n_elements(s) for s in valid], [n_elements(r) for r in reference]))}


def _fingerprint(crystal):
    """(CrystalNN 'ops' structure fingerprint averaged over sites [61] or NaNs when CrystalNN fails, Magpie
    composition fingerprint [132])."""
    from collections import Counter

    from matminer.featurizers.composition.composite import ElementProperty
    from matminer.featurizers.site.fingerprint import CrystalNNFingerprint
    from pymatgen.core import Composition

    global _FEATURISERS
    if _FEATURISERS is None:  # built once per process: the presets load tables
        _FEATURISERS = CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")
    site_fp, comp_fp = _FEATURISERS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = np.array(comp_fp.featurize(Composition(Counter(int(z) for z in crystal[0]))), dtype=float)
        try:
            structure = _structure(crystal)
            struct = np.array([site_fp.featurize(structure, i) for i in range(len(structure))], dtype=float).mean(0)
        except Exception:  # CDVAE counts a crystal CrystalNN cannot fingerprint as uncovered
            struct = np.full(61, np.nan)
    return struct, comp


_FEATURISERS = None


def fingerprints(crystals: list, workers: int | None = None, progress: bool = True, desc: str = "fingerprints"):
    """Structure [n, 61] and composition [n, 132] fingerprints of crystals, on `workers` processes."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(crystals), desc=desc, unit=" crystals", disable=not progress, mininterval=1)
    if workers == 1 or len(crystals) < 8:
        out = [_fingerprint(c) for c in tqdm(crystals, **bar)]
    else:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            out = list(tqdm(pool.imap(_fingerprint, crystals, chunksize=max(1, min(32, len(crystals) // (8 * workers)))), **bar))
    return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def reference_fingerprints(name: str, split: str, crystals: list, data_dir: Path, workers: int | None = None,
                           progress: bool = True):
    """fingerprints() of the crystals of a CDVAE data split, cached in data_dir next to its crystal cache and keyed by
    its CSV's blob id: minutes of CrystalNN for a test set, once. A damaged cache, or one that cannot be written, is
    a warning, not an error: the fingerprints are recomputed."""
    from models.crystals import split_file
    from models.fileio import git_blob_sha1, save_npz

    sha1 = git_blob_sha1(split_file(name, split, data_dir, download_missing=False))
    cache = data_dir / f"cdvae_{name}_{split}_fingerprints.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["source_sha1"]) == sha1 and len(z["struct"]) == len(crystals):
                    return z["struct"], z["comp"]
        except Exception as e:  # a truncated zip, garbage: all mean "recompute"
            log.warning(f"warning: {cache} is unreadable ({type(e).__name__}: {e}); recomputing it")
    fps = fingerprints(crystals, workers, progress, desc=f"{name} {split} fingerprints")
    try:
        save_npz(cache, dict(source_sha1=sha1, struct=fps[0], comp=fps[1]))
    except OSError as e:
        log.warning(f"warning: cannot cache fingerprints in {cache} ({e})")
    return fps


def coverage(sample_fps, reference_fps, struct_cutoff: float, comp_cutoff: float) -> dict:
    """CDVAE's coverage: a reference crystal is recalled when some sample is within struct_cutoff (Euclidean
    distance of CrystalNN fingerprints) and comp_cutoff (of Magpie fingerprints standardised by CDVAE's scaler,
    models/cdvae_magpie_scaler.json; missing features count 0); precision is the share of samples within both of
    some reference crystal, over all samples. Samples without a structure fingerprint count as uncovered."""
    import json

    from scipy.spatial.distance import cdist

    scaler = json.loads((Path(__file__).with_name("cdvae_magpie_scaler.json")).read_text())
    mean, std = np.array(scaler["mean"]), np.array(scaler["std"])
    (s_struct, s_comp), (r_struct, r_comp) = sample_fps, reference_fps
    n_samples = len(s_struct)
    ok = np.isfinite(s_struct).all(1)
    r_ok = np.isfinite(r_struct).all(1)
    s_struct, s_comp, r_struct, r_comp = s_struct[ok], s_comp[ok], r_struct[r_ok], r_comp[r_ok]
    s_comp, r_comp = (np.nan_to_num((c - mean) / std) for c in (s_comp, r_comp))
    if not len(s_struct):
        return {"cov_recall": 0.0, "cov_precision": 0.0}
    d_struct, d_comp = cdist(s_struct, r_struct), cdist(s_comp, r_comp)
    # CDVAE takes the nearest in each space separately: a crystal is covered when both nearest distances are small
    recall = (d_struct.min(0) <= struct_cutoff) & (d_comp.min(0) <= comp_cutoff)
    precision = (d_struct.min(1) <= struct_cutoff) & (d_comp.min(1) <= comp_cutoff)
    return {"cov_recall": float(recall.mean()), "cov_precision": float(precision.sum() / n_samples),
            "amsd_recall": float(d_struct.min(0).mean()), "amsd_precision": float(d_struct.min(1).mean()),
            "amcd_recall": float(d_comp.min(0).mean()), "amcd_precision": float(d_comp.min(1).mean())}


def _match_key(indexed) -> tuple:
    """Crystals that StructureMatcher can match (primitive_cell on, supercells off, as MATCHER leaves them) share
    their reduced formula and the site count of the Niggli-reduced primitive cell, which the matcher compares
    before anything else: grouping by both skips only pairs it would reject. A crystal whose primitive cell
    cannot be found matches nothing (the matcher would fail on it too) and gets a group of its own."""
    from collections import Counter

    from pymatgen.core import Composition

    i, crystal = indexed
    formula = Composition(Counter(int(z) for z in crystal[0])).reduced_formula
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return formula, len(_structure(crystal).get_reduced_structure(reduction_algo="niggli").get_primitive_structure())
    except Exception:
        return formula, "unreducible", i


def _fits(matcher, a, b) -> bool:
    try:
        return matcher.fit(a, b)
    except Exception:  # a degenerate cell the matcher cannot handle matches nothing
        return False


def _first_matches(job) -> list[int | None]:
    """For each candidate of one composition, the index of the first earlier unique candidate it matches
    (uniqueness), or of a reference crystal it matches (novelty); None when there is none."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    candidates, references, against_references = job
    matcher = StructureMatcher(**MATCHER)
    structures = [_structure(c) for c in candidates]
    refs = [_structure(r) for r in references]
    found: list[int | None] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(structures):
            others = enumerate(refs) if against_references else ((j, structures[j]) for j in range(i) if found[j] is None)
            found.append(next((k for k, other in others if _fits(matcher, s, other)), None))
    return found


def uniqueness_novelty(samples: list, training: list, workers: int | None = None, progress: bool = True) -> dict:
    """Unique: not matched (StructureMatcher, CDVAE's tolerances) by an earlier unique sample; novel: matched by no
    training crystal. Only crystals of the same reduced formula and primitive-cell size can match (_match_key), so
    the work splits into those groups and runs over `workers` processes. Returns the masks `unique` and `novel`
    (lists of bool) and the rates."""
    import multiprocessing

    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    try:
        run = pool.imap if pool else map
        keys = list(tqdm(run(_match_key, enumerate(samples + training)), total=len(samples) + len(training), mininterval=1,
                         desc="primitive cells", unit=" crystals", disable=not progress))
        groups: dict[tuple, list[int]] = {}
        for i in range(len(samples)):
            groups.setdefault(keys[i], []).append(i)
        by_key: dict[tuple, list] = {}
        for r, key in zip(training, keys[len(samples):]):
            by_key.setdefault(key, []).append(r)
        unique_jobs = [([samples[i] for i in idx], [], False) for idx in groups.values()]
        novel_jobs = [([samples[i] for i in idx], by_key.get(k, []), True) for k, idx in groups.items()]
        bar = dict(total=2 * len(groups), desc="uniqueness / novelty", unit=" groups", disable=not progress, mininterval=1)
        results = list(tqdm(run(_first_matches, unique_jobs + novel_jobs), **bar))
    finally:
        if pool:
            pool.close()
            pool.join()
    unique, novel = [False] * len(samples), [False] * len(samples)
    for idx, dup, seen in zip(groups.values(), results[:len(groups)], results[len(groups):]):
        for i, d, s in zip(idx, dup, seen):
            unique[i], novel[i] = d is None, s is None
    n = max(1, len(samples))
    return {"unique": unique, "novel": novel, "uniqueness": sum(unique) / n, "novelty": sum(novel) / n,
            "unique_and_novel": sum(u and v for u, v in zip(unique, novel)) / n}
