"""Evaluate generated molecules against QM9 (EDM protocol plus distribution metrics) or generated crystals against
a CDVAE set (CDVAE protocol), or the real test set; or a student force field against its teacher.

    python evaluate.py out/run/samples.extxyz --data qm9     # metrics of generated molecules
    python evaluate.py --reference qm9                         # the same metrics on the real test set
    python evaluate.py out/csp/samples.extxyz --data perov5    # crystals: structure prediction or de novo
    python evaluate.py --reference perov5                      # the real perov-5 test crystals
    python evaluate.py --task ff --ckpt out/ff/ckpt.pt labels.h5 [more.h5 ...]   # student vs teacher

Writes metrics JSON, figures (property histograms, a grid of sampled molecules, training curves when a
log.jsonl sits next to the samples; for a student: parity plots and MD energy traces) and evaluate.log; prints
the metric table and the throughput. Metric definitions: models/molecule_metrics.py, models/forcefield_eval.py and
README.md, "Design", "Metrics".
"""
import argparse
import io
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from models import CRYSTAL_DATA
from models.cli import checked_device, fraction, nonnegative_int, output_file, positive_float, positive_int, writable_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="*", type=Path, help="--task gen: the extended XYZ file of generated molecules or crystals (sample.py's "
                    "samples.extxyz); --task ff: labels files (.h5) of the student's teacher, scored on the structures it did not train on")
parser.add_argument("--task", choices=["gen", "ff"], default="gen", help="gen: generated molecules or crystals; ff: a student force field")
parser.add_argument("--data", default="qm9", choices=["qm9", *CRYSTAL_DATA], help="data set the samples imitate")
parser.add_argument("--reference", choices=["qm9", *CRYSTAL_DATA], help="evaluate the real test set instead of samples "
                    "(the 'Data' row; its distribution metrics are taken against the validation split)")
parser.add_argument("--n-test", type=positive_int, default=None, help="--reference: score a fixed random subset of N test "
                    "structures (seed 0), so that the Data row has the model rows' sample count (default: all)")
parser.add_argument("--data-dir", type=Path, default=None, help="data and cache directory (default $MOLGEN_DATA or "
                    "./data); reference statistics and training SMILES are cached there")
parser.add_argument("--workers", type=positive_int, default=None, help="crystals: processes for StructureMatcher and fingerprints (default: every core)")
parser.add_argument("--n-unique", type=positive_int, default=1000, help="crystals: the first N samples scored for uniqueness and novelty (StructureMatcher against each other and the training split)")
parser.add_argument("--stability", action="store_true", help="crystals: relax the first --n-unique samples with CHGNet and score energy above a CHGNet hull and S.U.N. (minutes to hours on a CPU; the hull is cached in --data-dir)")
parser.add_argument("--relax-steps", type=positive_int, default=500, help="crystals, --stability: FIRE steps at most per relaxation (forces below 0.1 eV/A end it)")
parser.add_argument("--hull", choices=("single-point", "relaxed"), default="single-point", help="crystals, --stability: the training crystals' CHGNet energies on the hull: single points at their DFT geometries (sound for DFT ground states, as MP-20's are), or relaxed like the samples (perov-5's cubic cells lie far above their CHGNet minima). relaxed relaxes only the training crystals inside the scored crystals' chemical systems, and --reference then relaxes the test crystals too; each relaxation is cached in --data-dir as it finishes, so a stopped run resumes")
parser.add_argument("--stable-threshold", type=float, default=0.1, help="crystals, --stability: energy above the hull (eV/atom) at or below which a crystal counts as stable")
parser.add_argument("--no-coverage", action="store_true", help="crystals: skip coverage (CrystalNN fingerprints take minutes per thousand crystals)")
parser.add_argument("--json", type=Path, default=None, help="metrics output (default: SAMPLES' directory/"
                    "metrics.json, or out/reference-<data>/metrics.json); evaluate.log goes next to it")
parser.add_argument("--figures", type=Path, default=None,
                    help="directory for the PNG figures (default: next to --json)")
parser.add_argument("--log", type=Path, default=None, help="training log.jsonl to plot (default: log.jsonl next to "
                    "SAMPLES; no curves figure without one)")
parser.add_argument("--no-fcd", action="store_true", help="skip the Frechet ChemNet Distance")
parser.add_argument("--n-ref", type=nonnegative_int, default=0,
                    help="reference molecules (a fixed random subset) for FCD, coverage and Wasserstein; 0 = all")
parser.add_argument("--coverage-threshold", type=fraction, default=0.4,
                    help="Tanimoto similarity at which a molecule counts as covered (coverage recall / precision)")
parser.add_argument("--no-progress", action="store_true", help="no progress bars")
ff = parser.add_argument_group("--task ff (a student force field against its teacher)")
ff.add_argument("--ckpt", type=Path, default=None, help="the student: a train.py --task ff checkpoint")
ff.add_argument("--labels", nargs="+", type=Path, default=[], help="labels files of the student's teacher (the same as giving them as INPUTS)")
ff.add_argument("--teacher", default=None, help="teacher to time the student against (default: the one whose labels it learned)")
ff.add_argument("--device", default="cpu", help="device of the student and of a torch teacher (cpu / cuda), for accuracy and speed")
ff.add_argument("--speed-structures", type=positive_int, default=24, help="structures per size group in the speed benchmark")
ff.add_argument("--md-structures", type=nonnegative_int, default=3, help="held-out structures of each kind (molecules, crystals) run by NVE MD with the student")
ff.add_argument("--md-steps", type=positive_int, default=2000, help="velocity-Verlet steps per MD run")
ff.add_argument("--md-timestep", type=positive_float, default=0.5, help="MD time step (fs)")
ff.add_argument("--md-temperature", type=positive_float, default=300.0, help="initial Maxwell-Boltzmann temperature of MD (K)")
ff.add_argument("--no-teacher", action="store_true", help="skip the teacher's speed (no speed-up); accuracy needs only the labels")

