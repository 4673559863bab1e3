"""What the evaluations of every domain share (evaluate.py; models/molecule_evaluation.py, crystal_evaluation.py and
student_evaluation.py): the fixed test subset of a reference row, and the metrics JSON.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from models.fileio import atomic_write


def reference_subset(n: int, n_test: int | None) -> list[int]:
    """The test structures a reference row scores, of n: with --n-test, the same random n_test every time (seed 0),
    in their file order, so that the row can have a model row's sample count; all without it."""
    if n_test is None or n_test >= n:
        return list(range(n))
    return sorted(np.random.default_rng(0).choice(n, n_test, replace=False).tolist())


def _nan_to_none(v):
    if isinstance(v, dict):
        return {k: _nan_to_none(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_nan_to_none(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_metrics(path: Path, result: dict) -> None:
    """The metrics JSON, written atomically (models/fileio.py; a full disk raises DiskFull naming the file). JSON has
    no NaN: undefined metrics (and other non-finite values) are written as null."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(_nan_to_none(result), indent=2) + "\n"))
