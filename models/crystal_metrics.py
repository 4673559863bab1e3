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
core, and the callers report the time it took.

A crystal that is not `well_formed` (no atoms, an atom of no element, non-finite coordinates, a degenerate cell)
gets none of the expensive per-structure work: on such a cell CrystalNN, the primitive-cell search and CHGNet have
no bounded cost (a cell 1e-4 A thin puts millions of periodic images within their cutoffs), and on a dummy atom
they fail. It is scored as that work fails on it: uncovered (no structure fingerprint), matching nothing, not
relaxed. Every other structure's work runs on worker processes with a time limit per structure
(models/bounded.py); one past it is scored the same way, and the callers count and report it.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.bounded import OVER_TIME, Stopped, TimeLimit, bounded_map, count_stopped, time_limit

MIN_DISTANCE = 0.5  # A
MIN_VOLUME = 0.1  # A^3
MATCHER = dict(stol=0.5, ltol=0.3, angle_tol=10)  # CDVAE's settings
MAX_OXIDATION_COMBINATIONS = 10 ** 7  # CDVAE gives up (invalid) on compositions with more combinations

log = logging.getLogger(__name__)


def cell_valid(lengths, angles) -> bool:
    """The cell's part of structural validity: finite, positive lengths (A) and angles (degrees), a volume of at least
    MIN_VOLUME, and no lattice vector shorter than MIN_DISTANCE: every atom is that far from its own images, which
    the distances between atoms do not see. The shortest lattice vector can be far shorter than the shortest cell
    edge (a cell of 5 A edges at angles of 119.999 degrees has one of 0.05 A)."""
    from pymatgen.core import Lattice

    if not (np.isfinite(lengths).all() and np.isfinite(angles).all()) or min(lengths) <= 0:
        return False
    matrix = Lattice.from_parameters(*lengths, *angles).matrix
    volume = abs(np.linalg.det(matrix))
    if not volume >= MIN_VOLUME:  # also False for NaN (a degenerate angle set)
        return False
    # A lattice vector steps across at least one layer of cells, so none is shorter than the thinnest layer: enough
    # for every real cell. A thinner, skewed cell may still be fine; the Minkowski-reduced basis holds its shortest.
    if (volume / np.linalg.norm(np.cross(matrix[[1, 2, 0]], matrix[[2, 0, 1]]), axis=1)).min() >= MIN_DISTANCE:
        return True
    from ase.geometry import minkowski_reduce

    try:
        reduced, _ = minkowski_reduce(matrix)
    except RuntimeError:  # no reduced basis within ASE's iterations: a cell too degenerate to use
        return False
    return bool(np.linalg.norm(reduced, axis=1).min() >= MIN_DISTANCE)


def well_formed(crystal) -> bool:
    """At least one atom, every one an element (not ASE's dummy X), finite fractional coordinates and a valid cell
    (cell_valid): what CrystalNN, Magpie, the primitive-cell search and CHGNet need to finish, in bounded time.
    Structural validity asks this and more."""
    from ase.data import chemical_symbols

    numbers, frac, lengths, angles = crystal
    z = np.asarray(numbers)
    return (len(z) > 0 and bool(((z >= 1) & (z < len(chemical_symbols))).all()) and bool(np.isfinite(frac).all())
            and cell_valid(lengths, angles))


def structure_valid(numbers, frac, lengths, angles) -> bool:
    """Structural validity of one crystal given as arrays (fractional coordinates, lengths A, angles degrees)."""
    from pymatgen.core import Lattice

    if not well_formed((numbers, frac, lengths, angles)):
        return False
    if len(numbers) == 1:
        return True
    d = Lattice.from_parameters(*lengths, *angles).get_all_distances(frac, frac) + np.eye(len(numbers)) * 1e9
    return bool(d.min() >= MIN_DISTANCE)


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
    if not len(elements) or (elements < 1).any() or (elements >= len(chemical_symbols)).any():
        return False
    counts = counts // np.gcd.reduce(counts)
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


def match_crystals(pairs: list, workers: int | None = None, progress: bool = True, seconds: float | None = None) -> list:
    """RMS distance or None (no match) for each (sample, truth) pair; each crystal is (numbers, frac, lengths,
    angles). Runs over `workers` processes (default: every core), at most `seconds` a pair: a pair past it, or whose
    process died, is a bounded.Stopped (counted by the caller as no match)."""
    return bounded_map(_rms, pairs, workers, seconds, progress, desc="StructureMatcher", unit=" pairs")


def is_valid(crystal) -> bool:
    numbers, frac, lengths, angles = crystal
    return structure_valid(numbers, frac, lengths, angles) and composition_valid(numbers)