def fail(message: str):
    sys.exit(f"evaluate.py: error: {message}")


def nan_to_none(v):
    """JSON has no NaN: undefined metrics (and non-finite values) are written as null."""
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [nan_to_none(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


# ----------------------------------------------------------------------------------------------
# --task ff: a student force field against its teacher (the molecule evaluation follows the flags below)


def evaluate_student(args, out_json: Path, fig_dir: Path) -> None:
    """Accuracy on held-out labels, speed against the teacher, NVE MD; writes out_json, parity.png, md.png."""
    import matplotlib.pyplot as plt
    import numpy as np

    from models import forcefield_eval
    from models.checkpoint import CheckpointError, build_student, load_checkpoint
    from models.fileio import atomic_write
    from models.forcefield import student_calculator
    from models.labelled_data import EV_PER_A3_IN_GPA, LabelledStructures, is_validation
    from models.labels import LabelsError
    from models.teachers import TeacherError, get_teacher

    plt.switch_backend("Agg")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(out_json.parent / "evaluate.log", mode="w")])
    log = logging.getLogger("evaluate")
    log.info("$ python " + " ".join(sys.argv))
    try:
        ckpt = load_checkpoint(args.ckpt, task="ff")
        model, _ = build_student(ckpt)
        data = LabelledStructures.load(args.inputs)
    except (CheckpointError, LabelsError) as e:
        fail(str(e))
    model = model.to(args.device).eval()
    if (data.teacher, data.teacher_version) != (ckpt["teacher"], ckpt["teacher_version"]):
        fail(f"{', '.join(map(str, args.inputs))} hold labels of {data.teacher} ({data.teacher_version}); the student "
             f"{args.ckpt} learned {ckpt['teacher']} ({ckpt['teacher_version']}): score a student against its own teacher")
    # Held out: a structure of one of the student's training files is scored only if it fell on the validation
    # side of the training split (by the hash of its key); structures of other files were never seen.
    trained_on = {Path(p).resolve() for p in ckpt["data"]}
    in_training_file = np.array([Path(data.files[i]).resolve() in trained_on for i in data.c["file"]], dtype=bool)
    train_side = ~is_validation(data.c["key"], ckpt["args"]["val_fraction"])
    held = data.subset(np.flatnonzero(~(in_training_file & train_side)))
    if not len(held):
        fail(f"every structure of {', '.join(map(str, args.inputs))} was in the student's training split: give held-out labels")
    log.info(f"student {args.ckpt} (step {ckpt['step']}, {sum(p.numel() for p in model.parameters()):,} parameters) of "
             f"{data.teacher} ({data.teacher_version}); {len(held)} held-out structures of {len(data)} in "
             f"{', '.join(map(str, args.inputs))}; device {args.device}")

    t0 = time.time()
    pred = forcefield_eval.predict(model, held, device=args.device)
    result = {"checkpoint": str(args.ckpt), "step": ckpt["step"], "teacher": data.teacher,
              "teacher_version": data.teacher_version, "labels": [str(p) for p in args.inputs], "held_out": len(held),
              "accuracy": forcefield_eval.accuracy(pred, held), "accuracy_seconds": time.time() - t0}
    for group, row in result["accuracy"].items():
        log.info(f"{group:<10} {row['structures']:>7} structures  energy MAE {row.get('energy_mae_mev_per_atom', float('nan')):8.2f} "
                 f"meV/atom  force MAE {row.get('force_mae_mev_per_a', float('nan')):8.1f} meV/A" +
                 (f"  stress MAE {row['stress_mae_gpa']:.3f} GPa" if "stress_mae_gpa" in row else ""))

    kinds = {"molecules": np.flatnonzero(~held.periodic), "crystals": np.flatnonzero(held.periodic)}  # held-out indices
    # Speed: each kind in three size groups (smallest to largest of --speed-structures picked evenly), and crystals
    # once more as 2 x 2 x 2 supercells, so the scaling with size shows.
    teacher = None
    if not args.no_teacher:
        try:
            teacher = get_teacher(args.teacher or ckpt["teacher"], args.device)
        except TeacherError as e:
            log.warning(f"warning: no teacher speed ({e}); pass --no-teacher to skip it")
    groups = {}
    for kind, members in kinds.items():
        if not len(members):
            continue
        picked = members[np.linspace(0, len(members) - 1, min(len(members), 3 * args.speed_structures)).astype(int)]
        picked = picked[np.argsort(held.c["n_atoms"][picked], kind="stable")]
        for part in np.array_split(picked, 3):
            if len(part):
                sizes = held.c["n_atoms"][part]
                groups[f"{kind} {sizes.min()}-{sizes.max()} atoms"] = [held.to_atoms(s) for s in part]
        if kind == "crystals":
            groups["crystals x 2x2x2"] = [held.to_atoms(s).repeat(2) for s in picked[:args.speed_structures]]
    result["speed"] = forcefield_eval.speed(model, teacher, groups, device=args.device)
    result["speed_device"] = args.device
    for row in result["speed"]:
        log.info(f"speed {row['group']:<26} student {row['student_single_atoms_per_s']:>9,.0f} atoms/s one at a time, "
                 f"{row['student_batched_atoms_per_s']:>10,.0f} batched" +
                 (f"; teacher {row['teacher_atoms_per_s']:>8,.0f}: speed-up x{row['speedup_single']:.1f} / x{row['speedup_batched']:.1f}"
                  if "teacher_atoms_per_s" in row else ""))

    calc = student_calculator(model, args.device)
    result["md"] = []
    for kind, members in kinds.items():
        for k, s in enumerate(members[np.linspace(0, len(members) - 1, min(len(members), args.md_structures)).astype(int)]
                              if len(members) and args.md_structures else []):
            atoms = held.to_atoms(s)
            while atoms.pbc.any() and len(atoms) < 16:  # a crystal's small cell as a supercell, so atoms can move apart
                atoms = atoms.repeat(2)
            run = forcefield_eval.nve(atoms, calc, args.md_steps, args.md_timestep, args.md_temperature, seed=k)
            run["key"] = str(held.c["key"][s])
            result["md"].append(run)
            log.info(f"NVE {run['formula']:<14} {run['atoms']:>4} atoms {run['ps']:.2f} ps: drift {run['drift_mev_per_atom_per_ps']:+.3f} "
                     f"meV/atom/ps, fluctuation {run['energy_std_mev_per_atom']:.3f} meV/atom, <T> {run['mean_temperature_k']:.0f} K, "
                     f"{'physical' if run['physical'] else 'NOT physical: ' + run['problem']} ({run['seconds']:.1f} s)")

    def write(tmp):
        Path(tmp).write_text(json.dumps(nan_to_none(result), indent=2) + "\n")
    try:
        atomic_write(out_json, write)
    except OSError as e:
        fail(str(e))
    log.info(f"wrote {out_json}")

    c = held.c
    panels = [("energy (eV/atom)", c["energy"] / c["n_atoms"], pred["energy"] / c["n_atoms"]),
              ("force components (eV/A)", c["forces"].ravel(), pred["forces"].ravel())]
    if held.periodic.any():
        panels.append(("stress components (GPa)", EV_PER_A3_IN_GPA * c["stress"][held.periodic].ravel(),
                       EV_PER_A3_IN_GPA * pred["stress"][held.periodic].ravel()))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5), squeeze=False)
    for ax, (title, truth, guess) in zip(axes[0], panels):
        ax.scatter(truth, guess, s=2, alpha=0.4)
        lo, hi = float(min(truth.min(), guess.min())), float(max(truth.max(), guess.max()))
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
        ax.set(title=title, xlabel=f"teacher ({data.teacher})", ylabel="student")
    fig.tight_layout()
    fig.savefig(fig_dir / "parity.png", dpi=100)
    plt.close(fig)
    if result["md"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        for run in result["md"]:
            e = np.array(run["trace"]["total_energy_ev"])
            ax.plot(run["trace"]["ps"], 1000 * (e - e[0]) / run["atoms"], label=f"{run['formula']} ({run['atoms']} atoms)")
        ax.set(xlabel="time (ps)", ylabel="total energy - initial (meV/atom)", title="NVE with the student")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(fig_dir / "md.png", dpi=100)
        plt.close(fig)
    log.info(f"wrote {fig_dir / 'parity.png'}{' and ' + str(fig_dir / 'md.png') if result['md'] else ''}; "
             f"{time.time() - t_start:.1f} s in all")


def reference_fingerprints(name: str, split: str, crystals: list, args, log):
    """CrystalNN and Magpie fingerprints of a data split, cached next to its crystal cache (keyed by the CSV's blob
    id): minutes of CrystalNN for a test set, once."""
    import numpy as np

    from models import crystal_metrics
    from models.crystals import split_file
    from models.fileio import git_blob_sha1, save_npz
    from models.molecules import default_data_dir

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    sha1 = git_blob_sha1(split_file(name, split, data_dir, download_missing=False))
    cache = data_dir / f"cdvae_{name}_{split}_fingerprints.npz"
    if cache.exists():
        try:
            with np.load(cache, allow_pickle=False) as z:
                if str(z["source_sha1"]) == sha1 and len(z["struct"]) == len(crystals):
                    return z["struct"], z["comp"]
        except Exception as e:  # a damaged cache is recomputed
            log.warning(f"warning: {cache} is unreadable ({type(e).__name__}: {e}); recomputing it")
    fps = crystal_metrics.fingerprints(crystals, args.workers, not args.no_progress, desc=f"{name} {split} fingerprints")
    try:
        save_npz(cache, dict(source_sha1=sha1, struct=fps[0], comp=fps[1]))
    except OSError as e:
        log.warning(f"warning: cannot cache fingerprints in {cache} ({e})")
    return fps


def distribution_metrics(args, name, crystals, structures, truths, result, log) -> None:
    """De novo metrics into result: Wasserstein distances and coverage against the reference split, uniqueness and
    novelty of the first --n-unique crystals. Samples are compared with the test set and judged novel against their
    model's training split; the test set itself (--reference) is compared with the validation split and judged
    novel against the training split (the validation split offline)."""
    from models import crystal_metrics
    from models.crystals import CRYSTAL_SETS, load_crystals
    from models.fileio import DataError

    t0 = time.time()
    try:
        if args.reference:
            reference_split, reference = "val", load_crystals(name, "val", args.data_dir, progress=False).arrays()
        else:
            reference_split, reference = "test", truths
        train_split = structures[0].info.get("train_split", "train") if structures is not None else "train"
        try:
            training = load_crystals(name, train_split, args.data_dir, progress=not args.no_progress)
        except DataError:
            if train_split != "train":
                raise
            train_split, training = "val", load_crystals(name, "val", args.data_dir, progress=not args.no_progress)
    except DataError as e:
        fail(str(e))
    result.update(crystal_metrics.wasserstein_distances(crystals, reference), distribution_reference=f"{name} {reference_split}")
    if not args.no_coverage:
        struct_cutoff, comp_cutoff = CRYSTAL_SETS[name].coverage_cutoffs
        sample_fps = crystal_metrics.fingerprints(crystals, args.workers, not args.no_progress, desc="sample fingerprints")
        reference_fps = reference_fingerprints(name, reference_split, reference, args, log)
        result.update(crystal_metrics.coverage(sample_fps, reference_fps, struct_cutoff, comp_cutoff),
                      coverage_cutoffs={"structure": struct_cutoff, "composition": comp_cutoff})
    scored = crystals[: args.n_unique]
    un = crystal_metrics.uniqueness_novelty(scored, training.arrays(), args.workers, not args.no_progress)
    result.update(uniqueness=un["uniqueness"], novelty=un["novelty"], unique_and_novel=un["unique_and_novel"],
                  uniqueness_novelty_of=len(scored), novelty_against=f"{name} {train_split}", distribution_seconds=time.time() - t0)
    log.info(f"Wasserstein distances to the {name} {reference_split} split: density {result['wdist_density']}, number of "
             f"elements {result['wdist_num_elements']}" + ("" if args.no_coverage else
             f"; coverage recall {100 * result['cov_recall']:.2f} %, precision {100 * result['cov_precision']:.2f} %"))
    log.info(f"uniqueness {100 * un['uniqueness']:.2f} %, novelty {100 * un['novelty']:.2f} % (against {name} {train_split}), "
             f"unique and novel {100 * un['unique_and_novel']:.2f} % of the first {len(scored)} crystals; "
             f"{time.time() - t0:.1f} s")
    if args.stability:
        stability_metrics(args, name, scored, un, training.arrays(), train_split, structures, result, log)


def chgnet_hull(args, name: str, split: str, training: list, scored: list, log):
    """The CHGNet convex hull of a data split plus elemental references, both cached in the data directory: the
    split's energies keyed by its CSV's blob id and the CHGNet version (--hull relaxed: also by the relaxation's
    settings), the elements by the version."""
    import numpy as np

    from models import crystal_stability
    from models.crystals import split_file
    from models.fileio import git_blob_sha1, save_npz
    from models.molecules import default_data_dir

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    version = crystal_stability.chgnet_version()
    key = f"{git_blob_sha1(split_file(name, split, data_dir, download_missing=False))} {version}"
    cache = data_dir / f"cdvae_{name}_{split}_chgnet.npz"
    energies = None
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key and len(z["energy"]) == len(training):
                energies = z["energy"]
    if energies is None:
        log.info(f"CHGNet energies of the {len(training)} crystals of {name} {split} (once; cached in {cache})")
        energies = crystal_stability.static_energies(training, workers=args.workers, progress=not args.no_progress)
        save_npz(cache, dict(key=key, energy=energies))
    if args.hull == "relaxed":
        energies = relaxed_training_energies(args, name, split, training, energies, scored, f"{key} relaxed {args.relax_steps} "
                                             f"steps fmax {crystal_stability.FMAX}", data_dir, log)
    elements = sorted({int(z) for c in scored for z in c[0]})  # a query reads only its own system's elements
    element_cache = data_dir / "chgnet_elements.npz"
    references: dict[int, tuple[float, str]] = {}
    if element_cache.exists():
        with np.load(element_cache, allow_pickle=False) as z:
            if str(z["version"]) == version:
                references = {int(a): (float(e), str(p)) for a, e, p in zip(z["z"], z["energy"], z["prototype"])}
    if missing := sorted(set(elements) - set(references)):
        log.info(f"relaxing elemental prototypes of {len(missing)} element(s) with CHGNet (once; cached in {element_cache})")
        references.update(crystal_stability.elemental_references(missing, workers=args.workers, progress=not args.no_progress))
        zs = sorted(references)
        save_npz(element_cache, dict(version=version, z=np.array(zs), energy=np.array([references[a][0] for a in zs]),
                                     prototype=np.array([references[a][1] for a in zs])))
    return crystal_stability.Hull(training, energies, references)


def relaxed_training_energies(args, name, split, training, single, scored, key, data_dir, log):
    """--hull relaxed: the hull energies (eV/atom) of the training crystals, relaxed as the samples are. A crystal's
    energy above the hull depends only on the entries made of its own elements, so only the training crystals whose
    elements all occur together in one scored crystal are relaxed (414 of perov-5's 3,787 validation crystals for
    400 samples); the others are left off the hull (NaN). Each result is the lower of the relaxed energy and the single
    point (a relaxation that fails keeps the single point), and goes to the cache as it arrives."""
    import numpy as np

    from models import crystal_stability
    from models.fileio import save_npz

    systems = {frozenset(int(z) for z in c[0]) for c in scored}
    needed = np.array([any(frozenset(int(z) for z in c[0]) <= s for s in systems) for c in training])
    cache = data_dir / f"cdvae_{name}_{split}_chgnet_relaxed.npz"
    relaxed, done = np.full(len(training), np.nan), np.zeros(len(training), bool)
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key and len(z["energy"]) == len(training):
                relaxed, done = z["energy"].copy(), z["done"].copy()
    todo = np.flatnonzero(needed & ~done)
    if len(todo):
        log.info(f"--hull relaxed: relaxing {len(todo)} of the {int(needed.sum())} {name} {split} crystals in "
                 f"{len(systems)} chemical system(s) scored ({int((needed & done).sum())} cached in {cache})")
        for i, outcome in zip(todo, crystal_stability.relax_iter([training[i] for i in todo], args.relax_steps,
                                                                 workers=args.workers, progress=not args.no_progress,
                                                                 desc=f"CHGNet relaxation of {name} {split}")):
            relaxed[i], done[i] = (outcome[1] if outcome else np.nan), True
            save_npz(cache, dict(key=key, energy=relaxed, done=done))  # milliseconds, against seconds per relaxation
    return np.where(needed, np.fmin(single, relaxed), np.nan)


def stability_metrics(args, name, scored, un, training, train_split, structures, result, log) -> None:
    """Relax the scored samples with CHGNet (the test crystals of --reference are scored as the hull's crystals are: at
    their DFT geometry on a single-point hull, relaxed on a relaxed one), take their energy above the CHGNet hull of
    the training split, and the S.U.N. rate; relaxed samples go to relaxed.extxyz next to the metrics."""
    import ase.io
    import numpy as np

    from models import crystal_stability
    from models.crystals import crystal_atoms
    from models.fileio import atomic_write

    t0 = time.time()
    hull = chgnet_hull(args, name, train_split, training, scored, log)
    relaxing = not (args.reference and args.hull == "single-point")
    hull_kind = "relaxed" if args.hull == "relaxed" else "single points at their DFT geometries"
    if not relaxing:
        energies, relaxed = crystal_stability.static_energies(scored, workers=args.workers, progress=not args.no_progress), scored
        outcomes = [None] * len(scored)
    else:
        outcomes = crystal_stability.relax(scored, args.relax_steps, workers=args.workers, progress=not args.no_progress)
        relaxed = [o[0] if o else c for o, c in zip(outcomes, scored)]
        energies = np.array([o[1] if o else np.nan for o in outcomes])
    e_hull = np.array([hull.above(c, e) if np.isfinite(e) else np.nan
                       for c, e in zip(relaxed, energies)])
    stable = np.nan_to_num(e_hull, nan=np.inf) <= args.stable_threshold
    sun = stable & np.array(un["unique"]) & np.array(un["novel"])
    result.update(stability_of=len(scored), stable_threshold_ev_per_atom=args.stable_threshold,
                  stable_rate=float(stable.mean()), on_hull_rate=float((np.nan_to_num(e_hull, nan=np.inf) <= 0).mean()),
                  sun_rate=float(sun.mean()), e_above_hull_median=float(np.nanmedian(e_hull)) if np.isfinite(e_hull).any() else None,
                  relax_failed=int(sum(o is None for o in outcomes)) if relaxing else 0,
                  relax_converged=float(np.mean([bool(o and o[3]) for o in outcomes])) if relaxing else None,
                  hull=f"CHGNet energies of {name} {train_split} ({hull_kind}) and relaxed elemental prototypes",
                  stability_seconds=time.time() - t0)
    log.info(f"stability (CHGNet, hull of {name} {train_split}, {hull_kind}): {100 * stable.mean():.2f} % within {args.stable_threshold} eV/atom "
             f"of the hull, {100 * result['on_hull_rate']:.2f} % on or below it, median {result['e_above_hull_median']} eV/atom; "
             f"S.U.N. {100 * sun.mean():.2f} % of {len(scored)}; {time.time() - t0:.1f} s")
    if structures is not None:
        frames = []
        for k, (c, e, eh) in enumerate(zip(relaxed, energies, e_hull)):
            atoms = crystal_atoms(*c)
            atoms.info.update(sample_index=k, energy_per_atom=float(e), e_above_hull=float(eh), stable=bool(stable[k]),
                              sun=bool(sun[k]), relax_steps=int(outcomes[k][2]) if outcomes[k] else -1)
            frames.append(atoms)
        path = Path(args.json or args.samples.parent / "metrics.json").parent / "relaxed.extxyz"
        atomic_write(path, lambda tmp: ase.io.write(tmp, frames, format="extxyz"))
        log.info(f"wrote the relaxed samples to {path}")


def test_subset(n: int, n_test: int | None) -> list[int]:
    """--n-test: the same random test structures every time (seed 0), in their file order; all without it."""
    import numpy as np

    if n_test is None or n_test >= n:
        return list(range(n))
    return sorted(np.random.default_rng(0).choice(n, n_test, replace=False).tolist())


def evaluate_crystals(args, out_json: Path) -> None:
    """Crystals, the CDVAE protocol (models/crystal_metrics.py): samples that carry truth_id (sample.py on a
    structure-prediction model) get match rate and RMSE against their split's true crystals, every composition
    of the split up to the last one sampled in the denominator. De novo samples get validity, the Wasserstein
    distances of density and element count and coverage against the test set, and uniqueness and novelty (against
    the model's training split); --reference scores the test set the same way against the validation split."""
    import ase.io
    import numpy as np

    from models import crystal_metrics
    from models.crystals import load_crystals
    from models.fileio import DataError, atomic_write

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(out_json.parent / "evaluate.log", mode="w")])
    log = logging.getLogger("evaluate")
    log.info("$ python " + " ".join(sys.argv))
    name = args.reference or args.data
    try:
        test = load_crystals(name, "test", args.data_dir, progress=not args.no_progress)
    except DataError as e:
        fail(str(e))
    truths = test.arrays()
    if args.reference:
        crystals, structures = [truths[i] for i in test_subset(len(truths), args.n_test)], None
        label = f"{name} test set" + (f" ({len(crystals)} of {len(truths)}, seed 0)" if args.n_test else "")
    else:
        try:
            structures = ase.io.read(args.samples, ":", format="extxyz")
        except Exception as e:  # ASE raises many kinds for malformed files
            fail(f"{args.samples}: not readable as extended XYZ ({type(e).__name__}: {e})")
        if not structures:
            fail(f"{args.samples}: no structures (empty file)")
        for k, atoms in enumerate(structures):
            if not atoms.pbc.all():
                fail(f"{args.samples}: structure {k + 1} is not a crystal (no periodic cell); molecules are scored with --data qm9")
        crystals = [(a.numbers, a.cell.scaled_positions(a.positions) % 1.0, a.cell.cellpar()[:3], a.cell.cellpar()[3:])
                    for a in structures]
        label = str(args.samples)
    t0 = time.time()
    result = {"samples": label, "data": name, "crystals": len(crystals),
              "structural_validity": float(np.mean([crystal_metrics.structure_valid(*c) for c in crystals])),
              "compositional_validity": float(np.mean([crystal_metrics.composition_valid(c[0]) for c in crystals]))}
    result["validity"] = float(np.mean([crystal_metrics.is_valid(c) for c in crystals]))
    log.info(f"{label}: {len(crystals)} crystals; structural validity {100 * result['structural_validity']:.2f} %, "
             f"compositional validity {100 * result['compositional_validity']:.2f} %, both {100 * result['validity']:.2f} %")
    csp = structures is not None and "truth_id" in structures[0].info
    if not csp:  # de novo samples, or the test set itself as the reference row
        distribution_metrics(args, name, crystals, structures, truths, result, log)
    if csp:
        groups: dict[int, list] = {}
        for k, (atoms, crystal) in enumerate(zip(structures, crystals)):
            i = int(atoms.info.get("truth_index", -1))
            if not 0 <= i < len(test) or str(atoms.info.get("truth_id")) != str(test.ids[i]):
                fail(f"{args.samples}: structure {k + 1} names truth {atoms.info.get('truth_id')} at row {i}, which is not a "
                     f"{name} test crystal: these samples were drawn for another split (sample.py --compositions test)")
            groups.setdefault(i, []).append(crystal)
        n = max(groups) + 1  # compositions skipped by sample.py (unknown elements) count as not matched
        k = max(len(g) for g in groups.values())
        result.update(crystal_metrics.csp_metrics([groups.get(i, []) for i in range(n)], truths[:n], args.workers,
                                                  progress=not args.no_progress))
        result["matcher_seconds"] = time.time() - t0
        log.info(f"structure prediction on the first {n} of {len(test)} {name} test compositions, {k} sample(s) each: "
                 + ", ".join(f"match rate@{j} {100 * result[f'match_rate@{j}']:.2f} %, RMSE@{j} "
                             f"{result[f'rmse@{j}'] if result[f'rmse@{j}'] is None else round(result[f'rmse@{j}'], 4)}"
                             for j in sorted({1, k}))
                 + f" (StructureMatcher stol 0.5, ltol 0.3, angle_tol 10 on {args.workers or os.cpu_count()} processes: "
                   f"{result['matcher_seconds']:.1f} s)")
    result["eval_seconds"] = time.time() - t0
    try:
        atomic_write(out_json, lambda tmp: Path(tmp).write_text(json.dumps(nan_to_none(result), indent=2) + "\n"))
    except OSError as e:
        fail(str(e))
    log.info(f"wrote {out_json}; {time.time() - t_start:.1f} s in all")


