"""Shared fixtures: a QM9 cache built from the small real fixture (300 real QM9 molecules), so no test
needs the full data set or a download."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests import models/ the way the scripts do: from the repository root

from models.data import read_qm9pack_csv, save_cache  # noqa: E402

QM9_FIXTURE = ROOT / "tests" / "data" / "qm9_sample.csv"


@pytest.fixture(scope="session")
def qm9_dir(tmp_path_factory) -> Path:
    """A data dir whose qm9.npz holds the fixture molecules; pass it as --data-dir / data_dir."""
    d = tmp_path_factory.mktemp("qm9")
    save_cache(read_qm9pack_csv([QM9_FIXTURE]), d / "qm9.npz")
    return d
