"""The labels data set's report (label.py report, and the end of every labelling run) and the failure records
kept beside a labels file (OUT_STEM.failed.jsonl).

The report joins any labels files (one teacher each, any teachers): sizes, elements, duplicates, failures by kind,
throughput from each file's label_seconds, and a GO / NO-GO verdict against thresholds (an object with min_success,
min_entropy, min_elements, min_size_cv and min_rate: label.py's flags).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from models.fileio import atomic_write
from models.labels import read_labels
from models.structures import fingerprint


def failures_path(out: Path) -> Path:
    """Where the structures that could not be labelled into OUT are recorded: OUT_STEM.failed.jsonl."""
    return Path(out).with_name(Path(out).stem + ".failed.jsonl")


def read_failed(out: Path) -> dict[str, dict]:
    """Failure records of a labels file, by key (the last record of a key wins)."""
    failed, path = {}, failures_path(out)
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: ignore it
                continue
            failed[rec["key"]] = rec
    return failed


def write_failed(out: Path, records) -> None:
    """Rewrite OUT's failure records atomically (a kill leaves the old list or the new one)."""
    atomic_write(failures_path(out), lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))


def dataset_report(files: list[Path], thresholds) -> dict:
    """Statistics of the union of labels files (one teacher each, any teachers), the failures recorded for each
    in the failed.jsonl next to it, throughput from each file's `label_seconds`, and the verdict."""
    rows, numbers, sizes, fps, failures = [], [], [], [], Counter()
    for path in map(Path, files):
        lab = read_labels(path)
        keys = set(lab["key"].tolist())
        failed = [rec for k, rec in read_failed(path).items() if k not in keys]  # labelled by a later run: no failure
        failures.update(rec.get("kind", "?") for rec in failed)
        S, F, secs = len(lab["key"]), len(failed), float(lab["attrs"].get("label_seconds", math.nan))
        rows.append({"file": str(path), "teacher": lab["attrs"]["teacher"], "teacher_version": lab["attrs"]["teacher_version"],
                     "labelled": S, "failed": F, "label_seconds": secs, "atoms": int(lab["n_atoms"].sum()),
                     "duplicate_keys": S - len(keys)})
        numbers.append(lab["numbers"].astype(np.int64))
        sizes.append(lab["n_atoms"].astype(np.float64))
        fps += [fingerprint(lab["numbers"][o:o + n], lab["positions"][o:o + n], c, pb)
                for o, n, c, pb in zip(lab["offset"], lab["n_atoms"], lab["cell"], lab["pbc"])]
    for row in rows:
        row.update(_rates(row["labelled"], row["failed"], row["atoms"], row["label_seconds"]))
    S, F = sum(r["labelled"] for r in rows), sum(r["failed"] for r in rows)
    numbers, sizes = np.concatenate(numbers), np.concatenate(sizes)
    counts = np.bincount(numbers) if S else np.zeros(1)
    p = counts[counts > 0] / max(counts.sum(), 1)
    r = {
        "files": rows, "teachers": sorted({row["teacher"] for row in rows}),
        "labelled": S, "failed": F,
        **_rates(S, F, int(sizes.sum()), sum(row["label_seconds"] for row in rows)),
        "element_entropy_bits": float(-(p * np.log2(p)).sum()) if S else 0.0,
        "elements": int((counts > 0).sum()) if S else 0,
        "size_cv": float(sizes.std() / sizes.mean()) if S else math.nan,
        "duplicates": S - len(set(fps)),  # same composition + geometry rounded to 0.01 A (models.structures.fingerprint)
        "duplicate_keys": sum(row["duplicate_keys"] for row in rows),
        "failures_by_kind": dict(failures),
    }
    checks = {
        "success_rate": r["success_rate"] >= thresholds.min_success,
        "element_entropy_bits": r["element_entropy_bits"] >= thresholds.min_entropy,
        "elements": r["elements"] >= thresholds.min_elements,
        "size_cv": r["size_cv"] > thresholds.min_size_cv,
        "structures_per_hour": r["structures_per_hour"] >= thresholds.min_rate,
    }  # a value that cannot be computed (NaN: nothing labelled, no labelling time) fails its check
    r["checks"] = checks
    r["verdict"] = "GO" if all(checks.values()) else "NO-GO"
    return r


def _rates(labelled: int, failed: int, atoms: int, seconds: float) -> dict:
    ok = labelled > 0 and seconds > 0
    return {"success_rate": labelled / (labelled + failed) if labelled + failed else math.nan,
            "label_seconds": seconds,
            "structures_per_hour": 3600 * labelled / seconds if ok else math.nan,
            "atoms_per_second": atoms / seconds if ok else math.nan}


def format_number(key: str, v) -> str:
    """A report's value as the tables print it (n/a for NaN)."""
    if isinstance(v, float) and math.isnan(v):
        return "n/a"
    if key == "success_rate":
        return f"{v:.1%}"
    if key in ("structures_per_hour", "atoms_per_second", "structures_per_hour_this_run"):
        return f"{v:,.0f}"
    return f"{v:,.3f}" if isinstance(v, float) else f"{v:,}"


def format_report(r: dict, thresholds) -> str:
    """The report as label.py prints it: per-file rows (several files), each metric beside its threshold, the verdict."""
    lines = []
    if len(r["files"]) > 1:
        lines.append(f"{'file':<40}{'teacher':<10}{'labelled':>10}{'failed':>8}{'success':>9}{'structures/h':>14}{'atoms/s':>10}")
        for row in r["files"]:
            lines.append(f"{row['file'][-39:]:<40}{row['teacher']:<10}{row['labelled']:>10,}{row['failed']:>8,}"
                         f"{format_number('success_rate', row['success_rate']):>9}{format_number('structures_per_hour', row['structures_per_hour']):>14}"
                         f"{format_number('atoms_per_second', row['atoms_per_second']):>10}")
        lines.append("")
    thr = {"success_rate": f">= {thresholds.min_success:.0%}", "element_entropy_bits": f">= {thresholds.min_entropy}",
           "elements": f">= {thresholds.min_elements}", "size_cv": f"> {thresholds.min_size_cv}", "structures_per_hour": f">= {thresholds.min_rate:g}"}
    lines.append(f"{'metric':<30}{'value':>14}  {'threshold':<10} ok")
    for k in ["labelled", "failed", "success_rate", "structures_per_hour", "atoms_per_second", "labelled_this_run",
              "structures_per_hour_this_run", "element_entropy_bits", "elements", "size_cv", "duplicates", "duplicate_keys"]:
        if k in r:
            ok = {True: "yes", False: "NO"}[r["checks"][k]] if k in r["checks"] else ""
            lines.append(f"{k:<30}{format_number(k, r[k]):>14}  {thr.get(k, ''):<10} {ok}")
    teachers = ", ".join(sorted({f"{row['teacher']}: {row['teacher_version']}" for row in r["files"]}))
    lines.append(f"verdict: {r['verdict']}  (teachers {teachers})")
    return "\n".join(lines)