def csp_metrics(samples: list[list], truths: list, workers: int | None = None, progress: bool = True,
                seconds: float | None = None) -> dict:
    """Structure-prediction metrics: samples[i] holds the k samples (crystal tuples) of truths[i]'s composition.
    Returns match_rate and rmse (mean over matched compositions, each at its best sample) for k = 1 (the first
    sample) and, when k > 1, for all k; the validity of the samples and of the truths; and not_matched, {reason:
    count} of the pairs StructureMatcher did not finish within `seconds` each (they count as no match)."""
    truth_valid = [is_valid(t) for t in truths]
    sample_valid = [[is_valid(s) for s in group] for group in samples]
    pairs, where = [], []
    for i, group in enumerate(samples):
        for j, s in enumerate(group):
            if truth_valid[i] and sample_valid[i][j]:
                pairs.append((s, truths[i]))
                where.append((i, j))
    rms = match_crystals(pairs, workers, progress, seconds)
    best = np.full((len(truths), max(len(g) for g in samples)), np.nan)
    for (i, j), r in zip(where, rms):
        if r is not None and not isinstance(r, Stopped):
            best[i, j] = r
    k = best.shape[1]
    out = {"n_compositions": len(truths), "samples_per_composition": k,
           "valid_truths": float(np.mean(truth_valid)),
           "structural_validity": float(np.mean([structure_valid(*s) for g in samples for s in g])),
           "compositional_validity": float(np.mean([composition_valid(s[0]) for g in samples for s in g])),
           "validity": float(np.mean([v for g in sample_valid for v in g])),
           "not_matched": count_stopped(rms)}
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

    from pymatgen.core import Composition

    site_fp, comp_fp = _featurisers()
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


def _featurisers():
    """CrystalNN's and Magpie's featurisers, built once per process: their presets load tables for seconds, which
    fingerprints() spends before it forks its workers, not inside the first crystal's time limit."""
    global _FEATURISERS
    if _FEATURISERS is None:
        from matminer.featurizers.composition.composite import ElementProperty
        from matminer.featurizers.site.fingerprint import CrystalNNFingerprint

        _FEATURISERS = CrystalNNFingerprint.from_preset("ops"), ElementProperty.from_preset("magpie")
    return _FEATURISERS


class Fingerprints(NamedTuple):
    """Structure [n, 61] and composition [n, 132] fingerprints, NaN rows where none was made; not_fingerprinted:
    {reason: count} of those."""

    struct: np.ndarray
    comp: np.ndarray
    not_fingerprinted: dict


NOT_WELL_FORMED = "not well formed"


def fingerprints(crystals: list, workers: int | None = None, progress: bool = True, desc: str = "fingerprints",
                 seconds: float | None = None) -> Fingerprints:
    """Fingerprints of crystals, on `workers` processes, at most `seconds` a crystal. A crystal that is not
    well_formed is not fingerprinted (CrystalNN need not end on it); nor is one past the time limit, or whose process
    died: all three count as uncovered."""
    struct, comp = np.full((len(crystals), 61), np.nan), np.full((len(crystals), 132), np.nan)
    formed = [i for i, c in enumerate(crystals) if well_formed(c)]
    if formed:
        _featurisers()
    out = bounded_map(_fingerprint, [crystals[i] for i in formed], workers, seconds, progress, desc=desc, unit=" crystals")
    for i, o in zip(formed, out):
        if not isinstance(o, Stopped):
            struct[i], comp[i] = o
    reasons = {NOT_WELL_FORMED: len(crystals) - len(formed), **count_stopped(out)}
    return Fingerprints(struct, comp, {k: n for k, n in reasons.items() if n})


def reference_fingerprints(name: str, split: str, crystals: list, data_dir: Path, workers: int | None = None,
                           progress: bool = True, seconds: float | None = None) -> Fingerprints:
    """fingerprints() of the crystals of a CDVAE data split, cached in data_dir next to its crystal cache and keyed by
    its CSV's blob id: minutes of CrystalNN for a test set, once. A damaged cache is set aside (fileio.set_aside) and
    one that cannot be written is a warning, not an error: the fingerprints are recomputed. Fingerprints of which
    some stopped at the time limit are not cached: a later run, perhaps with a longer limit, tries them again."""
    from models.crystals import split_file
    from models.fileio import git_blob_sha1, read_npz_cache, save_npz

    sha1 = git_blob_sha1(split_file(name, split, data_dir, download_missing=False))
    cache = data_dir / f"cdvae_{name}_{split}_fingerprints.npz"
    z = read_npz_cache(cache, ("source_sha1", "struct", "comp"), log)
    if z is not None and str(z["source_sha1"]) == sha1 and len(z["struct"]) == len(crystals):
        return Fingerprints(z["struct"], z["comp"], {})
    fps = fingerprints(crystals, workers, progress, desc=f"{name} {split} fingerprints", seconds=seconds)
    if set(fps.not_fingerprinted) - {NOT_WELL_FORMED}:
        log.warning(f"warning: {cache} not written, so that a later run fingerprints again the {name} {split} crystals "
                    f"stopped in this one")
        return fps
    try:
        save_npz(cache, dict(source_sha1=sha1, struct=fps.struct, comp=fps.comp))
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
    (s_struct, s_comp), (r_struct, r_comp) = sample_fps[:2], reference_fps[:2]
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


