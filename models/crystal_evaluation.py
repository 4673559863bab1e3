"""evaluate.py on crystals: generated crystals, or the real test set as the reference row, scored with the CDVAE
protocol (models/crystal_metrics.py) and, when asked, the CHGNet stability proxy (models/crystal_stability.py);
models/README.md, "Metrics"; the runs in models/EXPERIMENTS.md, "Crystals".

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
from models.bounded import OVER_TIME, Stopped, count_stopped, describe
from models.evaluation import ordinals, read_frames, reference_subset, write_metrics
from models.fileio import DataError, atomic_write
from models.molecules import default_data_dir

log = logging.getLogger(__name__)


def read_crystal_samples(path: Path) -> tuple[list, list, list]:
    """The structures of an extended XYZ file of crystals as ASE Atoms (their info holds sample.py's truth_id,
    truth_index and train_split), as crystal arrays (atomic numbers [n], fractional coordinates [n, 3] in [0, 1),
    lengths [3] in A, angles [3] in degrees), and the line each starts on, for messages; DataError naming the file
    and the structure when one is unreadable (evaluation.read_frames) or has no periodic cell.

    A frame of no atoms is read as a crystal of no atoms (with NaN lengths when it has no cell either): a sample
    the generator failed to make stays in every denominator, and counts as invalid, uncovered and not stable.
    Refusing the file would leave the user to drop it, which would raise the model's rates. A cell too flat to
    give fractional coordinates gives NaN ones: the crystal is not well formed (crystal_metrics), and invalid."""
    frames = read_frames(path)
    structures, crystals = [], []
    for k, (line, atoms) in enumerate(frames):
        if len(atoms) and not atoms.pbc.all():
            raise DataError(f"{path}: structure {k + 1} ({line}) is not a crystal (no periodic cell); molecules are "
                            f"scored with --data qm9")
        cellpar = atoms.cell.cellpar() if atoms.pbc.all() else np.full(6, np.nan)
        try:
            frac = atoms.cell.scaled_positions(atoms.positions) % 1.0
        except np.linalg.LinAlgError:
            frac = np.full((len(atoms), 3), np.nan)
        structures.append(atoms)
        crystals.append((atoms.numbers, frac, cellpar[:3], cellpar[3:]))
    return structures, crystals, [line for line, _ in frames]


def score_crystals(name: str, samples: Path | None, out_json: Path, *, n_test: int | None = None,
                   data_dir: Path | None = None, workers: int | None = None, n_unique: int = 1000, coverage: bool = True,
                   stability: bool = False, relaxed_hull: bool = False, relax_steps: int = 500,
                   stable_threshold: float = 0.1, structure_timeout: float | None = None, progress: bool = True,
                   started: float | None = None, fig_dir: Path | None = None) -> dict:
    """Score the crystals of the extended XYZ file `samples`, imitating the CDVAE data set `name`, or, with samples
    None, the test crystals themselves (the first n_test of a fixed random order with n_test) against the validation
    split; write the metrics to out_json (and the relaxed samples to relaxed.extxyz next to it with stability), a
    picture of the first 16 crystals to fig_dir/crystals.png when fig_dir is given, and return the metrics.

    Structure prediction counts every composition of the test split up to the last one sampled in the denominator.
    De novo: uniqueness, novelty and stability score the first n_unique crystals; coverage can be skipped (CrystalNN
    fingerprints take minutes per thousand crystals). Stability relaxes them for up to relax_steps FIRE steps and
    counts a crystal stable within stable_threshold eV/atom of the hull; relaxed_hull relaxes the training crystals
    on the hull too (models/crystal_stability.py), and the hull is built first, so that a cache it cannot write is
    an error before the rest of the work. A crystal that is not well formed (crystal_metrics.well_formed) gets no
    fingerprint, primitive cell, matcher comparison or relaxation, and one structure's fingerprint, primitive cell,
    matcher pair or relaxation is stopped after structure_timeout seconds (None: no limit); both are scored as if
    that work had failed, and counted in not_computed and the log. workers: processes for StructureMatcher,
    fingerprints and CHGNet (default: every core); data_dir: the data and its caches (default $MOLGEN_DATA or
    ./data); started: time.time() when the run began, for the total in the last line (default: now). Raises
    DataError for unreadable samples or data, OSError when an output or a cache cannot be written.
    """
    started = time.time() if started is None else started
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    test = load_crystals(name, "test", data_dir, progress=progress)
    truths = test.arrays()
    if samples is None:
        crystals, structures = [truths[i] for i in reference_subset(len(truths), n_test)], None
        label = f"{name} test set" + (f" ({len(crystals)} of {len(truths)}, seed 0)" if n_test else "")
    else:
        structures, crystals, lines = read_crystal_samples(samples)
        label = str(samples)
    t0 = time.time()
    result = {"samples": label, "data": name, "crystals": len(crystals),
              "structural_validity": float(np.mean([crystal_metrics.structure_valid(*c) for c in crystals])),
              "compositional_validity": float(np.mean([crystal_metrics.composition_valid(c[0]) for c in crystals]))}
    result["validity"] = float(np.mean([crystal_metrics.is_valid(c) for c in crystals]))
    log.info(f"{label}: {len(crystals)} crystals; structural validity {100 * result['structural_validity']:.2f} %, "
             f"compositional validity {100 * result['compositional_validity']:.2f} %, both {100 * result['validity']:.2f} %")
    ill_formed = [i for i, c in enumerate(crystals) if not crystal_metrics.well_formed(c)]
    result.update(not_well_formed=len(ill_formed), empty=sum(len(c[0]) == 0 for c in crystals),
                  structure_timeout_seconds=structure_timeout, not_computed={})
    if ill_formed:
        which = ordinals(ill_formed, lines) if structures is not None else f"{len(ill_formed)} test crystals"
        log.warning(f"warning: {len(ill_formed)} of {len(crystals)} crystals are not well formed ({which}: no atoms, "
                    f"an atom of no element, non-finite coordinates or a degenerate cell); they count as invalid and "
                    f"uncovered, are not relaxed, and match nothing")
    if structures is not None and any("truth_id" in a.info for a in structures):
        result.update(structure_prediction(name, test, samples, structures, crystals, workers, progress, structure_timeout))
    else:  # de novo samples, or the test set itself as the reference row
        train_split, training = training_split(name, structures, data_dir, progress)
        scored = crystals[:n_unique]
        t_hull = time.time()
        hull = crystal_stability.chgnet_hull(name, train_split, training, scored, data_dir, relaxed_hull, relax_steps,
                                             workers, progress, structure_timeout) if stability else None
        t_hull = time.time() - t_hull
        unique_novel = distribution_metrics(name, crystals, structures, truths, result, data_dir, training, train_split,
                                            n_unique=n_unique, coverage=coverage, workers=workers, progress=progress,
                                            seconds=structure_timeout)
        if stability:
            result.update(stability_metrics(name, hull, scored, unique_novel, train_split, result,
                                            relaxed_out=None if samples is None else out_json.parent / "relaxed.extxyz",
                                            structures=structures,
                                            relaxed_hull=relaxed_hull, relax_steps=relax_steps,
                                            stable_threshold=stable_threshold, workers=workers, progress=progress,
                                            seconds=structure_timeout), hull_seconds=t_hull)
    result["eval_seconds"] = time.time() - t0
    write_metrics(out_json, result)
    if fig_dir is not None:
        try:
            draw_crystals(fig_dir / "crystals.png", crystals)
            log.info(f"wrote {fig_dir / 'crystals.png'}")
        except Exception as e:  # a picture is not worth the metrics: report and go on
            log.warning(f"skipped crystals.png ({type(e).__name__}: {e})")
    log.info(f"wrote {out_json}; {time.time() - started:.1f} s in all")
    return result


def draw_crystals(path: Path, crystals: list, n: int = 16, per_row: int = 4) -> None:
    """The first n crystals (arrays: numbers, fractional coordinates, lengths, angles), each cell drawn in a slightly
    turned view with its atoms coloured by element (ASE's plot_atoms), titled with its formula and whether it is
    valid (CDVAE's structural and compositional checks)."""
    from ase import Atoms
    from ase.visualize.plot import plot_atoms
    from matplotlib.figure import Figure

    shown = crystals[:n]
    rows = max(1, -(-len(shown) // per_row))
    fig = Figure(figsize=(3 * per_row, 3.2 * rows))
    axes = fig.subplots(rows, per_row, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, c in zip(axes.flat, shown):
        numbers, frac, lengths, angles = c
        if not crystal_metrics.well_formed(c):
            ax.set_title("not well formed", fontsize=9)
            continue
        atoms = Atoms(numbers=numbers, scaled_positions=frac, cell=[*lengths, *angles], pbc=True)
        plot_atoms(atoms, ax, rotation="10x,-20y,0z", radii=0.5, show_unit_cell=2)
        ax.set_title(f"{atoms.get_chemical_formula()}{'' if crystal_metrics.is_valid(c) else ' (invalid)'}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def not_computed(result: dict, what: str, reasons: dict[str, int], of: int, consequence: str,
                 seconds: float | None) -> None:
    """Record in result["not_computed"][what] the {reason: count} of the crystals (of `of`) whose `what` was not
    computed, and warn of those stopped, saying how they were scored (consequence)."""
    if not reasons:
        return
    result["not_computed"][what] = reasons
    stopped = {why: n for why, n in reasons.items() if why != crystal_metrics.NOT_WELL_FORMED}  # those were named above
    if stopped:
        log.warning(f"warning: {what}: {sum(stopped.values())} of {of} not computed ({describe(stopped, seconds)}); "
                    f"{consequence}")


def structure_prediction(name: str, test: CrystalSet, samples: Path, structures: list, crystals: list,
                         workers: int | None = None, progress: bool = True, seconds: float | None = None) -> dict:
    """Match rate and RMSE (crystal_metrics.csp_metrics) of samples drawn for the compositions of the test split:
    each structure names its true crystal by truth_index and truth_id, and every composition up to the last one
    sampled counts, so that those sample.py skipped (unknown elements) count as not matched. DataError when a
    structure names a crystal that is not that row of the test split (samples drawn for another split)."""
    t0 = time.time()
    groups: dict[int, list] = {}
    for k, (atoms, crystal) in enumerate(zip(structures, crystals)):
        if "truth_id" not in atoms.info or "truth_index" not in atoms.info:
            raise DataError(f"{samples}: structure {k + 1} names no true crystal (truth_id and truth_index), as other "
                            f"structures of this structure-prediction file do")
        try:
            i = int(atoms.info["truth_index"])
        except (TypeError, ValueError):  # not a row number: the message below names it
            i = -1
        if not 0 <= i < len(test) or str(atoms.info.get("truth_id")) != str(test.ids[i]):
            raise DataError(f"{samples}: structure {k + 1} names truth {atoms.info['truth_id']} at row "
                            f"{atoms.info['truth_index']}, which is "
                            f"not a {name} test crystal: these samples were drawn for another split (sample.py "
                            f"--compositions test)")
        groups.setdefault(i, []).append(crystal)
    n = max(groups) + 1
    k = max(len(g) for g in groups.values())
    result = crystal_metrics.csp_metrics([groups.get(i, []) for i in range(n)], test.arrays()[:n], workers,
                                         progress=progress, seconds=seconds)
    result["matcher_seconds"] = time.time() - t0
    if stopped := result.pop("not_matched"):
        log.warning(f"warning: StructureMatcher: {sum(stopped.values())} of the valid samples not compared with their "
                    f"true crystal ({describe(stopped, seconds)}); they count as not matched")
        result["not_computed"] = {"StructureMatcher": stopped}
    log.info(f"structure prediction on the first {n} of {len(test)} {name} test compositions, {k} sample(s) each: "
             + ", ".join(f"match rate@{j} {100 * result[f'match_rate@{j}']:.2f} %, RMSE@{j} "
                         f"{result[f'rmse@{j}'] if result[f'rmse@{j}'] is None else round(result[f'rmse@{j}'], 4)}"
                         for j in sorted({1, k}))
             + f" (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10 on {workers or os.cpu_count()} processes: "
               f"{result['matcher_seconds']:.1f} s)")
    return result


def training_split(name: str, structures: list | None, data_dir: Path, progress: bool = True) -> tuple[str, list]:
    """The split that novelty and the hull are taken against, and its crystals: samples name their model's training
    split (train_split, as sample.py writes it; "train" when none does), the test set itself is judged against the
    training split; either falls back to the validation split when the train file is not on this machine."""
    train_split = next((a.info["train_split"] for a in structures or [] if "train_split" in a.info), "train")
    try:
        training = load_crystals(name, train_split, data_dir, progress=progress)
    except DataError as e:
        if train_split != "train":
            raise
        log.warning(f"warning: novelty (and the hull) are taken against the {name} val split: the train split is not at hand ({e})")
        train_split, training = "val", load_crystals(name, "val", data_dir, progress=progress)
    return train_split, training.arrays()


def distribution_metrics(name: str, crystals: list, structures: list | None, truths: list, result: dict, data_dir: Path,
                         training: list, train_split: str, n_unique: int = 1000, coverage: bool = True,
                         workers: int | None = None, progress: bool = True, seconds: float | None = None) -> dict:
    """De novo metrics into result: Wasserstein distances and coverage against the reference split, uniqueness and
    novelty of the first n_unique crystals against the `training` crystals (of the split `train_split`). Samples
    (structures, as read) are compared with the test set `truths`; the test set itself (structures None) with the
    validation split. A crystal's fingerprint, primitive cell and matcher pairs each stop after `seconds`. Returns
    what S.U.N. needs: the uniqueness_novelty of the scored crystals."""
    t0 = time.time()
    if structures is None:
        reference_split, reference = "val", load_crystals(name, "val", data_dir, progress=False).arrays()
    else:
        reference_split, reference = "test", truths
    result.update(crystal_metrics.wasserstein_distances(crystals, reference), distribution_reference=f"{name} {reference_split}")
    if coverage:
        struct_cutoff, comp_cutoff = CRYSTAL_SETS[name].coverage_cutoffs
        sample_fps = crystal_metrics.fingerprints(crystals, workers, progress, desc="sample fingerprints", seconds=seconds)
        not_computed(result, "fingerprints", sample_fps.not_fingerprinted, len(crystals), "they count as uncovered", seconds)
        reference_fps = crystal_metrics.reference_fingerprints(name, reference_split, reference, data_dir, workers,
                                                               progress, seconds)
        not_computed(result, f"{name} {reference_split} fingerprints", reference_fps.not_fingerprinted, len(reference),
                     "they are left out of coverage, as crystals CrystalNN fails on are", seconds)
        result.update(crystal_metrics.coverage(sample_fps, reference_fps, struct_cutoff, comp_cutoff),
                      coverage_cutoffs={"structure": struct_cutoff, "composition": comp_cutoff})
    scored = crystals[:n_unique]
    un = crystal_metrics.uniqueness_novelty(scored, training, workers, progress, seconds)
    not_computed(result, "primitive cells", un["not_compared"], len(scored), "they match nothing (unique and novel)", seconds)
    if un["pairs_over_time"]:
        log.warning(f"warning: StructureMatcher: {un['pairs_over_time']} pairs of crystals not compared ("
                    f"{describe({OVER_TIME: un['pairs_over_time']}, seconds)}); they count as not matching")
        result["not_computed"]["StructureMatcher pairs"] = {OVER_TIME: un["pairs_over_time"]}
    result.update(uniqueness=un["uniqueness"], novelty=un["novelty"], unique_and_novel=un["unique_and_novel"],
                  uniqueness_novelty_of=len(scored), novelty_against=f"{name} {train_split}", distribution_seconds=time.time() - t0)
    log.info(f"Wasserstein distances to the {name} {reference_split} split: density {result['wdist_density']}, number of "
             f"elements {result['wdist_num_elements']}" + ("" if not coverage else
             f"; coverage recall {100 * result['cov_recall']:.2f} %, precision {100 * result['cov_precision']:.2f} %"))
    log.info(f"uniqueness {100 * un['uniqueness']:.2f} %, novelty {100 * un['novelty']:.2f} % (against {name} {train_split}), "
             f"unique and novel {100 * un['unique_and_novel']:.2f} % of the first {len(scored)} crystals; "
             f"{time.time() - t0:.1f} s")
    return un


def stability_metrics(name: str, hull, scored: list, unique_novel: dict, train_split: str, result: dict,
                      relaxed_out: Path | None, structures: list | None = None, relaxed_hull: bool = False, relax_steps: int = 500,
                      stable_threshold: float = 0.1, workers: int | None = None, progress: bool = True,
                      seconds: float | None = None) -> dict:
    """Relax the scored samples with CHGNet (each for at most `seconds`), take their energy above `hull`, the CHGNet
    hull of the training split (crystal_stability.chgnet_hull), and the S.U.N. rate (with their
    uniqueness_novelty); the relaxed samples go to relaxed_out, and those not relaxed as they were read (structures,
    the samples' Atoms: a cell that is not well formed need not even make a cell matrix). relaxed_out None scores
    the test crystals of the reference row as the hull's crystals are: at their DFT geometry on a single-point
    hull, relaxed on a relaxed one, and writes none. What was not relaxed goes to result["not_computed"]."""
    import ase.io

    t0 = time.time()
    if hull.not_relaxed:  # chgnet_hull warned of them
        result["not_computed"][f"{name} {train_split} relaxations for the hull"] = hull.not_relaxed
    relaxing = relaxed_out is not None or relaxed_hull
    hull_kind = "relaxed" if relaxed_hull else "single points at their DFT geometries"
    if not relaxing:
        energies, relaxed = crystal_stability.static_energies(scored, workers=workers, progress=progress), scored
        outcomes, failed = [None] * len(scored), 0
    else:
        outcomes = crystal_stability.relax(scored, relax_steps, workers=workers, progress=progress, seconds=seconds)
        not_computed(result, "relaxations", count_stopped(outcomes), len(scored), "they count as not stable", seconds)
        failed = sum(o is None for o in outcomes)  # CHGNet failed on them
        outcomes = [None if isinstance(o, Stopped) else o for o in outcomes]
        relaxed = [o[0] if o else c for o, c in zip(outcomes, scored)]
        energies = np.array([o[1] if o else np.nan for o in outcomes])
    e_hull = np.array([hull.above(c, e) if np.isfinite(e) else np.nan
                       for c, e in zip(relaxed, energies)])
    stable = np.nan_to_num(e_hull, nan=np.inf) <= stable_threshold
    sun = stable & np.array(unique_novel["unique"]) & np.array(unique_novel["novel"])
    out = dict(stability_of=len(scored), stable_threshold_ev_per_atom=stable_threshold,
               stable_rate=float(stable.mean()), on_hull_rate=float((np.nan_to_num(e_hull, nan=np.inf) <= 0).mean()),
               sun_rate=float(sun.mean()), e_above_hull_median=float(np.nanmedian(e_hull)) if np.isfinite(e_hull).any() else None,
               relax_failed=failed if relaxing else 0,
               relax_converged=float(np.mean([bool(o and o[3]) for o in outcomes])) if relaxing else None,
               hull=f"CHGNet energies of {name} {train_split} ({hull_kind}) and relaxed elemental prototypes",
               stability_seconds=time.time() - t0)
    log.info(f"stability (CHGNet, hull of {name} {train_split}, {hull_kind}): {100 * stable.mean():.2f} % within {stable_threshold} eV/atom "
             f"of the hull, {100 * out['on_hull_rate']:.2f} % on or below it, median {out['e_above_hull_median']} eV/atom; "
             f"S.U.N. {100 * sun.mean():.2f} % of {len(scored)}; {time.time() - t0:.1f} s")
    if relaxed_out is not None:
        frames = []
        for k, (c, e, eh) in enumerate(zip(relaxed, energies, e_hull)):
            atoms = crystal_atoms(*c) if outcomes[k] else structures[k].copy()
            atoms.info.update(sample_index=k, energy_per_atom=float(e), e_above_hull=float(eh), stable=bool(stable[k]),
                              sun=bool(sun[k]), relax_steps=int(outcomes[k][2]) if outcomes[k] else -1)
            frames.append(atoms)
        atomic_write(relaxed_out, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))
        log.info(f"wrote the relaxed samples to {relaxed_out}")
    return out
