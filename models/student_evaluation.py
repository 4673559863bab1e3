"""evaluate.py --task ff: a student force field against its teacher, on the labelled structures it did not train on:
accuracy, speed against the teacher on the same device, and NVE molecular dynamics (the measures are in
models/forcefield_eval.py; definitions in models/README.md, "Metrics").

`score_student` writes the metrics JSON and the figures (parity plots, MD energy traces) and logs through the
`logging` handlers its caller set up.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from ase.data import chemical_symbols

from models import forcefield_eval
from models.checkpoint import CheckpointError, build_student, load_checkpoint
from models.evaluation import write_metrics
from models.forcefield import student_calculator
from models.labelled_data import EV_PER_A3_IN_GPA, MAX_FORCE, LabelledStructures, is_validation, key_hashes
from models.labels import LabelsError
from models.teachers import TeacherError, get_teacher

log = logging.getLogger(__name__)


def held_out(data: LabelledStructures, ckpt: dict, ckpt_path: Path) -> tuple[LabelledStructures, str | None]:
    """(the structures of `data` that the student of checkpoint `ckpt` did not train on, a warning or None). Decided by
    key, the identity of a structure, so a copy, a move or a merge of a training file holds out what the original
    did. A checkpoint from before train.py kept its training keys is taken to have trained on every structure on the
    training side of its split (by the hash of its key), in any file: that never scores a structure it trained on,
    and may leave out some it never saw, which the warning counts."""
    if "trained_key_hashes" in ckpt:
        trained = np.isin(key_hashes(data.c["key"]), ckpt["trained_key_hashes"].numpy())
        return data.subset(np.flatnonzero(~trained)), None
    fraction = ckpt.get("args", {}).get("val_fraction")
    if fraction is None:
        raise CheckpointError(f"{ckpt_path} records neither the keys it trained on nor its --val-fraction: its held-out "
                              f"structures cannot be told")
    trained = ~is_validation(data.c["key"], fraction)
    return data.subset(np.flatnonzero(~trained)), (
        f"warning: {ckpt_path} records no training keys (written before train.py kept them): assumed it trained on every "
        f"structure whose key falls on the training side of its split (--val-fraction {fraction}), in any file, so "
        f"{int(trained.sum())} such structures are not scored, whether or not it saw them. Retrain it to score all it never saw")


def known_elements(held: LabelledStructures, elements: list[int]) -> tuple[LabelledStructures, str | None]:
    """(the structures of `held` made of `elements` alone, a warning naming the others or None): a student has no
    embedding for an element it never saw, so it cannot score a structure that holds one."""
    c = held.c
    foreign = ~np.isin(c["numbers"], elements)
    if not foreign.any():
        return held, None
    atom_struct = np.repeat(np.arange(len(held)), c["n_atoms"])
    skipped = np.unique(atom_struct[foreign])
    said = f"{len(skipped)} of {len(held)} held-out structures hold elements the student never saw " \
           f"({', '.join(f'{chemical_symbols[z]} ({z})' for z in np.unique(c['numbers'][foreign]))}; it knows " \
           f"{', '.join(chemical_symbols[z] for z in elements)}), first {held.where(int(skipped[0]))}"
    if len(skipped) == len(held):
        raise LabelsError(f"{said}: nothing to score. Give labels of the elements it learned, or train a student on these")
    return held.subset(np.setdiff1d(np.arange(len(held)), skipped)), f"warning: {said}: those are not scored"


def score_student(ckpt_path: Path, labels: list[Path], out_json: Path, fig_dir: Path, *, teacher: str | None = None,
                  time_teacher: bool = True, device: str = "cpu", speed_structures: int = 24, md_structures: int = 3,
                  md_steps: int = 2000, md_timestep: float = 0.5, md_temperature: float = 300.0,
                  compile: bool = False, started: float | None = None) -> dict:
    """Score the student of the train.py --task ff checkpoint ckpt_path on the held-out structures of the labels
    files; write the metrics to out_json, parity.png and md.png to fig_dir, and return the metrics.

    Speed: up to 3 x speed_structures held-out structures of each kind (molecules, crystals), timed against `teacher`
    (default: the one whose labels the student learned; time_teacher False skips it, and a teacher that cannot run
    is a warning). MD: md_structures held-out structures of each kind, md_steps velocity-Verlet steps of md_timestep
    fs from md_temperature K. device: of the student and of a torch teacher; compile: run the student through
    ForceField.compile_inference (the same numbers, faster once compiled); started: time.time() when the run
    began, for the total in the last line (default: now). Raises CheckpointError for a checkpoint that is not a
    student, LabelsError for labels that cannot be used (see LabelledStructures.load), of another teacher, with nothing
    held out or only elements the student never saw, OSError when the metrics cannot be written.
    """
    started = time.time() if started is None else started
    ckpt = load_checkpoint(ckpt_path, task="ff")
    model, _ = build_student(ckpt)
    # the bound the student trained under (older checkpoints: the default), so that it is scored on labels like its own
    data = LabelledStructures.load(labels, max_force=ckpt.get("args", {}).get("max_force", MAX_FORCE))
    for warning in data.warnings:
        log.warning(warning)
    model = model.to(device).eval()
    if compile:
        model.compile_inference()
    files = ", ".join(map(str, labels))
    if (data.teacher, data.teacher_version) != (ckpt["teacher"], ckpt["teacher_version"]):
        raise LabelsError(f"{files} hold labels of {data.teacher} ({data.teacher_version}); the student {ckpt_path} "
                          f"learned {ckpt['teacher']} ({ckpt['teacher_version']}): score a student against its own teacher")
    held, assumed = held_out(data, ckpt, ckpt_path)
    if assumed:
        log.warning(assumed)
    if not len(held):
        raise LabelsError(f"every structure of {files} is one the student {ckpt_path} trained on (by key): give held-out labels")
    n_held = len(held)
    held, foreign = known_elements(held, model.config.elements)
    if foreign:
        log.warning(foreign)
    log.info(f"student {ckpt_path} (step {ckpt['step']}, {sum(p.numel() for p in model.parameters()):,} parameters) of "
             f"{data.teacher} ({data.teacher_version}); {n_held} held-out structures of {len(data)} in {files}"
             f"{f', {len(held)} of them of its elements' if len(held) < n_held else ''}; device {device}")

    t0 = time.time()
    pred = forcefield_eval.predict(model, held, device=device)
    result = {"checkpoint": str(ckpt_path), "step": ckpt["step"], "teacher": data.teacher,
              "teacher_version": data.teacher_version, "labels": [str(p) for p in labels], "held_out": len(held),
              "held_out_by": "assumed: the training side of its split" if assumed else "the keys it trained on",
              "held_out_unknown_elements": n_held - len(held), "compiled": compile,
              "accuracy": forcefield_eval.accuracy(pred, held), "accuracy_seconds": time.time() - t0}
    for group, row in result["accuracy"].items():
        log.info(f"{group:<10} {row['structures']:>7} structures  energy MAE {row.get('energy_mae_mev_per_atom', float('nan')):8.2f} "
                 f"meV/atom  force MAE {row.get('force_mae_mev_per_a', float('nan')):8.1f} meV/A" +
                 (f"  stress MAE {row['stress_mae_gpa']:.3f} GPa" if "stress_mae_gpa" in row else ""))

    kinds = {"molecules": np.flatnonzero(~held.periodic), "crystals": np.flatnonzero(held.periodic)}  # held-out indices
    timed_teacher = None
    if time_teacher:
        try:
            timed_teacher = get_teacher(teacher or ckpt["teacher"], device)
        except TeacherError as e:
            log.warning(f"warning: no teacher speed ({e}); pass --no-teacher to skip it")
    result["speed"] = forcefield_eval.speed(model, timed_teacher, speed_groups(held, kinds, speed_structures), device=device)
    result["speed_device"] = device
    for row in result["speed"]:
        log.info(f"speed {row['group']:<26} student {row['student_single_atoms_per_s']:>9,.0f} atoms/s one at a time, "
                 f"{row['student_batched_atoms_per_s']:>10,.0f} batched; MD {row['student_md_single_atom_steps_per_s']:,.0f} "
                 f"atom-steps/s one at a time, {row['student_md_batched_atom_steps_per_s']:,.0f} batched" +
                 (f"; teacher {row['teacher_atoms_per_s']:>8,.0f}: speed-up x{row['speedup_single']:.1f} / x{row['speedup_batched']:.1f}"
                  if "teacher_atoms_per_s" in row else "") +
                 (f"; teacher batched {row['teacher_batched_atoms_per_s']:,.0f}: x{row['speedup_batched_vs_batched']:.1f}"
                  if "teacher_batched_atoms_per_s" in row else ""))

    calc = student_calculator(model, device)
    result["md"] = []
    for kind, members in kinds.items():
        for k, s in enumerate(members[np.linspace(0, len(members) - 1, min(len(members), md_structures)).astype(int)]
                              if len(members) and md_structures else []):
            atoms = held.to_atoms(s)
            while atoms.pbc.any() and len(atoms) < 16:  # a crystal's small cell as a supercell, so atoms can move apart
                atoms = atoms.repeat(2)
            run = forcefield_eval.nve(atoms, calc, md_steps, md_timestep, md_temperature, seed=k)
            run["key"] = str(held.c["key"][s])
            result["md"].append(run)
            log.info(f"NVE {run['formula']:<14} {run['atoms']:>4} atoms {run['steps']} step{'s' if run['steps'] != 1 else ''}, "
                     f"{run['ps']:.3g} ps: drift {run['drift_mev_per_atom_per_ps']:+.3f} meV/atom/ps, fluctuation {run['energy_std_mev_per_atom']:.3f} meV/atom, <T> {run['mean_temperature_k']:.0f} K, "
                     f"{'physical' if run['physical'] else 'NOT physical: ' + run['problem']} ({run['seconds']:.1f} s)")
    write_metrics(out_json, result)
    log.info(f"wrote {out_json}")

    plot_parity(fig_dir / "parity.png", held, pred, data.teacher)
    if result["md"]:
        plot_md(fig_dir / "md.png", result["md"])
    log.info(f"wrote {fig_dir / 'parity.png'}{' and ' + str(fig_dir / 'md.png') if result['md'] else ''}; "
             f"{time.time() - started:.1f} s in all")
    return result


def speed_groups(held: LabelledStructures, kinds: dict[str, np.ndarray], n: int) -> dict[str, list]:
    """The structures of the speed benchmark as ASE Atoms, by group name: up to 3n of each kind's held-out indices
    (`kinds`), picked evenly and split into three size groups, smallest to largest, and crystals once more as
    2 x 2 x 2 supercells of the first n picked, so that the scaling with size shows."""
    groups = {}
    for kind, members in kinds.items():
        if not len(members):
            continue
        picked = members[np.linspace(0, len(members) - 1, min(len(members), 3 * n)).astype(int)]
        picked = picked[np.argsort(held.c["n_atoms"][picked], kind="stable")]
        for part in np.array_split(picked, 3):
            if len(part):
                sizes = held.c["n_atoms"][part]
                groups[f"{kind} {sizes.min()}-{sizes.max()} atoms"] = [held.to_atoms(s) for s in part]
        if kind == "crystals":
            groups["crystals x 2x2x2"] = [held.to_atoms(s).repeat(2) for s in picked[:n]]
    return groups


# ----------------------------------------------------------------------------------------------
# Figures: matplotlib's Figure without pyplot, so that drawing them leaves the process's backend alone


def plot_parity(path: Path, held: LabelledStructures, pred: dict, teacher: str) -> None:
    """Student against teacher on the held-out structures: energy per atom, force components and, when crystals are
    among them, stress components; `pred` is forcefield_eval.predict's."""
    from matplotlib.figure import Figure

    c = held.c
    panels = [("energy (eV/atom)", c["energy"] / c["n_atoms"], pred["energy"] / c["n_atoms"]),
              ("force components (eV/A)", c["forces"].ravel(), pred["forces"].ravel())]
    if held.periodic.any():
        panels.append(("stress components (GPa)", EV_PER_A3_IN_GPA * c["stress"][held.periodic].ravel(),
                       EV_PER_A3_IN_GPA * pred["stress"][held.periodic].ravel()))
    fig = Figure(figsize=(5 * len(panels), 4.5))
    for ax, (title, truth, guess) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        ax.scatter(truth, guess, s=2, alpha=0.4)
        lo, hi = float(min(truth.min(), guess.min())), float(max(truth.max(), guess.max()))
        ax.plot([lo, hi], [lo, hi], "k--", linewidth=0.8)
        ax.set(title=title, xlabel=f"teacher ({teacher})", ylabel="student")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_md(path: Path, runs: list[dict]) -> None:
    """The total energy of each NVE run (forcefield_eval.nve's) against time, relative to its start."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for run in runs:
        e = np.array(run["trace"]["total_energy_ev"])
        ax.plot(run["trace"]["ps"], 1000 * (e - e[0]) / run["atoms"], label=f"{run['formula']} ({run['atoms']} atoms)")
    ax.set(xlabel="time (ps)", ylabel="total energy - initial (meV/atom)", title="NVE with the student")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