def _fits(matcher, a, b, seconds: float | None):
    """matcher.fit(a, b), or Stopped(OVER_TIME) past `seconds`. The pairs of one group run in one worker, so each
    pair is bounded here (StructureMatcher is Python and numpy, which SIGALRM interrupts) rather than the group."""
    try:
        with time_limit(seconds):
            return bool(matcher.fit(a, b))
    except TimeLimit:
        return Stopped(OVER_TIME)
    except Exception:  # a degenerate cell the matcher cannot handle matches nothing
        return False


def _first_matches(job) -> tuple[list[int | None], int]:
    """For each candidate of one composition, the index of the first earlier unique candidate it matches
    (uniqueness), or of a reference crystal it matches (novelty); None when there is none. job: (candidates,
    references, against_references, seconds a pair at most); returns those indices and the number of pairs stopped
    at the time limit (no match)."""
    from pymatgen.analysis.structure_matcher import StructureMatcher

    candidates, references, against_references, seconds = job
    matcher = StructureMatcher(**MATCHER)
    structures = [_structure(c) for c in candidates]
    refs = [_structure(r) for r in references]
    found: list[int | None] = []
    over = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, s in enumerate(structures):
            others = enumerate(refs) if against_references else ((j, structures[j]) for j in range(i) if found[j] is None)
            match = None
            for k, other in others:
                fit = _fits(matcher, s, other, seconds)
                over += isinstance(fit, Stopped)
                if fit is True:  # a Stopped pair is no match
                    match = k
                    break
            found.append(match)
    return found, over


def uniqueness_novelty(samples: list, training: list, workers: int | None = None, progress: bool = True,
                       seconds: float | None = None) -> dict:
    """Unique: not matched (StructureMatcher, CDVAE's tolerances) by an earlier unique sample; novel: matched by no
    training crystal. Only crystals of the same reduced formula and primitive-cell size can match (_match_key), so
    the work splits into those groups and runs over `workers` processes. A crystal that is not well_formed, or whose
    primitive cell was not found within `seconds`, matches nothing (each pair of crystals is bounded by `seconds`
    too). Returns the masks `unique` and `novel` (lists of bool), the rates, not_compared ({reason: count} of the
    samples that matched nothing for those reasons) and pairs_over_time (pairs stopped at the limit: no match)."""
    from collections import Counter

    crystals = samples + training
    formed = [i for i, c in enumerate(crystals) if well_formed(c)]
    keys: list = [(None, NOT_WELL_FORMED, i) for i in range(len(crystals))]  # (None, why, i): a group of its own
    reduced = bounded_map(_match_key, [(i, crystals[i]) for i in formed], workers, seconds, progress,
                          desc="primitive cells", unit=" crystals")
    for i, key in zip(formed, reduced):
        keys[i] = (None, key.reason, i) if isinstance(key, Stopped) else key
    groups: dict[tuple, list[int]] = {}
    for i in range(len(samples)):
        groups.setdefault(keys[i], []).append(i)
    by_key: dict[tuple, list] = {}
    for r, key in zip(training, keys[len(samples):]):
        by_key.setdefault(key, []).append(r)
    # Only groups with something to compare make a job: a lone crystal, or one that matches nothing, is unique
    # (and novel when no training crystal shares its key) without one.
    unique_jobs = {k: ([samples[i] for i in idx], [], False, seconds) for k, idx in groups.items() if len(idx) > 1}
    novel_jobs = {k: ([samples[i] for i in idx], by_key[k], True, seconds) for k, idx in groups.items() if k in by_key}
    jobs = list(unique_jobs.values()) + list(novel_jobs.values())
    results = bounded_map(_first_matches, jobs, workers, None, progress, desc="uniqueness / novelty", unit=" groups")
    unique_found = dict(zip(unique_jobs, results[:len(unique_jobs)]))
    novel_found = dict(zip(novel_jobs, results[len(unique_jobs):]))
    unique, novel = [False] * len(samples), [False] * len(samples)
    for k, idx in groups.items():
        dup = unique_found.get(k, ([None] * len(idx), 0))[0]
        seen = novel_found.get(k, ([None] * len(idx), 0))[0]
        for i, d, s in zip(idx, dup, seen):
            unique[i], novel[i] = d is None, s is None
    n = max(1, len(samples))
    not_compared = dict(Counter(keys[i][1] for i in range(len(samples)) if keys[i][0] is None))
    return {"unique": unique, "novel": novel, "uniqueness": sum(unique) / n, "novelty": sum(novel) / n,
            "unique_and_novel": sum(u and v for u, v in zip(unique, novel)) / n, "not_compared": not_compared,
            "pairs_over_time": sum(over for _, over in results)}