args = parser.parse_args()
t_start = time.time()
if args.task == "ff":
    args.inputs += args.labels
    if args.reference or args.ckpt is None or not args.inputs:
        parser.error("--task ff takes --ckpt STUDENT and labels files: evaluate.py --task ff --ckpt out/ff/ckpt.pt labels.h5")
    for path in [args.ckpt, *args.inputs]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    checked_device(parser, args.device)
    if args.teacher is not None:
        from models.teachers import teacher_name
        try:
            teacher_name(args.teacher)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--teacher: {e}")
    out_json = output_file(parser, args.json or args.ckpt.parent / "ff_metrics.json", "--json")
    fig_dir = writable_dir(parser, args.figures or out_json.parent, "--figures")
    evaluate_student(args, out_json, fig_dir)
    sys.exit(0)
if args.ckpt or args.labels or args.teacher:
    parser.error("--ckpt, --labels and --teacher are options of --task ff")
if len(args.inputs) > 1:
    parser.error(f"one SAMPLES file at a time ({len(args.inputs)} given)")
args.samples = args.inputs[0] if args.inputs else None
if (args.samples is None) == (args.reference is None):
    parser.error("give either SAMPLES or --reference qm9|perov5|carbon24|mp20")
if args.samples is not None and not args.samples.is_file():
    parser.error(f"SAMPLES {args.samples}: no such file")
