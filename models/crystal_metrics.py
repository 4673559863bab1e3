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
import os
import warnings
from functools import lru_cache

import numpy as np

MIN_DISTANCE = 0.5  # A
MIN_VOLUME = 0.1  # A^3
MATCHER = dict(stol=0.5, ltol=0.3, angle_tol=10)  # CDVAE's settings
MAX_OXIDATION_COMBINATIONS = 10 ** 7  # CDVAE gives up (invalid) on compositions with more combinations


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
