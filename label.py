"""Label structures (generated or reference) with a teacher force field into a resumable HDF5 data set.

    python label.py INPUTS... --teacher chgnet|xtb|sevennet|orb-v2|mace-mp|emt --out labels.h5 [--block N]

INPUTS: extxyz/xyz, SDF, CIF, CDVAE CSV (`cif` column) or qm9pack CSV files, directories of them, or `qm9[:split]`.
Output (DESIGN.md, "Data contracts"): OUT (HDF5: energy, forces, stress per structure), and next to it
failed.jsonl (structures that could not be labelled, with the reason), label.log and OUT_STEM.report.json
(the data-set report and its GO / NO-GO verdict). Re-running the same command resumes: keys already in OUT,
or already recorded as failed for OUT (unless --retry-failed), are skipped. A kill loses at most the
block in flight. The key of a structure is "<input path relative to OUT's directory>:<record id>"
(models/structures.py).

Several processes: `--shard I/N` labels the keys whose hash falls in shard I (under torchrun, RANK / WORLD_SIZE
pick the shard and each rank writes OUT_STEM.shardIofN.h5); then `label.py --merge SHARDS... --out OUT`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from models.structures import Failure, check_structure, fingerprint, iter_structures
from models.teachers import TEACHERS, LabelsError, LabelWriter, TeacherError, UnsupportedElements, get_teacher, read_labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("inputs", nargs="*", help="structure files (extxyz, xyz, sdf, cif, csv), directories of them, or qm9[:train|valid|test]")
    p.add_argument("--generate", default=None, metavar="CKPT", help="also sample --n-generate molecules from this train.py checkpoint and label them")
    p.add_argument("--n-generate", type=int, default=1000, help="molecules to sample with --generate")
    p.add_argument("--steps", type=int, default=50, help="ODE steps of --generate sampling")
    p.add_argument("--seed", type=int, default=0, help="seed of --generate sampling")
    p.add_argument("--teacher", required=True, choices=sorted(TEACHERS), help="teacher force field")
    p.add_argument("--out", default="labels.h5", help="labels HDF5 file; failed.jsonl, label.log and OUT_STEM.report.json go next to it")
    p.add_argument("--shard", default=None, help="I/N: label only shard I of N (by a hash of the key); default under torchrun: RANK/WORLD_SIZE")
    p.add_argument("--merge", action="store_true", help="INPUTS are labels files (shards) of one teacher: append their records to OUT, skipping keys already there")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="skip structures already in OUT (default); --no-resume deletes OUT and its failures and starts over")
    p.add_argument("--retry-failed", action="store_true", help="on resume, try again the structures recorded in failed.jsonl")
    p.add_argument("--block", type=int, default=64, help="structures per written block (a kill loses at most one block)")
    p.add_argument("--limit", type=int, default=0, help="label at most N new structures in this run (0: all)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="device of torch teachers (default: cuda if available)")
    p.add_argument("--source", default=None, help="`source` recorded for every structure (default: <parent dir>/<file name>)")
    p.add_argument("--min-dist", type=float, default=0.5, help="fail structures with two atoms closer than this (A, periodic images included; 0: off)")
    p.add_argument("--isolated-dist", type=float, default=4.0, help="fail structures with an atom that has no neighbour within this (A; 0: off)")
    p.add_argument("--min-success", type=float, default=0.95, help="GO threshold: fraction of structures labelled")
    p.add_argument("--min-entropy", type=float, default=3.07, help="GO threshold: Shannon entropy of the element distribution (bits)")
    p.add_argument("--min-elements", type=int, default=9, help="GO threshold: number of distinct elements")
    p.add_argument("--min-size-cv", type=float, default=0.5, help="GO threshold: coefficient of variation of atoms per structure (must exceed)")
    p.add_argument("--min-rate", type=float, default=100.0, help="GO threshold: structures per hour measured in this run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.inputs and not args.generate:
        p.error("give INPUTS and / or --generate CKPT")
    if args.shard:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
            p.error(f"--shard {args.shard}: expected I/N with 0 <= I < N, e.g. 0/4")
    return args


def generate(args, out: Path, device: str) -> str:
    """Sample molecules once into OUT's directory (atomic write) and return that file, which is then labelled
    like any input: a resumed run finds the file and does not sample again, so keys stay the same."""
    ckpt_path = Path(args.generate)
    path = out.parent / f"generated_{ckpt_path.parent.name}_n{args.n_generate}_steps{args.steps}_seed{args.seed}.extxyz"
    if not path.exists():
        import ase.io
        import torch

        from models.checkpoint import load_checkpoint
        from models.data import atomic_write
        from sample import sample_molecules

        ckpt = load_checkpoint(ckpt_path)
        dev = torch.device(device)
        structures = sample_molecules(ckpt, args.n_generate, args.steps, "heun", 1000 if dev.type == "cuda" else 100, args.seed, dev)
        atomic_write(path, lambda tmp: ase.io.write(tmp, structures, format="extxyz"))
    return str(path)


class Log:
    """Lines to label.log (always) and to stderr (unless quiet), without breaking the progress bar."""

    def __init__(self, path: Path):
        self.f = open(path, "a")

    def __call__(self, msg: str, quiet: bool = False):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        self.f.write(line + "\n")
        self.f.flush()
        if not quiet:
            from tqdm import tqdm
            tqdm.write(msg, file=sys.stderr)


def read_failed(path: Path, out_name: str) -> dict[str, dict]:
    """Failure records of this labels file (failed.jsonl may be shared by several files in one directory)."""
    failed = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
            if rec.get("out") == out_name:
                failed[rec["key"]] = rec
    return failed


def report(out: Path, failed: dict, n_new: int, atoms_new: int, seconds: float, args, extra: dict | None = None) -> dict:
    """Data-set statistics over the whole file (all runs), throughput over this run, and the verdict."""
    lab = read_labels(out)
    S = len(lab["key"])
    F = len(set(failed) - set(lab["key"]))
    counts = np.bincount(lab["numbers"].astype(np.int64)) if S else np.zeros(1)
    p = counts[counts > 0] / max(counts.sum(), 1)
    sizes = lab["n_atoms"].astype(np.float64)
    fps = [fingerprint(lab["numbers"][o:o + n], lab["positions"][o:o + n], c, pb)
           for o, n, c, pb in zip(lab["offset"], lab["n_atoms"], lab["cell"], lab["pbc"])]
    r = {
        "out": str(out), "teacher": lab["attrs"]["teacher"], "teacher_version": lab["attrs"]["teacher_version"],
        "labelled": S, "failed": F, "success_rate": S / (S + F) if S + F else float("nan"),
        "labelled_this_run": n_new, "seconds_this_run": seconds,
        "structures_per_hour": 3600 * n_new / seconds if n_new and seconds > 0 else float("nan"),
        "atoms_per_second": atoms_new / seconds if n_new and seconds > 0 else float("nan"),
        "element_entropy_bits": float(-(p * np.log2(p)).sum()) if S else 0.0,
        "elements": int((counts > 0).sum()) if S else 0,
        "size_cv": float(sizes.std() / sizes.mean()) if S else float("nan"),
        "duplicates": S - len(set(fps)),  # same composition + geometry rounded to 0.01 A (models.structures.fingerprint)
        "duplicate_keys": S - len(set(lab["key"].tolist())),
        "failures_by_kind": dict(Counter(rec.get("kind", "?") for k, rec in failed.items() if k not in set(lab["key"]))),
        **(extra or {}),
    }
    checks = {
        "success_rate": r["success_rate"] >= args.min_success,
        "element_entropy_bits": r["element_entropy_bits"] >= args.min_entropy,
        "elements": r["elements"] >= args.min_elements,
        "size_cv": r["size_cv"] > args.min_size_cv,
        # nothing computed in this run (all resumed): the rate is unknown and does not decide the verdict
        "structures_per_hour": True if math.isnan(r["structures_per_hour"]) else r["structures_per_hour"] >= args.min_rate,
    }
    r["checks"] = checks
    r["verdict"] = "GO" if all(checks.values()) else "NO-GO"
    return r


def format_report(r: dict, args) -> str:
    thr = {"success_rate": f">= {args.min_success:.0%}", "element_entropy_bits": f">= {args.min_entropy}",
           "elements": f">= {args.min_elements}", "size_cv": f"> {args.min_size_cv}", "structures_per_hour": f">= {args.min_rate:g}"}
    lines = [f"{'metric':<24}{'value':>14}  {'threshold':<10} ok"]
    for k in ["labelled", "failed", "success_rate", "labelled_this_run", "structures_per_hour", "atoms_per_second",
              "element_entropy_bits", "elements", "size_cv", "duplicates", "duplicate_keys"]:
        v = r[k]
        s = f"{v:.1%}" if k == "success_rate" and not math.isnan(v) else (f"{v:,.3f}" if isinstance(v, float) else f"{v:,}")
        ok = {True: "yes", False: "NO"}[r["checks"][k]] if k in r["checks"] else ""
        lines.append(f"{k:<24}{s:>14}  {thr.get(k, ''):<10} {ok}")
    lines.append(f"verdict: {r['verdict']}  (teacher {r['teacher']}, {r['teacher_version']})")
    return "\n".join(lines)


def merge(shards: list[str], out: Path, teacher: str) -> None:
    """Append the records of labels files (shards of one teacher) to out, skipping keys already there."""
    from models.teachers import Teacher

    first = read_labels(shards[0])["attrs"]
    if first["teacher"] != teacher:
        raise LabelsError(f"{shards[0]} was labelled by {first['teacher']!r}, not --teacher {teacher!r}")
    writer = LabelWriter(out, Teacher(first["teacher"], first["teacher_version"], calc=None))  # refuses another teacher
    keys = writer.keys()
    for path in shards:
        lab = read_labels(path)
        if lab["attrs"]["teacher"] != first["teacher"]:
            raise LabelsError(f"{path} was labelled by {lab['attrs']['teacher']!r}, {shards[0]} by {first['teacher']!r}; cannot merge")
        rows = []
        for s, key in enumerate(lab["key"]):
            if key in keys:
                continue
            keys.add(key)
            o, n = lab["offset"][s], lab["n_atoms"][s]
            rows.append(dict(numbers=lab["numbers"][o:o + n], positions=lab["positions"][o:o + n], forces=lab["forces"][o:o + n],
                             **{k: lab[k][s] for k in ("energy", "stress", "cell", "pbc", "source", "key")}))
        for b in range(0, len(rows), 4096):
            writer.append(rows[b:b + 4096])
    print(f"merged {len(shards)} files into {out}: {len(writer)} structures")


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shard = args.shard or (f"{os.environ['RANK']}/{os.environ['WORLD_SIZE']}" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None)
    if shard and not args.shard:  # torchrun: one output per rank, merged afterwards with --merge
        i, n = map(int, shard.split("/"))
        out = out.with_name(f"{out.stem}.shard{i}of{n}{out.suffix}")
    failed_path, report_path = out.parent / "failed.jsonl", out.parent / f"{out.stem}.report.json"
    if args.merge:
        merge(args.inputs, out, args.teacher)
        failed = {}  # the shards' failures, so the merged report's success rate covers every input
        for shard in args.inputs:
            failed.update(read_failed(Path(shard).parent / "failed.jsonl", Path(shard).name))
        r = report(out, failed, 0, 0, 0.0, args)
        report_path.write_text(json.dumps(r, indent=2))
        print(format_report(r, args))
        return r
    log = Log(out.parent / "label.log")
    log(f"label.py {' '.join(sys.argv[1:] if argv is None else argv)}", quiet=True)

    if not args.resume:
        if out.exists():
            log(f"--no-resume: deleting {out} and its failure records")
            out.unlink()
        if failed_path.exists():
            keep = [l for l in failed_path.read_text().splitlines() if f'"out": "{out.name}"' not in l]
            failed_path.write_text("".join(l + "\n" for l in keep))

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
    writer = LabelWriter(out, teacher)  # refuses a file labelled by another teacher
    t_load = time.time() - t0
    log(f"teacher {teacher.name} ({teacher.version}) on {device}, loaded in {t_load:.1f} s")

    done = writer.keys()
    failed = read_failed(failed_path, out.name)
    skip = done | (set() if args.retry_failed else set(failed))
    t_read = time.time()
    inputs = args.inputs + ([generate(args, out, device)] if args.generate else [])
    records = list(iter_structures(inputs, anchor=out.parent))
    t_read = time.time() - t_read
    todo, seen = [], set(skip)
    for key, source, atoms in records:
        if key not in seen:  # also drops an input given twice
            seen.add(key)
            todo.append((key, args.source or source, atoms))
    if shard:
        i, n = map(int, shard.split("/"))
        todo = [t for t in todo if int(hashlib.sha1(t[0].encode()).hexdigest()[:8], 16) % n == i]
    if args.limit:
        todo = todo[: args.limit]
    log(f"{len(records)} input structures (read in {t_read:.1f} s), {len(done)} already labelled, {len(failed)} recorded failures, {len(todo)} to do")

    from tqdm import tqdm

    block, n_new, atoms_new, n_fail, t_teacher = [], 0, 0, 0, 0.0
    t_start = time.time()
    ff = open(failed_path, "a")

    def fail(key, source, kind, reason):
        """kind: input (unreadable), check (failed a structure check), unsupported (elements), teacher (it raised),
        non-finite (NaN / Inf labels)."""
        nonlocal n_fail
        n_fail += 1
        rec = {"key": key, "source": source, "kind": kind, "reason": reason, "teacher": teacher.name, "out": out.name,
               "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        failed[key] = rec
        ff.write(json.dumps(rec) + "\n")
        ff.flush()
        log(f"failed {key}: {reason}", quiet=True)

    def commit():
        nonlocal block
        n = writer.append(block)
        log(f"committed block of {len(block)}: {n} structures in {out}", quiet=True)
        block = []

    bar = tqdm(todo, desc=f"label {teacher.name}", unit="struct", disable=args.no_progress, dynamic_ncols=True)
    try:
        for key, source, atoms in bar:
            if isinstance(atoms, Failure):
                fail(key, source, "input", atoms.reason)
                continue
            why = check_structure(atoms, args.min_dist, args.isolated_dist)
            if why:
                fail(key, source, "check", why)
                continue
            # The teacher sees exactly the float32 positions and cell that are stored, so labels and
            # stored geometry agree bit for bit.
            atoms = atoms.copy()
            atoms.positions = atoms.positions.astype(np.float32).astype(np.float64)
            atoms.cell = atoms.cell.array.astype(np.float32).astype(np.float64)
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
            if len(block) >= args.block:
                commit()
            bar.set_postfix(failed=n_fail)
        commit()
    except KeyboardInterrupt:
        commit()  # keep the structures already computed
        log(f"interrupted; {len(writer)} structures in {out}; run the same command again to resume")
        raise SystemExit(130)
    finally:
        bar.close()
        ff.close()
    seconds = time.time() - t_start

    r = report(out, failed, n_new, atoms_new, seconds, args,
               extra={"teacher_load_seconds": t_load, "read_seconds": t_read, "teacher_seconds": t_teacher,
                      # the pipeline's own cost (checks, float32 rounding, HDF5 writes, failure records) per labelled structure
                      "overhead_fraction": (seconds - t_teacher) / seconds if seconds > 0 else float("nan"), "device": device})
    report_path.write_text(json.dumps(r, indent=2))
    log(format_report(r, args))
    log(f"labelled {n_new} structures ({atoms_new} atoms) in {seconds:.1f} s: {r['structures_per_hour']:,.0f} structures/hour, "
        f"{r['atoms_per_second']:,.1f} atoms/s, {r['overhead_fraction']:.1%} of the time outside the teacher; {n_fail} failed (see {failed_path}); report {report_path}")
    return r


if __name__ == "__main__":
    try:
        main()
    except (TeacherError, LabelsError) as e:
        sys.exit(f"error: {e}")