if args.n_test and not args.reference:
    parser.error("--n-test is an option of --reference (a model row's count is the number of samples in SAMPLES)")
if (args.reference or args.data) in CRYSTAL_DATA:
    name = args.reference or args.data
    evaluate_crystals(args, output_file(parser, args.json or (args.samples.parent / "metrics.json" if args.samples else
                                                              Path(f"out/reference-{name}/metrics.json")), "--json"))
    sys.exit(0)

# The heavy imports once the flags are known to be good: a bad flag fails at once.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models import molecule_metrics as metrics  # noqa: E402
from models.molecules import DataError, default_data_dir, load_qm9, split_indices  # noqa: E402
from models.fileio import atomic_write  # noqa: E402

plt.switch_backend("Agg")  # figures go to files; no display needed


# ----------------------------------------------------------------------------------------------
# Inputs: the samples (or the test set itself), the training SMILES for novelty, the reference


def read_samples(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atomic numbers, positions) of every structure in an extended XYZ file; exits naming the file on error.

    Frames are split here (atom count line, comment line, atoms) and parsed one at a time, so an error
    names the structure and line where it is (ASE's own reader indexes the whole file before it parses).
    """
    import ase.io

    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read ({type(e).__name__}: {e})")
    samples, start = [], 0
    while start < len(lines):
        if not lines[start].strip():  # blank lines between or after frames
            start += 1
            continue
        try:
            n = int(lines[start])
            atoms = ase.io.read(io.StringIO("".join(lines[start:start + n + 2])), format="extxyz")
        except Exception as e:  # ASE raises many exception types for malformed input; all mean "unreadable"
            fail(f"{path}: structure {len(samples) + 1} (line {start + 1}) is not valid extended XYZ "
                 f"({type(e).__name__}: {e})")
        samples.append((atoms.numbers.copy(), atoms.positions.copy()))
        start += n + 2
    if not samples:
        fail(f"{path}: no structures (empty file)")
    return samples


samples = read_samples(args.samples) if args.samples else None
default_json = args.samples.parent / "metrics.json" if args.samples else Path("out/reference-qm9/metrics.json")
out_json = output_file(parser, args.json or default_json, "--json")
fig_dir = writable_dir(parser, args.figures or out_json.parent, "--figures")
logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
    logging.StreamHandler(sys.stdout), logging.FileHandler(out_json.parent / "evaluate.log", mode="w")])
log = logging.getLogger("evaluate")
log.info("$ python " + " ".join(sys.argv))
progress = not args.no_progress

data_dir = args.data_dir or default_data_dir()
try:
    qm9 = load_qm9(None, data_dir)
except DataError as e:
    fail(str(e))
split = split_indices(len(qm9))
train, test = qm9.subset(split["train"]), qm9.subset(split["test"])
if args.reference:
    # The Data row: EDM's metrics on the test molecules themselves. Its distribution metrics (FCD, W1,
    # coverage) are taken against the validation split, a disjoint draw of the same distribution, so they
    # show what a perfect generator scores (test against itself would give a meaningless 0).
    name = label = "QM9 test set" + (f" ({min(args.n_test, len(test))} of {len(test)}, seed 0)" if args.n_test else "")
    samples = [test[i] for i in test_subset(len(test), args.n_test)]
    ref_set, ref_name, n_ref = qm9.subset(split["valid"]), "QM9 validation split", args.n_ref or len(test)
else:
    name, label = str(args.samples), args.samples.name
    ref_set, ref_name, n_ref = test, "QM9 test set", args.n_ref or None
log.info(f"{name}: {len(samples)} molecules; distribution reference: {ref_name} ({len(ref_set)} molecules, "
         f"{n_ref or 'all'} used) from {data_dir}")
train_smiles = metrics.training_smiles(train, cache_dir=data_dir, progress=progress)
ref = metrics.reference_statistics(ref_set, n_ref=n_ref, cache_dir=data_dir, fcd=not args.no_fcd, progress=progress)

# ----------------------------------------------------------------------------------------------
# Metrics

t0 = time.time()
# A structure with NaN / Inf coordinates stays in every denominator (it is neither stable nor valid) and out of
# the geometry distributions; it is counted, so a sampler that blows up is visible, not silently scored.
n_non_finite = sum(not np.isfinite(x).all() for _, x in samples)
if n_non_finite:
    log.warning(f"warning: {n_non_finite} of {len(samples)} structures have non-finite (NaN / Inf) coordinates; they count "
                f"as unstable and invalid")
stats = metrics.molecule_statistics(samples, progress=progress, desc="samples")
result = metrics.score(stats, ref, train_smiles, fcd=not args.no_fcd, coverage_threshold=args.coverage_threshold)
t_eval = time.time() - t0
result.update(samples=name, reference=ref_name, data=args.data, eval_seconds=t_eval, non_finite=n_non_finite)


try:
    atomic_write(out_json, lambda tmp: Path(tmp).write_text(json.dumps(nan_to_none(result), indent=2) + "\n"))
except OSError as e:  # models.fileio.DiskFull names the file
    fail(str(e))
log.info(f"wrote {out_json}")

# ----------------------------------------------------------------------------------------------
# Figures


def plot_properties(path: Path):
    """Histograms of properties and geometry, samples (line) over the reference (filled)."""
    valid, ref_valid = stats["smiles"] != "", ref["smiles"] != ""
    panels = [("QED", "qed", valid, ref_valid), ("SA score", "sa", valid, ref_valid),  # valid molecules only
              ("logP", "logp", valid, ref_valid), ("atoms per molecule", "n_atoms", ..., ...),  # ...: all
              ("bond length (A)", "bond_length", ..., ...), ("bond angle (deg)", "bond_angle", ..., ...)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, key, sel, ref_sel) in zip(axes.flat, panels):
        a, b = np.asarray(stats[key][sel], float), np.asarray(ref[key][ref_sel], float)
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        if len(both):
            bins = np.arange(both.min() - 0.5, both.max() + 1.5) if key == "n_atoms" else \
                np.linspace(both.min(), both.max() + 1e-9, 60)
            ax.hist(b, bins=bins, density=True, histtype="stepfilled", alpha=0.35, label=f"{ref_name} ({len(b)})")
            ax.hist(a, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{label} ({len(a)})")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_molecules(path: Path, n: int = 24) -> bool:
    """2D depictions of the first n valid molecules; False when there are none."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    shown = stats["smiles"][stats["smiles"] != ""][:n].tolist()
    if shown:
        Draw.MolsToGridImage([Chem.MolFromSmiles(s) for s in shown], molsPerRow=6, subImgSize=(220, 180),
                             legends=shown).save(path)
    return bool(shown)


def plot_curves(log_path: Path, path: Path):
    """Loss (and validation loss) against step; molecule / atom stability in a second panel when logged."""
    records = [r for r in map(json.loads, filter(str.strip, log_path.read_text().splitlines())) if "step" in r]
    curves = [k for k in ("mol_stability", "atom_stability") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 1 + bool(curves), figsize=(6 + 5 * bool(curves), 4), squeeze=False)
    for col, keys, style in ((0, ("loss", "val_loss"), "-"), (1, curves, "o-")):
        for key in keys:
            axes[0, col].plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), style, label=key)
    axes[0, 0].set(xlabel="step", ylabel="loss", yscale="log")
    axes[0, 0].legend()
    if curves:
        axes[0, 1].set(xlabel="step", ylabel="fraction stable", ylim=(0, 1.02))
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


