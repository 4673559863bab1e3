"""A student force field as users drive it, eager and compiled (ForceField.compile_inference), beside its teacher.

    python kernels/student_bench.py models/pretrained/qm9_student_xtb.pt LABELS.h5 [--structures 24 --repeats 3]

On structures of the labels files (the size groups of evaluate.py --task ff's speed rows: three per kind,
smallest to largest, and crystals once more as 2x2x2 supercells), atoms per second of energy + forces (+ stress
for crystals):
  - the student one structure at a time through its ASE calculator, and all of a group as one flat batch;
  - the student's NVE molecular dynamics, one structure at a time (ASE's VelocityVerlet) and all at once
    (models/batched_md.py), in atom-steps per second;
  - the teacher one structure at a time, as label.py calls it (once: it is slow), and all of a group in one call
    where it can batch (CHGNet), unless --no-teacher.
The eager and compiled students are timed alternately, --repeats times, the median counting, on one thread of the
same process; the compiled one's compilation happens in an untimed warm-up. Run it on idle cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

COLUMNS = {"student_single_atoms_per_s": "one at a time", "student_batched_atoms_per_s": "batched",
           "student_md_single_atom_steps_per_s": "MD one at a time", "student_md_batched_atom_steps_per_s": "MD batched"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="a student: train.py --task ff checkpoint or weights file")
    parser.add_argument("labels", nargs="+", type=Path, help="labels files (.h5) whose structures are timed")
    parser.add_argument("--structures", type=int, default=24, help="structures per size group")
    parser.add_argument("--repeats", type=int, default=3, help="alternating (eager, compiled) passes; the median counts")
    parser.add_argument("--no-teacher", action="store_true", help="do not time the teacher")
    args = parser.parse_args()
    if args.structures < 1 or args.repeats < 1:
        parser.error("--structures and --repeats take integers > 0")
    torch.set_num_threads(1)
    from models.checkpoint import CheckpointError, load_student
    from models.forcefield_eval import speed
    from models.labelled_data import LabelledStructures
    from models.labels import LabelsError
    from models.precision import flush_denormals
    from models.student_evaluation import speed_groups
    from models.teachers import TeacherError, get_teacher

    flush_denormals()
    try:
        eager, meta = load_student(args.ckpt)
        compiled, _ = load_student(args.ckpt)
        data = LabelledStructures.load(args.labels)
    except (CheckpointError, LabelsError, OSError) as e:
        raise SystemExit(f"student_bench.py: {e}")
    compiled.compile_inference()
    kinds = {"molecules": np.flatnonzero(~data.periodic), "crystals": np.flatnonzero(data.periodic)}
    groups = speed_groups(data, kinds, args.structures)
    teacher = None
    if not args.no_teacher:
        try:
            teacher = get_teacher(meta["teacher"], "cpu")
        except TeacherError as e:
            print(f"student_bench.py: no teacher speed ({e})", file=sys.stderr)
    speed(compiled, None, groups, repeats=1)  # compiles: tens of seconds, untimed
    runs = {"eager": [], "compiled": []}
    teacher_rows = speed(eager, teacher, groups, repeats=1) if teacher is not None else None
    for _ in range(args.repeats):
        for name, model in (("eager", eager), ("compiled", compiled)):
            runs[name].append(speed(model, None, groups, repeats=1))

    def median(name: str, g: int, key: str) -> float:
        return statistics.median(rows[g][key] for rows in runs[name])

    params = sum(p.numel() for p in eager.parameters())
    print(f"`{args.ckpt}`: {eager.config.family} student of {meta['teacher']}, {params:,} parameters, "
          f"{next(eager.parameters()).dtype}; one thread, torch {torch.__version__}; median of {args.repeats} "
          "alternating passes; atoms/s (MD: atom-steps/s)")
    print()
    header = ["structures", "teacher: one at a time / batched"] + [f"{label}: eager / compiled" for label in COLUMNS.values()] \
        + ["compiled against the teacher: one at a time / batched / batched against batched"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for g, name in enumerate(groups):
        cells = [f"{name} ({len(groups[name])})"]
        taught = teacher_rows[g]["teacher_atoms_per_s"] if teacher_rows else None
        taught_batched = teacher_rows[g].get("teacher_batched_atoms_per_s") if teacher_rows else None  # CHGNet batches
        cells.append(f"{taught:,.0f} / {f'{taught_batched:,.0f}' if taught_batched else '–'}" if taught else "–")
        for key in COLUMNS:
            e, c = median("eager", g, key), median("compiled", g, key)
            cells.append(f"{e:,.0f} / {c:,.0f} (x{c / e:.2f})")
        batched = median("compiled", g, "student_batched_atoms_per_s")
        cells.append(f"x{median('compiled', g, 'student_single_atoms_per_s') / taught:.1f} / x{batched / taught:.1f} / "
                     + (f"x{batched / taught_batched:.1f}" if taught_batched else "–") if taught else "–")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
