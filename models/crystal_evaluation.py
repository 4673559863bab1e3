"""evaluate.py on crystals: generated crystals, or the real test set as the reference row, scored with the CDVAE
protocol (models/crystal_metrics.py) and, when asked, the CHGNet stability proxy (models/crystal_stability.py);
README.md, "Crystals", "Metrics".

Samples that carry truth_id (sample.py on a structure-prediction model) get match rate and RMSE against their split's
true crystals. De novo samples get validity, the Wasserstein distances of density and element count and coverage
against the test set, uniqueness and novelty against their model's training split, and with stability the energy
above a CHGNet hull and the S.U.N. rate. `score_crystals` logs through the `logging` handlers its caller set up.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from models import crystal_metrics, crystal_stability
from models.crystals import CRYSTAL_SETS, CrystalSet, crystal_atoms, load_crystals
from models.evaluation import reference_subset, write_metrics
from models.fileio import DataError, atomic_write
from models.molecules import default_data_dir

log = logging.getLogger(__name__)


def read_crystal_samples(path: Path) -> tuple[list, list]:
    """The structures of an extended XYZ file of crystals as ASE Atoms (their info holds sample.py's truth_id,
    truth_index and train_split) and as crystal arrays (atomic numbers [n], fractional coordinates [n, 3] in [0, 1),
    lengths [3] in A, angles [3] in degrees); DataError naming the file when it is unreadable, empty, or holds a
    structure without a periodic cell."""
    import ase.io

    try:
        structures = ase.io.read(path, ":", format="extxyz")
    except Exception as e:  # ASE raises many kinds for malformed files
        raise DataError(f"{path}: not readable as extended XYZ ({type(e).__name__}: {e})") from None
    if not structures:
        raise DataError(f"{path}: no structures (empty file)")
    for k, atoms in enumerate(structures):
        if not atoms.pbc.all():
            raise DataError(f"{path}: structure {k + 1} is not a crystal (no periodic cell); molecules are scored with "
                            f"--data qm9")
    crystals = [(a.numbers, a.cell.scaled_positions(a.positions) % 1.0, a.cell.cellpar()[:3], a.cell.cellpar()[3:])
                for a in structures]
    return structures, crystals


def score_crystals(name: str, samples: Path | None, out_json: Path, *, n_test: int | None = None,
                   data_dir: Path | None = None, workers: int | None = None, n_unique: int = 1000, coverage: bool = True,
                   stability: bool = False, relaxed_hull: bool = False, relax_steps: int = 500,
                   stable_threshold: float = 0.1, progress: bool = True, started: float | None = None) -> dict:
    """Score the crystals of the extended XYZ file `samples`, imitating the CDVAE data set `name`, or, with samples
    None, the test crystals themselves (the first n_test of a fixed random order with n_test) against the validation
    split; write the metrics to out_json (and the relaxed samples to relaxed.extxyz next to it with stability) and
    return them.

    Structure prediction counts every composition of the test split up to the last one sampled in the denominator.
    De novo: uniqueness, novelty and stability score the first n_unique crystals; coverage can be skipped (CrystalNN
    fingerprints take minutes per thousand crystals). Stability relaxes them for up to relax_steps FIRE steps and
    counts a crystal stable within stable_threshold eV/atom of the hull; relaxed_hull relaxes the training crystals
    on the hull too (models/crystal_stability.py). workers: processes for StructureMatcher, fingerprints and CHGNet
    (default: every core); data_dir: the data and its caches (default $MOLGEN_DATA or ./data); started: time.time()
    when the run began, for the total in the last line (default: now). Raises DataError for unreadable samples or
    data, OSError when an output cannot be written.
    """
    started = time.time() if started is None else started
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    test = load_crystals(name, "test", data_dir, progress=progress)
    truths = test.arrays()
    if samples is None:
        crystals, structures = [truths[i] for i in reference_subset(len(truths), n_test)], None
        label = f"{name} test set" + (f" ({len(crystals)} of {len(truths)}, seed 0)" if n_test else "")
    else:
        structures, crystals = read_crystal_samples(samples)
        label = str(samples)
    t0 = time.time()
    result = {"samples": label, "data": name, "crystals": len(crystals),
              "structural_validity": float(np.mean([crystal_metrics.structure_valid(*c) for c in crystals])),
              "compositional_validity": float(np.mean([crystal_metrics.composition_valid(c[0]) for c in crystals]))}
    result["validity"] = float(np.mean([crystal_metrics.is_valid(c) for c in crystals]))
    log.info(f"{label}: {len(crystals)} crystals; structural validity {100 * result['structural_validity']:.2f} %, "
             f"compositional validity {100 * result['compositional_validity']:.2f} %, both {100 * result['validity']:.2f} %")
    if structures is not None and "truth_id" in structures[0].info:
        result.update(structure_prediction(name, test, samples, structures, crystals, workers, progress))
    else:  # de novo samples, or the test set itself as the reference row
        scored, unique_novel, training, train_split = distribution_metrics(
            name, crystals, structures, truths, result, data_dir, n_unique=n_unique, coverage=coverage, workers=workers,
            progress=progress)
        if stability:
            result.update(stability_metrics(name, scored, unique_novel, training, train_split, data_dir,
                                            relaxed_out=None if samples is None else out_json.parent / "relaxed.extxyz",
                                            relaxed_hull=relaxed_hull, relax_steps=relax_steps,
                                            stable_threshold=stable_threshold, workers=workers, progress=progress))
    result["eval_seconds"] = time.time() - t0
    write_metrics(out_json, result)
    log.info(f"wrote {out_json}; {time.time() - started:.1f} s in all")
    return result


def structure_prediction(name: str, test: CrystalSet, samples: Path, structures: list, crystals: list,
                         workers: int | None = None, progress: bool = True) -> dict:
    """Match rate and RMSE (crystal_metrics.csp_metrics) of samples drawn for the compositions of the test split:
    each structure names its true crystal by truth_index and truth_id, and every composition up to the last one
    sampled counts, so that those sample.py skipped (unknown elements) count as not matched. DataError when a
    structure names a crystal that is not that row of the test split (samples drawn for another split)."""
    t0 = time.time()
    groups: dict[int, list] = {}
    for k, (atoms, crystal) in enumerate(zip(structures, crystals)):
        i = int(atoms.info.get("truth_index", -1))
        if not 0 <= i < len(test) or str(atoms.info.get("truth_id")) != str(test.ids[i]):
            raise DataError(f"{samples}: structure {k + 1} names truth {atoms.info.get('truth_id')} at row {i}, which is "
                            f"not a {name} test crystal: these samples were drawn for another split (sample.py "
                            f"--compositions test)")
        groups.setdefault(i, []).append(crystal)
    n = max(groups) + 1
    k = max(len(g) for g in groups.values())
    result = crystal_metrics.csp_metrics([groups.get(i, []) for i in range(n)], test.arrays()[:n], workers,
                                         progress=progress)
    result["matcher_seconds"] = time.time() - t0
    log.info(f"structure prediction on the first {n} of {len(test)} {name} test compositions, {k} sample(s) each: "
             + ", ".join(f"match rate@{j} {100 * result[f'match_rate@{j}']:.2f} %, RMSE@{j} "
                         f"{result[f'rmse@{j}'] if result[f'rmse@{j}'] is None else round(result[f'rmse@{j}'], 4)}"
                         for j in sorted({1, k}))
             + f" (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10 on {workers or os.cpu_count()} processes: "
               f"{result['matcher_seconds']:.1f} s)")
    return result


def distribution_metrics(name: str, crystals: list, structures: list | None, truths: list, result: dict, data_dir: Path,
                         n_unique: int = 1000, coverage: bool = True, workers: int | None = None,
                         progress: bool = True) -> tuple[list, dict, list, str]:
    """De novo metrics into result: Wasserstein distances and coverage against the reference split, uniqueness and
    novelty of the first n_unique crystals. Samples (structures, as read) are compared with the test set `truths`
    and judged novel against their model's training split (their train_split); the test set itself (structures
    None) is compared with the validation split and judged novel against the training split (the validation split
    offline). Returns what S.U.N. needs: the scored crystals, their uniqueness_novelty, the training split's
    crystals and its name."""
    t0 = time.time()
    if structures is None:
        reference_split, reference = "val", load_crystals(name, "val", data_dir, progress=False).arrays()
    else:
        reference_split, reference = "test", truths
    train_split = structures[0].info.get("train_split", "train") if structures is not None else "train"
    try:
        training = load_crystals(name, train_split, data_dir, progress=progress)
    except DataError:
        if train_split != "train":
            raise
        train_split, training = "val", load_crystals(name, "val", data_dir, progress=progress)
    result.update(crystal_metrics.wasserstein_distances(crystals, reference), distribution_reference=f"{name} {reference_split}")
    if coverage:
        struct_cutoff, comp_cutoff = CRYSTAL_SETS[name].coverage_cutoffs
        sample_fps = crystal_metrics.fingerprints(crystals, workers, progress, desc="sample fingerprints")
        reference_fps = crystal_metrics.reference_fingerprints(name, reference_split, reference, data_dir, workers, progress)
        result.update(crystal_metrics.coverage(sample_fps, reference_fps, struct_cutoff, comp_cutoff),
                      coverage_cutoffs={"structure": struct_cutoff, "composition": comp_cutoff})
    scored = crystals[:n_unique]
    un = crystal_metrics.uniqueness_novelty(scored, training.arrays(), workers, progress)
    result.update(uniqueness=un["uniqueness"], novelty=un["novelty"], unique_and_novel=un["unique_and_novel"],
                  uniqueness_novelty_of=len(scored), novelty_against=f"{name} {train_split}", distribution_seconds=time.time() - t0)
    log.info(f"Wasserstein distances to the {name} {reference_split} split: density {result['wdist_density']}, number of "
             f"elements {result['wdist_num_elements']}" + ("" if not coverage else
             f"; coverage recall {100 * result['cov_recall']:.2f} %, precision {100 * result['cov_precision']:.2f} %"))
    log.info(f"uniqueness {100 * un['uniqueness']:.2f} %, novelty {100 * un['novelty']:.2f} % (against {name} {train_split}), "
             f"unique and novel {100 * un['unique_and_novel']:.2f} % of the first {len(scored)} crystals; "
             f"{time.time() - t0:.1f} s")
    return scored, un, training.arrays(), train_split


def stability_metrics(name: str, scored: list, unique_novel: dict, training: list, train_split: str, data_dir: Path,
                      relaxed_out: Path | None, relaxed_hull: bool = False, relax_steps: int = 500,
                      stable_threshold: float = 0.1, workers: int | None = None, progress: bool = True) -> dict:
    """Relax the scored samples with CHGNet, take their energy above the CHGNet hull of the training split
    (crystal_stability.chgnet_hull) and the S.U.N. rate (with their uniqueness_novelty); the relaxed samples go to
    relaxed_out. relaxed_out None scores the test crystals of the reference row as the hull's crystals are: at their
    DFT geometry on a single-point hull, relaxed on a relaxed one, and writes none."""
    import ase.io

    t0 = time.time()
    hull = crystal_stability.chgnet_hull(name, train_split, training, scored, data_dir, relaxed_hull, relax_steps,
                                         workers, progress)
    relaxing = relaxed_out is not None or relaxed_hull
    hull_kind = "relaxed" if relaxed_hull else "single points at their DFT geometries"
    if not relaxing:
        energies, relaxed = crystal_stability.static_energies(scored, workers=workers, progress=progress), scored
        outcomes = [None] * len(scored)
    else:
        outcomes = crystal_stability.relax(scored, relax_steps, workers=workers, progress=progress)
        relaxed = [o[0] if o else c for o, c in zip(outcomes, scored)]
        energies = np.array([o[1] if o else np.nan for o in outcomes])
    e_hull = np.array([hull.above(c, e) if np.isfinite(e) else np.nan
                       for c, e in zip(relaxed, energies)])
    stable = np.nan_to_num(e_hull, nan=np.inf) <= stable_threshold
    sun = stable & np.array(unique_novel["unique"]) & np.array(unique_novel["novel"])
    result = dict(stability_of=len(scored), stable_threshold_ev_per_atom=stable_threshold,
                  stable_rate=float(stable.mean()), on_hull_rate=float((np.nan_to_num(e_hull, nan=np.inf) <= 0).mean()),
                  sun_rate=float(sun.mean()), e_above_hull_median=float(np.nanmedian(e_hull)) if np.isfinite(e_hull).any() else None,
                  relax_failed=int(sum(o is None for o in outcomes)) if relaxing else 0,
                  relax_converged=float(np.mean([bool(o and o[3]) for o in outcomes])) if relaxing else None,
                  hull=f"CHGNet energies of {name} {train_split} ({hull_kind}) and relaxed elemental prototypes",
                  stability_seconds=time.time() - t0)
    log.info(f"stability (CHGNet, hull of {name} {train_split}, {hull_kind}): {100 * stable.mean():.2f} % within {stable_threshold} eV/atom "
             f"of the hull, {100 * result['on_hull_rate']:.2f} % on or below it, median {result['e_above_hull_median']} eV/atom; "
             f"S.U.N. {100 * sun.mean():.2f} % of {len(scored)}; {time.time() - t0:.1f} s")
    if relaxed_out is not None:
        frames = []
        for k, (c, e, eh) in enumerate(zip(relaxed, energies, e_hull)):
            atoms = crystal_atoms(*c)
            atoms.info.update(sample_index=k, energy_per_atom=float(e), e_above_hull=float(eh), stable=bool(stable[k]),
                              sun=bool(sun[k]), relax_steps=int(outcomes[k][2]) if outcomes[k] else -1)
            frames.append(atoms)
        atomic_write(relaxed_out, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))
        log.info(f"wrote the relaxed samples to {relaxed_out}")
    return result