try:
    plot_properties(fig_dir / "properties.png")
    log.info(f"wrote {fig_dir / 'properties.png'}")
except OSError as e:  # a full disk: metrics.json is written already, and a figure is not worth a traceback
    log.warning(f"skipped properties.png ({e})")
try:
    if draw_molecules(fig_dir / "molecules.png"):
        log.info(f"wrote {fig_dir / 'molecules.png'}")
except Exception as e:  # a depiction is a nicety: no drawing failure (Pillow, odd molecule) may stop evaluation
    log.warning(f"skipped molecules.png ({type(e).__name__}: {e})")
log_path = args.log or (args.samples.parent / "log.jsonl" if args.samples else None)
if log_path is not None and log_path.is_file():
    try:
        plot_curves(log_path, fig_dir / "curves.png")
        log.info(f"wrote {fig_dir / 'curves.png'} from {log_path}")
    except (ValueError, KeyError, TypeError) as e:  # a malformed log line (JSON or fields): metrics still count
        log.warning(f"skipped curves.png: {log_path} is not a usable log.jsonl ({type(e).__name__}: {e})")

# ----------------------------------------------------------------------------------------------
# Table and throughput

columns = [("atom stab", "atom_stability", "%"), ("mol stab", "mol_stability", "%"), ("valid", "validity", "%"),
           ("unique", "uniqueness", "%"), ("novel", "novelty", "%"), ("V x U", "validity_x_uniqueness", "%"),
           ("QED", "qed", ".3f"), ("SA", "sa", ".2f"), ("logP", "logp", ".2f"), ("W1 QED", "w1_qed", ".4f"),
           ("W1 SA", "w1_sa", ".3f"), ("W1 logP", "w1_logp", ".3f"), ("W1 atoms", "w1_n_atoms", ".3f"),
           ("W1 bond", "w1_bond_length", ".4f"), ("W1 angle", "w1_bond_angle", ".2f"), ("FCD", "fcd", ".3f"),
           ("recall", "coverage_recall", "%"), ("precision", "coverage_precision", "%")]
heads = [h + " (%)" if f == "%" else h for h, _, f in columns]
cells = [f"{100 * result[k]:.1f}" if f == "%" else f"{result[k]:{f}}" for _, k, f in columns]
widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
log.info("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
log.info("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
log.info(f"evaluated {len(samples)} molecules in {t_eval:.1f} s ({len(samples) / t_eval:.0f} molecules/s); "
         f"{time.time() - t_start:.1f} s in all, with loading data and reference statistics")
