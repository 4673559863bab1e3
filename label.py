"""Label structures (generated or reference) with a teacher force field into a resumable HDF5 data set.

    python label.py INPUTS... --teacher chgnet|xtb|sevennet|orb-v2|mace-mp|emt --out labels.h5   label (resumes)
    python label.py merge SHARDS... --out labels.h5         join the shard files of one teacher into one file
    python label.py report FILES...                         data-set report and GO / NO-GO over labels files
    python label.py bench INPUTS... --teachers xtb chgnet   the pipeline's overhead against bare teacher calls
    python label.py export FILES... --out labels.extxyz     the labels as extended XYZ (MACE, NequIP)
    python label.py relax INPUTS... --teacher student:CKPT --out relaxed.extxyz   relax structures (a student: batched)
    python label.py explore INPUTS... --committee A.pt B.pt C.pt --out picked.extxyz   active learning: what to label next
    python label.py perturb INPUTS... --out perturbed.extxyz   compressed and rattled copies, to label where a student
                                                            has seen no data (closer atoms than any minimum holds)

INPUTS: extxyz/xyz, SDF, CIF, CDVAE CSV (`cif` column) or qm9pack CSV files, directories of them, or `qm9[:split]`.
Output (models/README.md, "Data contracts"): OUT (HDF5: energy, forces, stress per structure, written through a
journal OUT.journal/ so a kill at any instant loses no committed block), and next to it OUT_STEM.failed.jsonl
(structures that could not be labelled, with the reason), OUT_STEM.report.json (the data-set report and its GO /
NO-GO verdict) and label.log. Re-running the same command resumes: keys already in OUT, or already recorded as
failed for OUT (unless --retry-failed), are skipped. A kill loses at most the block in flight (at most
--commit-seconds of work). One process writes OUT at a time (OUT.lock); a second one is refused. The key of a
structure is "<input path relative to OUT's directory>:<record id>" (models/structures.py).

Several processes: `--shard I/N` labels the keys whose hash falls in shard I into OUT_STEM.shardIofN.h5 (under
torchrun, RANK / WORLD_SIZE pick the shard); then `label.py merge SHARDS... --out OUT`.
One labels file holds one teacher (and one teacher version, unless --mixed-versions); `label.py report` joins files
of several teachers (molecules with xtb, crystals with chgnet) into one data-set report.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

from models.cli import (add_markdown_help, checked_device, fraction, nonnegative_float, nonnegative_int, output_file, positive_float,
                        positive_int)
from models.fileio import Busy, DiskFull, ExclusiveLock, atomic_write
from models.label_report import dataset_report, failures_path, format_number, format_report, read_failed, write_failed
from models.labels import LabelsError, LabelWriter, read_labels
from models.structures import Failure, InputError, check_structure, iter_records, source_name, unknown_elements
from models.teachers import STUDENT_PREFIX, TEACHERS, Teacher, TeacherError, UnsupportedElements, get_teacher, teacher_name


MIN_DIST, ISOLATED_DIST = 0.5, 4.0  # A: default structure checks (models.structures.check_structure)


def add_verdict_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GO / NO-GO thresholds")
    g.add_argument("--min-success", type=fraction, default=0.95, help="fraction of structures labelled")
    g.add_argument("--min-entropy", type=nonnegative_float, default=3.07, help="Shannon entropy of the element distribution (bits)")
    g.add_argument("--min-elements", type=nonnegative_int, default=9, help="number of distinct elements")
    g.add_argument("--min-size-cv", type=nonnegative_float, default=0.5, help="coefficient of variation of atoms per structure (must exceed)")
    g.add_argument("--min-rate", type=nonnegative_float, default=100.0, help="structures per hour of labelling (summed over runs and shards)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="structure files (extxyz, xyz, sdf, cif, csv), directories of them, or qm9[:train|valid|test]")
    p.add_argument("--generate", default=None, metavar="CKPT", help="also sample --n-generate molecules or crystals from this train.py checkpoint (de novo; not a structure-prediction model) and label them")
    p.add_argument("--n-generate", type=positive_int, default=1000, help="structures to sample with --generate")
    p.add_argument("--steps", type=positive_int, default=50, help="sampler steps of --generate")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of --generate sampling")
    p.add_argument("--teacher", required=True, type=teacher_name, help=f"teacher force field: {', '.join(sorted(TEACHERS))}, or student:PATH (a train.py --task ff checkpoint)")
    p.add_argument("--out", default="labels.h5", help="labels HDF5 file; OUT_STEM.failed.jsonl, OUT_STEM.report.json and label.log go next to it")
    p.add_argument("--shard", default=None, help="I/N: label only shard I of N (by a hash of the key) into OUT_STEM.shardIofN.h5; default under torchrun: RANK/WORLD_SIZE")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip structures already in OUT (default); --no-resume deletes OUT and its failures and starts over")
    p.add_argument("--retry-failed", action="store_true", help="on resume, try again the structures recorded in OUT_STEM.failed.jsonl")
    p.add_argument("--mixed-versions", action="store_true", help="append to a file labelled by another version of the same teacher (each structure records its version)")
    p.add_argument("--block", type=positive_int, default=1024, help="at most this many structures per written block")
    p.add_argument("--commit-seconds", type=nonnegative_float, default=10.0,
                   help="write a block at least this often, so a kill loses at most this much labelling (or --block structures)")
    p.add_argument("--limit", type=nonnegative_int, default=0, help="label only the first N input structures (the same N on every run, so a re-run resumes them; 0: all)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device of torch teachers (default: cuda if available)")
    p.add_argument("--source", default=None, help="`source` recorded for every structure (default: <parent dir>/<file name>)")
    p.add_argument("--min-dist", type=nonnegative_float, default=MIN_DIST, help="fail structures with two atoms closer than this (A, periodic images included; 0: off)")
    p.add_argument("--isolated-dist", type=nonnegative_float, default=ISOLATED_DIST, help="fail structures with an atom that has no neighbour within this (A; 0: off)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (label.log and the report JSON are still written)")
    add_verdict_args(p)
    add_markdown_help(p)
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # for label.log
    if not args.inputs and not args.generate:
        p.error("give INPUTS and / or --generate CKPT")
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            p.error(f"--shard {args.shard}: expected I/N with 0 <= I < N, e.g. 0/4")
    output_file(p, args.out, "--out")
    if args.device == "cuda":
        checked_device(p, "cuda")
    if args.generate and not Path(args.generate).is_file():
        p.error(f"--generate {args.generate}: no such checkpoint file")
    for item in args.inputs:  # a misspelt path is an error now, not a recorded failure after the teacher loaded
        if not (Path(item).exists() or item.split(":")[0] == "qm9"):
            p.error(f"input {item}: no such file or directory")
    return args


def generate(args, out: Path, device: str) -> str:
    """Sample molecules or crystals once into OUT's directory (atomic write) and return that file, which is then
    labelled like any input: a resumed run finds the file and does not sample again, so keys stay the same."""
    ckpt_path = Path(args.generate)
    path = out.parent / f"generated_{ckpt_path.parent.name}_n{args.n_generate}_steps{args.steps}_seed{args.seed}.extxyz"
    if not path.exists():
        import ase.io
        import torch

        from models.checkpoint import CheckpointError, load_checkpoint
        from models.domains import domain_of
        from models.sampling import sample_structures

        try:
            ckpt = load_checkpoint(ckpt_path)
        except CheckpointError as e:
            raise LabelsError(f"--generate: {e}") from None
        if ckpt.get("csp"):
            raise LabelsError(f"--generate {ckpt_path}: a structure-prediction model needs compositions to predict; sample it "
                              f"with sample.py --compositions and label the samples.extxyz it writes")
        domain, dev = domain_of(ckpt), torch.device(device)
        method = domain.process_class(ckpt["gen"]).SAMPLERS[0]  # the process's default sampler, as in sample.py
        # sample.py's defaults: the domain's time grid, batches of similar sizes
        try:
            structures, n_bad = sample_structures(ckpt, args.n_generate, args.steps, method, 1000 if dev.type == "cuda" else 100,
                                                  args.seed, dev, by_size=True, time_power=domain.TIME_POWER)
        except CheckpointError as e:
            raise LabelsError(f"--generate {ckpt_path}: {e}") from None
        if not structures:
            raise LabelsError(f"--generate {ckpt_path}: all {n_bad} sampled {domain.kind} have non-finite coordinates")
        atomic_write(path, lambda tmp: ase.io.write(tmp, structures, format="extxyz"))
    return str(path)


class Log:
    """Lines to label.log (always) and to stderr (unless quiet), without breaking the progress bar."""

    def __init__(self, path: Path, quiet: bool = False):
        self.f, self.quiet = open(path, "a"), quiet

    def __call__(self, msg: str, quiet: bool = False):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.f.write(line + "\n")
        self.f.flush()
        if not (quiet or self.quiet):
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)


def merge_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py merge", description="Append the records of labels files of one teacher "
                                "(shards of one run, or independent jobs) to OUT, skipping keys already there; their "
                                "failure records are copied to OUT_STEM.failed.jsonl.")
    p.add_argument("shards", nargs="+", help="labels files (.h5) of one teacher")
    p.add_argument("--out", required=True, help="labels file to append to (created if missing)")
    p.add_argument("--mixed-versions", action="store_true", help="allow files labelled by different versions of the teacher (each structure keeps its version)")
    add_verdict_args(p)
    add_markdown_help(p)
    args = p.parse_args(argv)
    out = output_file(p, args.out, "--out")
    if any(Path(s).resolve() == out.resolve() for s in args.shards):
        p.error(f"--out {out} is also one of the files to merge")
    shards = [read_labels(path) for path in args.shards]  # every input is readable before OUT is touched
    teachers = {lab["attrs"]["teacher"] for lab in shards}
    if len(teachers) > 1:
        raise LabelsError(f"{', '.join(args.shards)} were labelled by different teachers ({', '.join(sorted(teachers))}); cannot merge")
    versions = sorted({v for lab in shards for v in [lab["attrs"]["teacher_version"], *lab["teacher_version"].tolist()]})
    if len(versions) > 1 and not args.mixed_versions:
        raise LabelsError(f"{', '.join(args.shards)} hold labels of different teacher versions ({', '.join(versions)}); "
                          f"cannot merge without --mixed-versions")
    first = shards[0]["attrs"]
    with LabelWriter(out, first["teacher"], first["teacher_version"], mixed_versions=args.mixed_versions) as writer:
        keys, recorded = writer.keys(), read_failed(out)
        for path, lab in zip(args.shards, shards):
            rows = []
            for s, key in enumerate(lab["key"]):
                if key in keys:
                    continue
                keys.add(key)
                o, n = lab["offset"][s], lab["n_atoms"][s]
                rows.append(dict(numbers=lab["numbers"][o:o + n], positions=lab["positions"][o:o + n], forces=lab["forces"][o:o + n],
                                 **{k: lab[k][s] for k in ("energy", "stress", "cell", "pbc", "source", "key", "teacher_version")}))
            # the shard's labelling time (process-seconds: shards ran side by side), for the rows new to OUT only,
            # so that merging a shard again adds no time
            seconds = float(lab["attrs"].get("label_seconds", 0.0)) * len(rows) / max(len(lab["key"]), 1)
            for b in range(0, len(rows), 4096):
                writer.append(rows[b:b + 4096], seconds=seconds * len(rows[b:b + 4096]) / len(rows))
            for key, rec in read_failed(Path(path)).items():
                if key not in keys:
                    recorded[key] = {**rec, "out": out.name}
        write_failed(out, recorded.values())
        n = len(writer)
    r = dataset_report([out], args)
    atomic_write(out.with_name(f"{out.stem}.report.json"), lambda tmp: Path(tmp).write_text(json.dumps(r, indent=2)))
    print(f"merged {len(args.shards)} files into {out}: {n} structures")
    print(format_report(r, args))
    return r


def report_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py report", description="Data-set report and GO / NO-GO verdict over the "
                                "union of labels files, which may come from different teachers (e.g. molecules "
                                "labelled with xtb and crystals with chgnet); each file's failures are read from "
                                "its OUT_STEM.failed.jsonl.")
    p.add_argument("files", nargs="+", help="labels files (.h5)")
    p.add_argument("--json", default=None, help="write the report here as JSON")
    add_verdict_args(p)
    add_markdown_help(p)
    args = p.parse_args(argv)
    if args.json:
        output_file(p, args.json, "--json")
    r = dataset_report([Path(f) for f in args.files], args)
    if args.json:
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(json.dumps(r, indent=2)))
    print(format_report(r, args))
    return r


def export_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py export", description="Write labels files as extended XYZ, the format MACE, "
                                "NequIP and Allegro train from: each structure with its energy (eV), forces (eV/A) and, for a "
                                "crystal, stress (eV/A^3, ASE's sign: positive under tension), and its key, source and teacher "
                                "in the frame's info. Read through models.labels, so the labels a running label.py has "
                                "committed to its journal are included (plain h5py would miss them).")
    p.add_argument("files", nargs="+", help="labels files (.h5)")
    p.add_argument("--out", required=True, help="the .extxyz file to write (atomically)")
    p.add_argument("--prefix", default="", help="write the labels as info / arrays named PREFIX + energy, forces, stress (MACE's "
                   "defaults: --prefix REF_) instead of as ASE calculator results, which ase.io.read returns as "
                   "atoms.get_potential_energy(), get_forces() and get_stress()")
    add_markdown_help(p)
    args = p.parse_args(argv)
    out = output_file(p, args.out, "--out")
    labels = [(path, read_labels(path)) for path in args.files]  # every input is readable before OUT is written
    frames = [frame for path, lab in labels for frame in label_frames(lab, args.prefix)]

    write_extxyz(out, frames)
    print(f"wrote {len(frames)} structures of {', '.join(args.files)} to {out}")
    return {"n_structures": len(frames), "out": str(out)}


def relax_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py relax", description="Relax structures (atom positions; a crystal's cell stays "
                                "fixed) with a student or a teacher, by FIRE as ASE runs it: a student relaxes --batch-size "
                                "structures at once, one model call per step for all of them (models/batched_md.py, the same "
                                "path as ASE's FIRE for each alone), a teacher one structure at a time through ASE. Writes "
                                "every input structure, in input order, with its relaxation in the frame's info: relax_by, "
                                "relax_converged, relax_steps, relax_fmax (eV/A, after), relax_energy_start and "
                                "relax_energy_end (eV, the relaxing model's); one that cannot be relaxed (an element the "
                                "model lacks, non-finite coordinates) is written as it came, with relax_error. evaluate.py "
                                "scores the output like any samples file: a relaxed row beside the raw one, never instead.")
    p.add_argument("inputs", nargs="+", help="structure files (extxyz, xyz, sdf, cif, csv), directories of them, or qm9[:split]")
    p.add_argument("--teacher", required=True, type=teacher_name, help=f"what relaxes: {', '.join(sorted(TEACHERS))}, or "
                   "student:PATH to a train.py --task ff checkpoint")
    p.add_argument("--out", required=True, help="the .extxyz file to write (atomically)")
    p.add_argument("--fmax", type=positive_float, default=0.05, help="a structure is relaxed once its largest atomic force "
                   "is below this (eV/A)")
    p.add_argument("--steps", type=positive_int, default=200, help="FIRE steps at most per structure")
    p.add_argument("--batch-size", type=positive_int, default=256, help="student: structures relaxed together")
    p.add_argument("--compile", action="store_true", help="student: run it through torch.compile (the same relaxation, "
                   "faster once compiled: kernels/README.md; compiling takes tens of seconds)")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    add_markdown_help(p)
    args = p.parse_args(argv)
    student = args.teacher.startswith(STUDENT_PREFIX)
    if args.compile and not student:
        p.error("--compile compiles a student (--teacher student:PATH)")
    out = output_file(p, args.out, "--out")
    device = str(checked_device(p, args.device))
    records = [(key, load()) for key, _, load in iter_records(args.inputs)]
    if not records:
        raise InputError(f"{', '.join(args.inputs)}: no structures")
    from ase.optimize import FIRE
    from tqdm import tqdm

    from models.batched_md import batched_fire
    from models.checkpoint import load_student

    if student:
        model, meta = load_student(args.teacher[len(STUDENT_PREFIX):], device)  # in its own precision, as label.py runs it
        if args.compile:
            model.compile_inference()
        elements, by = set(model.config.elements), f"{args.teacher} (step {meta['step']})"
    else:
        teacher = get_teacher(args.teacher, device)
        elements, by = teacher.elements, teacher.version
    frames, todo = [], []
    for key, atoms in records:
        if isinstance(atoms, Failure):
            raise InputError(f"{key}: {atoms.reason}: every input structure must be readable, so that the output holds "
                             "them all in input order")
        atoms = atoms.copy()
        atoms.calc = None
        atoms.info["relax_by"] = by
        lacking = unknown_elements(atoms, elements) if elements is not None else []
        if lacking or not np.isfinite(atoms.positions).all():
            atoms.info["relax_error"] = f"elements {lacking} unknown to it" if lacking else "non-finite coordinates"
        else:
            todo.append(len(frames))
        frames.append(atoms)
    t0, n_atom_steps = time.time(), 0
    chunks = [todo[i:i + args.batch_size] for i in range(0, len(todo), args.batch_size)] if student else [[i] for i in todo]
    for chunk in tqdm(chunks, desc=f"relaxing with {args.teacher}", unit="batch" if student else "structure"):
        if student:
            result = batched_fire(model, [frames[i] for i in chunk], fmax=args.fmax, steps=args.steps, device=device)
            for j, i in enumerate(chunk):
                frames[i].positions = result["positions"][result["batch"] == j]
                frames[i].info.update(relax_converged=bool(result["converged"][j]), relax_steps=int(result["steps"][j]),
                                      relax_fmax=float(result["fmax"][j]), relax_energy_start=float(result["energy_ev"][0, j]),
                                      relax_energy_end=float(result["energy_ev"][1, j]))
                n_atom_steps += len(frames[i]) * int(result["steps"][j])
            continue
        atoms = frames[chunk[0]]
        seen = teacher.as_seen(atoms)  # a molecule for a periodic-only teacher sits in a vacuum box: shifted back after
        shift = seen.positions[0] - atoms.positions[0]
        seen.calc = teacher.calc
        try:
            start = float(seen.get_potential_energy())
            opt = FIRE(seen, logfile=None)
            converged = opt.run(fmax=args.fmax, steps=args.steps)
        except Exception as e:  # a teacher's own failure (xtb's SCF, say) ends this structure's relaxation, not the run
            atoms.info["relax_error"] = f"{teacher.name} failed: {type(e).__name__}: {e}"[:300]
            todo.remove(chunk[0])
            continue
        atoms.positions = seen.positions - shift
        atoms.info.update(relax_converged=bool(converged), relax_steps=int(opt.nsteps),
                          relax_fmax=float(np.linalg.norm(seen.get_forces(), axis=1).max()), relax_energy_start=start,
                          relax_energy_end=float(seen.get_potential_energy()))
        n_atom_steps += len(atoms) * int(opt.nsteps)
    seconds = time.time() - t0

    write_extxyz(out, frames)
    relaxed = [frames[i] for i in todo]
    converged = sum(a.info["relax_converged"] for a in relaxed)
    summary = {"n_structures": len(frames), "n_relaxed": len(relaxed), "n_converged": converged,
               "median_steps": float(np.median([a.info["relax_steps"] for a in relaxed])) if relaxed else 0.0,
               "seconds": seconds, "atom_steps_per_s": n_atom_steps / seconds if seconds > 0 else 0.0, "out": str(out)}
    print(f"relaxed {len(relaxed)} of {len(frames)} structures with {by}: {converged} below {args.fmax:g} eV/A within "
          f"{args.steps} steps (median {summary['median_steps']:.0f} steps), {seconds:.1f} s "
          f"({summary['atom_steps_per_s']:,.0f} atom-steps/s); wrote {out}"
          + (f"; {len(frames) - len(relaxed)} not relaxable or failed, written as they came (relax_error)" if len(relaxed) < len(frames) else ""))
    return summary


def perturb(atoms, scale: float, rattle: float, rng: np.random.Generator):
    """A copy of atoms compressed or stretched by `scale` (a crystal: its cell, fractional coordinates kept; a molecule:
    its positions about their centroid), then every coordinate moved by a Gaussian of standard deviation `rattle` (A)."""
    atoms = atoms.copy()
    atoms.calc = None
    # the input's labels (an exported labels file's energy, forces, stress) are not the copy's
    for name in set(atoms.arrays) - {"numbers", "positions"}:
        del atoms.arrays[name]
    atoms.info = {k: v for k, v in atoms.info.items() if not any(w in k.lower() for w in ("energy", "force", "stress", "virial"))}
    if atoms.pbc.any():
        atoms.set_cell(atoms.cell * scale, scale_atoms=True)
    else:
        centre = atoms.positions.mean(0)
        atoms.positions = centre + scale * (atoms.positions - centre)
    atoms.positions = atoms.positions + rng.normal(0.0, rattle, atoms.positions.shape)
    return atoms


def perturb_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py perturb", description="Write --copies perturbed copies of every input "
                                "structure: each compressed or stretched by a factor drawn uniformly from --scale (a crystal's "
                                "cell with its fractional coordinates; a molecule's positions about their centroid), then "
                                "rattled (every coordinate moved by a Gaussian of --rattle A). A student trained on minima only "
                                "knows nothing of atoms pushed closer than any minimum holds them, and relaxes or runs into "
                                "spurious basins there; label these copies with the teacher (label.py OUT --teacher ...) and "
                                "train on them beside the minima. Each copy's info holds perturbed_from (the input's key, as label.py "
                                "keys it beside OUT), "
                                "perturb_scale and perturb_rattle; the draws follow --seed, so a command writes the same file "
                                "again.")
    p.add_argument("inputs", nargs="+", help="structure files (extxyz, xyz, sdf, cif, csv), directories of them, or qm9[:split]")
    p.add_argument("--out", required=True, help="the .extxyz file to write (atomically)")
    p.add_argument("--copies", type=positive_int, default=4, help="perturbed copies of each input structure")
    p.add_argument("--scale", type=positive_float, nargs=2, default=[0.85, 1.0], metavar=("LOW", "HIGH"),
                   help="the linear compression factor's range (below 1 compresses)")
    p.add_argument("--rattle", type=nonnegative_float, default=0.05, help="A: standard deviation of each coordinate's move")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the draws")
    add_markdown_help(p)
    args = p.parse_args(argv)
    low, high = args.scale
    if low > high:
        p.error(f"--scale {low:g} {high:g}: LOW must not exceed HIGH")
    out = output_file(p, args.out, "--out")
    rng = np.random.default_rng(args.seed)
    frames, n_inputs = [], 0
    for key, _, load in iter_records(args.inputs, anchor=out.parent):  # keys as label.py gives them for OUT
        atoms = load()
        if isinstance(atoms, Failure):
            raise InputError(f"{key}: {atoms.reason}: every input structure must be readable")
        if not np.isfinite(atoms.positions).all():
            raise InputError(f"{key}: non-finite coordinates")
        n_inputs += 1
        for _ in range(args.copies):
            scale = float(rng.uniform(low, high))
            copy = perturb(atoms, scale, args.rattle, rng)
            copy.info.update(perturbed_from=key, perturb_scale=scale, perturb_rattle=args.rattle)
            frames.append(copy)
    if not frames:
        raise InputError(f"{', '.join(args.inputs)}: no structures")

    write_extxyz(out, frames)
    print(f"wrote {len(frames)} perturbed copies of {n_inputs} structures (scale {low:g}-{high:g}, rattle {args.rattle:g} A, "
          f"seed {args.seed}) to {out}")
    return {"n_inputs": n_inputs, "n_structures": len(frames), "out": str(out)}


def explore_main(argv) -> dict:
    p = argparse.ArgumentParser(prog="label.py explore", description="One exploration round of active learning "
                                "(models/active_learning.py): the first committee member runs NVE from every input structure, "
                                "all in one batch, with snapshots every --every steps; a trajectory that goes unphysical "
                                "(atoms closer than --min-dist, an atom with no neighbour within --isolated-dist, or past "
                                "--max-temperature) ends there. The committee's max force deviation is computed on every "
                                "snapshot, and --n are written to --out: the last physical snapshot of each trajectory that went "
                                "unphysical first, then the most disputed above --min-deviation. Label them (label.py OUT "
                                "--teacher ...) and train again with them.")
    p.add_argument("inputs", nargs="+", help="structure files (extxyz, xyz, sdf, cif, csv), directories of them, or qm9[:split]")
    p.add_argument("--committee", nargs="+", required=True, help="two or more train.py --task ff checkpoints of one recipe, "
                   "other seeds (the first drives the dynamics)")
    p.add_argument("--out", required=True, help="the .extxyz file of the picked snapshots (atomically), each with its "
                   "explore_* info and committee_force_deviation (eV/A)")
    p.add_argument("--n", type=positive_int, default=500, help="snapshots to pick at most")
    p.add_argument("--steps", type=positive_int, default=200, help="NVE steps of each trajectory")
    p.add_argument("--every", type=positive_int, default=10, help="steps between snapshots")
    p.add_argument("--timestep", type=positive_float, default=0.5, help="fs")
    p.add_argument("--temperature", type=positive_float, default=300.0, help="K: the initial velocities' temperature")
    p.add_argument("--max-temperature", type=positive_float, default=None, help="K: a trajectory hotter than this has gone "
                   "unphysical (default 5 x --temperature)")
    p.add_argument("--min-deviation", type=nonnegative_float, default=0.05, help="eV/A: snapshots the committee agrees on "
                   "closer than this are not picked (the unphysical trajectories' ones are)")
    p.add_argument("--min-dist", type=nonnegative_float, default=MIN_DIST, help="A: closer atoms make a snapshot unphysical "
                   "(label.py's own check, so every picked snapshot can be labelled)")
    p.add_argument("--isolated-dist", type=nonnegative_float, default=ISOLATED_DIST, help="A: an atom with no neighbour "
                   "this close makes a snapshot unphysical (0: off)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="trajectories advanced together")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the initial velocities")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    add_markdown_help(p)
    args = p.parse_args(argv)
    if len(args.committee) < 2:
        p.error("--committee needs two or more students: their disagreement is what picks the snapshots")
    for path in args.committee:
        if not os.path.isfile(path):
            p.error(f"--committee {path}: no such checkpoint file")
    out = output_file(p, args.out, "--out")
    device = str(checked_device(p, args.device))
    from tqdm import tqdm

    from models.active_learning import committee_deviation, explore, pick
    from models.checkpoint import load_student

    committee = [load_student(path, device)[0] for path in args.committee]
    known = set(committee[0].config.elements)
    for path, member in zip(args.committee[1:], committee[1:]):
        if set(member.config.elements) != known:
            p.error(f"--committee {path} knows other elements than {args.committee[0]}: the members must share one recipe")
    structures = []
    for key, _, load in iter_records(args.inputs):
        atoms = load()
        if isinstance(atoms, Failure):
            raise InputError(f"{key}: {atoms.reason}")
        if lacking := unknown_elements(atoms, known):
            raise InputError(f"{key}: elements {lacking} unknown to the committee (it knows {sorted(known)})")
        if why := check_structure(atoms, args.min_dist, args.isolated_dist):
            raise InputError(f"{key}: {why}: an exploration starts from a physical structure")
        atoms = atoms.copy()
        atoms.calc = None
        atoms.info["explore_input"] = key
        structures.append(atoms)
    if not structures:
        raise InputError(f"{', '.join(args.inputs)}: no structures")
    max_temperature = args.max_temperature or 5 * args.temperature
    t0, snapshots = time.time(), []
    for lo in tqdm(range(0, len(structures), args.batch_size), desc="exploring", unit="batch"):
        found = explore(committee[0], structures[lo:lo + args.batch_size], args.steps, args.every, args.temperature,
                        max_temperature, args.timestep, args.seed + lo, args.min_dist, args.isolated_dist, device)
        for frame in found:
            frame.info["explore_source"] += lo
        snapshots += found
    deviation = committee_deviation(committee, snapshots, device=device)
    for frame, d in zip(snapshots, deviation):
        frame.info["committee_force_deviation"] = float(d)
    picked = [snapshots[i] for i in pick(snapshots, deviation, args.n, args.min_deviation)]

    write_extxyz(out, picked)
    unphysical = sum("explore_unphysical" in s.info for s in snapshots)
    q = np.quantile(deviation, [0.5, 0.9, 1.0])
    summary = {"n_inputs": len(structures), "n_snapshots": len(snapshots), "n_unphysical_trajectories": unphysical,
               "deviation_median": float(q[0]), "deviation_p90": float(q[1]), "deviation_max": float(q[2]),
               "n_picked": len(picked), "seconds": time.time() - t0, "out": str(out)}
    print(f"explored {len(structures)} structures for {args.steps} steps: {len(snapshots)} snapshots, {unphysical} "
          f"trajectories went unphysical; committee force deviation median {q[0]:.3f}, 90 % {q[1]:.3f}, max {q[2]:.3f} eV/A; "
          f"picked {len(picked)} (unphysical first, then deviation >= {args.min_deviation:g}) into {out} in {summary['seconds']:.1f} s")
    return summary


def write_extxyz(path: Path, frames: list) -> None:
    """ase.Atoms as one extended XYZ file, written atomically (a kill leaves the old file or the new one)."""
    def write(tmp):
        import ase.io
        ase.io.write(tmp, frames, format="extxyz")
    atomic_write(path, write)


def label_frames(lab: dict, prefix: str = "") -> list:
    """The structures of read_labels' dict as ase.Atoms with their labels: as ASE calculator results (prefix "") or as
    info / arrays PREFIX + energy, forces, stress."""
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for s, key in enumerate(lab["key"]):
        o, n = lab["offset"][s], lab["n_atoms"][s]
        periodic = bool(lab["pbc"][s].any())
        atoms = Atoms(numbers=lab["numbers"][o:o + n], positions=lab["positions"][o:o + n].astype(np.float64),
                      cell=lab["cell"][s].astype(np.float64) if periodic else None, pbc=lab["pbc"][s])
        atoms.info.update(key=str(key), source=str(lab["source"][s]), teacher=lab["attrs"]["teacher"],
                          teacher_version=str(lab["teacher_version"][s]))
        energy, forces = float(lab["energy"][s]), lab["forces"][o:o + n].astype(np.float64)
        stress = lab["stress"][s].astype(np.float64) if periodic else None
        if prefix:
            atoms.info[f"{prefix}energy"] = energy
            atoms.arrays[f"{prefix}forces"] = forces
            if stress is not None:
                atoms.info[f"{prefix}stress"] = stress
        else:
            atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces, **({"stress": stress} if stress is not None else {}))
        frames.append(atoms)
    return frames


def prepare(record, min_dist: float, isolated_dist: float):
    """(key, source, load) -> (key, source, Atoms as the teacher will see them | Failure with its kind). The
    positions and cell are rounded to the float32 that is stored, so labels and stored geometry agree bit
    for bit."""
    key, source, load = record
    atoms = load()
    if isinstance(atoms, Failure):  # unreadable: kind "input"
        return key, source, atoms
    why = check_structure(atoms, min_dist, isolated_dist)
    if why:
        return key, source, Failure(why, "check")
    atoms = atoms.copy()
    atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
    atoms.cell = atoms.cell.array.astype(np.float32).astype(np.float64)
    return key, source, atoms


def label_main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    shard = args.shard or (f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None)
    if shard:  # one output per shard, joined afterwards with `label.py merge`
        i, n = map(int, shard.split("/"))
        out = out.with_name(f"{out.stem}.shard{i}of{n}{out.suffix}")
    report_path = out.with_name(f"{out.stem}.report.json")
    try:
        lock = ExclusiveLock(out)  # before anything is read or deleted: a second writer is refused here
    except Busy as e:
        raise LabelsError(str(e)) from None
    try:
        writer, teacher, log, t_load, device = _open(args, out, lock)
    except BaseException:
        lock.release()
        raise
    try:
        return _label(args, out, shard, writer, teacher, device, log, t_load, report_path)
    finally:
        writer.close()
        log.f.close()


def _open(args, out: Path, lock: ExclusiveLock):
    """Load the teacher and open OUT under the lock already held: (writer, teacher, log, teacher load seconds, device)."""
    log = Log(out.parent / "label.log", quiet=args.quiet)
    log(f"label.py {' '.join(args.argv)}", quiet=True)

    device = args.device
    if device is None:
        try:
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per rank
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    t0 = time.time()
    teacher = get_teacher(args.teacher, device)
    t_load = time.time() - t0
    log(f"teacher {teacher.name} ({teacher.version}) on {device}, loaded in {t_load:.1f} s")
    if not args.resume:
        log(f"--no-resume: deleting {out} and its failure records")
        failures_path(out).unlink(missing_ok=True)
    # refuses a file of another teacher or teacher version
    writer = LabelWriter(out, teacher.name, teacher.version, fresh=not args.resume, mixed_versions=args.mixed_versions, lock=lock)
    return writer, teacher, log, t_load, device


def _label(args, out: Path, shard: str | None, writer: LabelWriter, teacher: Teacher, device: str, log, t_load: float,
           report_path: Path) -> dict:
    done = writer.keys()
    failed = read_failed(out)
    skip = done | (set() if args.retry_failed else set(failed))
    inputs = list(args.inputs)
    if args.generate:
        t_gen = time.time()
        inputs.append(generate(args, out, device))
        log(f"--generate: {args.n_generate} structures in {inputs[-1]} (sampled in {time.time() - t_gen:.1f} s, or earlier)")
    t_read = time.time()
    records, seen = [], set()
    for key, source, load in iter_records(inputs, anchor=out.parent):  # keys only: records are parsed when labelled
        if key not in seen:  # an input given twice counts once
            seen.add(key)
            records.append((key, args.source or source, load))
    n_inputs = len(records)
    if args.limit:  # the first N inputs, whatever is labelled already: a re-run resumes the same N
        records = records[: args.limit]
    if shard:
        i, n = map(int, shard.split("/"))
        records = [t for t in records if int(hashlib.sha1(t[0].encode()).hexdigest()[:8], 16) % n == i]
    todo = [t for t in records if t[0] not in skip]
    t_read = time.time() - t_read
    log(f"{n_inputs} input structures (listed in {t_read:.1f} s){f', the first {args.limit} selected by --limit' if args.limit else ''}"
        f"{f', {len(records)} in shard {shard}' if shard else ''}; {len(done)} already labelled, {len(failed)} recorded "
        f"failures, {len(todo)} to do")

    from tqdm import tqdm

    block, n_new, atoms_new, n_fail, t_teacher = [], 0, 0, 0, 0.0
    t_start = t_commit = time.time()

    def fail(key, source, kind, reason):
        """kind: input (unreadable), check (failed a structure check), unsupported (elements), teacher (it raised),
        non-finite (NaN / Inf labels)."""
        nonlocal n_fail
        n_fail += 1
        rec = {"key": key, "source": source, "kind": kind, "reason": reason, "teacher": teacher.name, "out": out.name,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        failed[key] = rec
        with open(failures_path(out), "a") as ff:  # one whole line per record; a line cut by a kill is skipped on read
            ff.write(json.dumps(rec) + "\n")
        log(f"failed {key} ({kind}): {reason}")
        bar.set_postfix(failed=n_fail, refresh=False)

    def commit():
        nonlocal block, t_commit
        now = time.time()
        # A Ctrl-C after append returned and before the block is cleared hands the block in again: the writer
        # skips keys it holds, so it is stored once.
        n = writer.append(block, seconds=now - t_commit)
        t_commit = now
        log(f"committed block of {len(block)}: {n} structures in {out}", quiet=True)
        block = []

    bar = tqdm(todo, desc=f"label {teacher.name}", unit="struct", disable=args.no_progress or args.quiet, dynamic_ncols=True)
    try:
        for record in bar:
            # Parsing ahead in a thread was tried: the GIL handoffs cost more than the parsing it hid.
            key, source, atoms = prepare(record, args.min_dist, args.isolated_dist)
            if isinstance(atoms, Failure):
                fail(key, source, atoms.kind, atoms.reason)
                continue
            t = time.time()
            try:
                energy, forces, stress = teacher.label(atoms)
            except UnsupportedElements as e:
                fail(key, source, "unsupported", str(e))
                continue
            except Exception as e:  # SCF not converged, CUDA OOM, ...: record and go on
                fail(key, source, "teacher", f"teacher error ({type(e).__name__}: {str(e)[:300]})")
                continue
            finally:
                t_teacher += time.time() - t
            finite = np.isfinite(energy) and np.isfinite(forces).all() and (np.isfinite(stress).all() or not atoms.pbc.any())
            if not finite:
                fail(key, source, "non-finite", "teacher returned NaN or Inf energy, forces or stress")
                continue
            block.append(dict(numbers=atoms.numbers, positions=atoms.positions, forces=forces, energy=energy, stress=stress,
                              cell=atoms.cell.array, pbc=atoms.pbc, source=source, key=key))
            n_new += 1
            atoms_new += len(atoms)
            if len(block) >= args.block or time.time() - t_commit >= args.commit_seconds:
                commit()
        commit()
    except KeyboardInterrupt:
        commit()  # keep the structures already computed
        log(f"interrupted; {len(writer)} structures in {out}; run the same command again to resume")
        raise SystemExit(130)
    finally:
        bar.close()
    seconds = time.time() - t_start

    writer.fold()
    r = dataset_report([out], args)
    r.update(labelled_this_run=n_new, failed_this_run=n_fail, seconds_this_run=seconds,
             structures_per_hour_this_run=3600 * n_new / seconds if n_new and seconds > 0 else math.nan,
             atoms_per_second_this_run=atoms_new / seconds if n_new and seconds > 0 else math.nan,
             teacher_load_seconds=t_load, list_seconds=t_read, teacher_seconds=t_teacher, device=device,
             # the pipeline's own share of this run: parsing, checks, float32 rounding, HDF5 writes, failure records
             overhead_fraction=(seconds - t_teacher) / seconds if seconds > 0 else math.nan)
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(json.dumps(r, indent=2)))
    log(format_report(r, args))
    log(f"labelled {n_new} structures ({atoms_new} atoms) in {seconds:.1f} s: {format_number('structures_per_hour', r['structures_per_hour_this_run'])} "
        f"structures/hour, {format_number('atoms_per_second', r['atoms_per_second_this_run'])} atoms/s, {r['overhead_fraction']:.1%} of the time "
        f"outside the teacher; {n_fail} failed (see {failures_path(out)}); report {report_path}")
    return r


def bench_main(argv) -> dict:
    """Each (teacher, input): the first --n records, labelled by label.py (all of it: parsing, checks, the teacher,
    HDF5 writes, the report) and by a bare loop of teacher calls on the same structures, parsed and prepared
    beforehand; passes alternate and medians are compared. Teacher loading is excluded from both."""
    import platform
    import statistics

    p = argparse.ArgumentParser(prog="label.py bench", description=bench_main.__doc__)
    p.add_argument("inputs", nargs="+", help="structure inputs as for labelling (e.g. qm9:test, a CDVAE CSV); each is benched on its first --n records")
    p.add_argument("--teachers", nargs="+", default=["xtb", "chgnet"], type=teacher_name, help="teachers to bench (names as for --teacher; student:PATH times a student against its teacher)")
    p.add_argument("--n", type=positive_int, default=200, help="structures per (teacher, input)")
    p.add_argument("--repeats", type=positive_int, default=3, help="bare / label.py passes each (alternating); medians are reported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of torch teachers")
    p.add_argument("--out", default="labels/bench", help="directory for the bench's labels files, label.log, bench.md and bench.json")
    add_markdown_help(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    results = []
    for name in args.teachers:
        teacher = get_teacher(name, args.device)
        for inp in args.inputs:
            records = [prepare(rec, MIN_DIST, ISOLATED_DIST) for rec in itertools.islice(iter_records([inp], anchor=out), args.n)]
            # exactly what the calculator gets from label.py: checked, float32-rounded, boxed if needed
            structures = [(teacher.as_seen(atoms), bool(atoms.pbc.any())) for _, _, atoms in records
                          if not isinstance(atoms, Failure)]
            short = source_name(inp) if Path(inp).exists() else inp  # 'perov_5/test.csv', 'qm9:test'
            tag = f"{teacher.name}-{short.replace('/', '_').replace(':', '_')}"
            bare, total, loop, labelled = [], [], [], 0
            for _ in range(args.repeats):
                bare.append(_bare_calls(teacher, [(a.copy(), periodic) for a, periodic in structures]))
                t = time.perf_counter()
                r = label_main([inp, "--teacher", name, "--out", str(out / f"{tag}.h5"), "--limit", str(args.n), "--no-resume",
                                "--quiet", "--device", args.device])
                total.append(time.perf_counter() - t - r["teacher_load_seconds"])
                loop.append(r["seconds_this_run"])
                labelled = r["labelled"]
            b, q, lp = statistics.median(bare), statistics.median(total), statistics.median(loop)
            atoms = sum(len(a) for a, _ in structures)
            results.append({"teacher": teacher.name, "teacher_version": teacher.version, "input": short, "structures": len(records),
                            "labelled": labelled, "bare_seconds": bare, "label_seconds": total, "loop_seconds": loop,
                            # the labelling loop (parse, check, teacher, HDF5 blocks) grows with the structures; the rest
                            # (listing every record of the input, opening the file, the final report) is paid once per run
                            "loop_overhead": lp / b - 1, "per_run_seconds": q - lp, "overhead": q / b - 1,
                            "structures_per_hour": 3600 * labelled / q, "atoms_per_second": atoms / q})
            row = results[-1]
            print(f"{teacher.name:<8} {short:<24} bare {b:8.2f} s  label.py {q:8.2f} s (loop {lp:.2f} s, {row['loop_overhead']:+.1%}; "
                  f"once per run {q - lp:.2f} s)  overall {row['overhead']:+.1%}  {row['structures_per_hour']:,.0f} structures/h", flush=True)
    env = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": args.device, "n": args.n, "repeats": args.repeats}
    lines = ["| teacher | input | labelled | bare calls | label.py loop | loop overhead | label.py once per run | overall overhead | structures / hour | atoms / s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in results:
        b, lp = statistics.median(row["bare_seconds"]), statistics.median(row["loop_seconds"])
        lines.append(f"| {row['teacher_version']} | {row['input']} | {row['labelled']} / {row['structures']} | {b:.2f} s | {lp:.2f} s | "
                     f"{row['loop_overhead']:+.1%} | {row['per_run_seconds']:.2f} s | {row['overhead']:+.1%} | "
                     f"{row['structures_per_hour']:,.0f} | {row['atoms_per_second']:,.0f} |")
    table = "\n".join(lines) + f"\n\nmedian of {args.repeats} alternating passes; {env}\n"
    (out / "bench.md").write_text(table)
    (out / "bench.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    print(table)
    return {"env": env, "results": results}


def _bare_calls(teacher: Teacher, structures: list) -> float:
    """Seconds for the plain ASE loop a user would write: energy, forces and (crystals) stress per structure.
    structures: (atoms as the teacher sees them, whether it is a crystal)."""
    teacher.calc.reset()
    t = time.perf_counter()
    for atoms, periodic in structures:
        atoms.calc = teacher.calc
        try:
            atoms.get_potential_energy()
            atoms.get_forces()
            if periodic:
                atoms.get_stress()
        except Exception:  # e.g. SCF not converged: label.py records these, and pays for them too
            pass
    return time.perf_counter() - t


COMMANDS = {"merge": merge_main, "report": report_main, "bench": bench_main, "export": export_main, "relax": relax_main,
            "explore": explore_main, "perturb": perturb_main}


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return label_main(argv)


if __name__ == "__main__":
    from models.precision import flush_denormals
    flush_denormals()  # a SchNet student's forces: 1.4 x on the CPU; a script's choice, not the library's
    try:
        main()
    except (TeacherError, LabelsError, InputError, DiskFull) as e:
        sys.exit(f"label.py: error: {e}")
