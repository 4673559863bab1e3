"""Molecule metrics (models/molecule_metrics.py) and evaluate.py (models/molecule_evaluation.py), on 300 real QM9
molecules (tests/data/qm9_sample.csv).

evaluate.py runs on `qm9_dir` (conftest.py): a QM9 cache of the fixture molecules, so no test needs the full
data set; its EDM-style split gives 229 train, 41 valid and 30 test molecules.
"""
import json
import math
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from conftest import run_script
from models import molecule_metrics as metrics
from models.fileio import DataError
from models.molecule_evaluation import read_samples, score_molecules
from models.molecules import read_qm9pack_csv

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "qm9_sample.csv"


@pytest.fixture(scope="module")
def mols():
    return read_qm9pack_csv([FIXTURE])


def test_fixture_is_real_qm9(mols):
    assert len(mols) == 300
    assert set(np.unique(mols.numbers)) <= {1, 6, 7, 8, 9}
    assert 3 <= mols.n_atoms.min() and mols.n_atoms.max() <= 29


def test_bond_order_known_distances():
    C, H, N, O = 6, 1, 7, 8
    assert metrics.bond_order(C, C, 1.54) == 1
    assert metrics.bond_order(C, C, 1.34) == 2
    assert metrics.bond_order(C, C, 1.20) == 3
    assert metrics.bond_order(C, C, 3.00) == 0
    assert metrics.bond_order(C, H, 1.09) == 1 and metrics.bond_order(H, C, 1.09) == 1
    assert metrics.bond_order(C, O, 1.21) == 2 and metrics.bond_order(N, N, 1.10) == 3
    assert metrics.bond_order(C, 17, 1.70) == 0  # chlorine: not a QM9 element, never bonded


def test_vectorised_bond_orders_match_scalar():
    rng = np.random.default_rng(0)
    z = rng.choice([1, 6, 7, 8, 9], size=12)
    x = rng.uniform(0, 3.0, size=(12, 3))
    orders = metrics.bond_orders(z, x)
    for i in range(12):
        for j in range(12):
            expected = 0 if i == j else metrics.bond_order(z[i], z[j], np.linalg.norm(x[i] - x[j]))
            assert orders[i, j] == expected


def test_real_molecules_are_stable_and_valid(mols):
    results = [metrics.stability(*mols[i]) for i in range(len(mols))]
    assert np.mean([r[0] for r in results]) >= 0.90
    assert sum(r[1] for r in results) / sum(r[2] for r in results) >= 0.98
    assert np.mean([metrics.smiles_of(*mols[i]) is not None for i in range(len(mols))]) >= 0.95


def test_distorted_molecules_are_unstable(mols):
    rng = np.random.default_rng(0)
    scaled = [metrics.stability(z, 1.3 * x)[0] for z, x in (mols[i] for i in range(len(mols)))]
    noisy = [metrics.stability(z, x + rng.normal(0, 0.3, x.shape))[0] for z, x in (mols[i] for i in range(len(mols)))]
    assert np.mean(scaled) < 0.1 and np.mean(noisy) < 0.1


def test_degenerate_samples_do_not_crash(mols):
    z, x = mols[0]
    nan_x = x.copy()
    nan_x[0, 1] = np.nan
    n = len(z)
    assert metrics.stability(z, nan_x) == (False, 0, n)
    assert metrics.smiles_of(z, nan_x) is None
    assert metrics.stability(np.zeros(0, int), np.zeros((0, 3))) == (False, 0, 0)
    assert metrics.smiles_of(np.zeros(0, int), np.zeros((0, 3))) is None
    assert metrics.stability([6], [[0.0, 0.0, 0.0]]) == (False, 0, 1)  # a bare carbon has no bonds
    assert metrics.smiles_of([6], [[0.0, 0.0, 0.0]]) == "C"  # ...but RDKit adds implicit H: valid (EDM)
    assert not metrics.stability(z, np.zeros_like(x))[0]  # all atoms on one point
    assert metrics.smiles_of([17, 6], [[0, 0, 0], [1.7, 0, 0]]) is None  # not a QM9 element
    samples = [(z, nan_x), (np.zeros(0, int), np.zeros((0, 3))), (z, np.zeros_like(x)), ([6], [[0.0, 0, 0]])]
    stats = metrics.molecule_statistics(samples)
    assert stats["mol_stable"].tolist() == [False] * 4
    assert stats["smiles"][0] == "" and stats["smiles"][1] == ""


def test_uniqueness_and_novelty_arithmetic(mols):
    a, b, c = mols[0], mols[1], mols[2]
    broken = (a[0], a[1] * 0.5)  # squeezed: over-bonded, fails sanitisation
    stats = metrics.molecule_statistics([a, a, b, c, broken])
    ref = metrics.molecule_statistics([mols[i] for i in range(3, 40)])
    train = {metrics.smiles_of(*a)}  # a is a training molecule, b and c are not
    m = metrics.score(stats, ref, train, fcd=False)
    assert m["validity"] == pytest.approx(4 / 5)
    assert m["uniqueness"] == pytest.approx(3 / 4)  # a, b, c among 4 valid
    assert m["novelty"] == pytest.approx(2 / 3)  # b and c
    assert m["validity_x_uniqueness"] == pytest.approx(3 / 5)
    assert m["n_samples"] == 5 and math.isnan(m["fcd"])
    assert 0 <= m["coverage_precision"] <= 1 and 0 <= m["coverage_recall"] <= 1
    assert m["w1_bond_length"] >= 0 and "C-H" in m["w1_bond_length_by_pair"]
    # identical sets are at distance 0 and fully covered
    same = metrics.score(ref, ref, train, fcd=False)
    assert same["w1_qed"] == 0 and same["w1_bond_angle"] == 0
    assert same["coverage_recall"] == 1 and same["coverage_precision"] == 1


def test_evaluate_molecules_api(mols, tmp_path):
    train = metrics.training_smiles(mols.subset(range(100)), cache_dir=tmp_path, progress=False)
    samples = [mols[i] for i in range(90, 120)]  # 10 of them are in the training molecules
    m = metrics.evaluate_molecules(samples, train, mols.subset(range(150, 300)), fcd=False, progress=False,
                                   cache_dir=tmp_path)
    assert m["n_samples"] == 30 and m["n_ref"] == 150 and 0.5 < m["novelty"] < 1
    assert isinstance(m["mol_stability"], float) and m["mol_stability"] >= 0.8


def test_reference_statistics_cache(mols, tmp_path):
    first = metrics.reference_statistics(mols, n_ref=50, cache_dir=tmp_path, fcd=False, progress=False)
    assert len(list(tmp_path.glob("qm9_ref_50_*.npz"))) == 1
    again = metrics.reference_statistics(mols, n_ref=50, cache_dir=tmp_path, fcd=False, progress=False)
    assert len(first["n_atoms"]) == 50 and (first["smiles"] == again["smiles"]).all()


def test_damaged_statistics_caches_are_recomputed(mols, tmp_path, capsys):
    first = metrics.reference_statistics(mols, n_ref=50, cache_dir=tmp_path, fcd=False, progress=False)
    smiles = metrics.training_smiles(mols.subset(range(40)), cache_dir=tmp_path, progress=False)
    (ref_cache,), (smiles_cache,) = tmp_path.glob("qm9_ref_50_*.npz"), tmp_path.glob("qm9_train_smiles_*.npz")
    ref_cache.write_bytes(ref_cache.read_bytes()[:100])  # truncated
    np.savez(smiles_cache.open("wb"), other=np.zeros(2))  # readable, but without its array
    again = metrics.reference_statistics(mols, n_ref=50, cache_dir=tmp_path, fcd=False, progress=False)
    assert (again["smiles"] == first["smiles"]).all() and np.array_equal(again["bond_length"], first["bond_length"])
    assert metrics.training_smiles(mols.subset(range(40)), cache_dir=tmp_path, progress=False) == smiles
    err = capsys.readouterr().err
    assert ref_cache.name in err and smiles_cache.name in err and "recomputing" in err
    assert metrics._read_cache(ref_cache, metrics.STATISTICS) is not None  # rewritten whole


def test_cache_keys_follow_rdkit_and_fcd_versions(mols, monkeypatch):
    """A new RDKit may canonicalise SMILES differently: its caches must not be read by another version."""
    from importlib import metadata

    before = metrics._content_hash(mols)
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda pkg: "9999.1" if pkg == "rdkit" else real(pkg))
    assert metrics._content_hash(mols) != before


def test_fcd_smoke():
    a = ["CCO", "CCN", "CC(=O)O", "c1ccccc1", "CC#N", "OCC(O)CO", "CC1CC1", "NC=O"]
    b = ["CCC", "CCCl", "CNC", "C1CCOC1", "CC(C)O", "N#CC#N", "OC1CC1", "CC=O"]
    act = metrics.chemnet_activations(a + b)
    mu, sigma = act[len(a):].mean(0), np.cov(act[len(a):].T)
    assert metrics.frechet_chemnet_distance(a, mu, sigma) > 0
    assert abs(metrics.frechet_chemnet_distance(b, mu, sigma)) < 1e-3
    assert math.isnan(metrics.frechet_chemnet_distance(a[:1], mu, sigma))


def test_frechet_distance_matches_fcd_package():
    import fcd

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), 1.5 * rng.normal(size=(30, 6)) + 0.3
    args = x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T)
    assert metrics.frechet_distance(*args) == pytest.approx(fcd.calculate_frechet_distance(*args), rel=1e-6)


def run_evaluate(*args):
    return run_script("evaluate.py", *args, "--no-progress", check=False, timeout=300)


def test_evaluate_end_to_end(mols, qm9_dir, tmp_path):
    frames = [mols.to_atoms(i) for i in range(20)]
    broken = mols.to_atoms(20)
    broken.positions[0] = np.nan
    frames += [broken, ase.Atoms()]
    ase.io.write(tmp_path / "samples.extxyz", frames, format="extxyz")
    with open(tmp_path / "log.jsonl", "w") as f:
        for step in range(0, 100, 10):
            f.write(json.dumps({"step": step, "loss": 1 / (step + 1), "mol_stability": step / 100}) + "\n")
    r = run_evaluate(tmp_path / "samples.extxyz", "--data", "qm9", "--data-dir", qm9_dir, "--no-fcd")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["n_samples"] == 22 and m["fcd"] is None
    assert 17 / 22 <= m["mol_stability"] <= 20 / 22 and m["validity"] <= 21 / 22
    assert m["novelty"] < 1  # the fixture's training split contains some of these molecules
    for name in ("properties.png", "molecules.png", "curves.png", "evaluate.log"):
        assert (tmp_path / name).is_file(), name
    assert "molecules/s" in r.stdout and "mol stab (%)" in r.stdout


def test_reference_row_scores_the_test_set_against_the_validation_split(qm9_dir, tmp_path):
    """evaluate.py --reference qm9, in process: the test molecules themselves, all or a fixed random --n-test."""
    m = score_molecules(None, tmp_path / "ref.json", tmp_path, data_dir=qm9_dir, fcd=False, progress=False)
    assert m["mol_stability"] >= 0.85 and m["validity"] >= 0.9 and m["reference"] == "QM9 validation split"
    assert json.loads((tmp_path / "ref.json").read_text())["n_samples"] == m["n_samples"]
    m7 = score_molecules(None, tmp_path / "ref7.json", tmp_path, data_dir=qm9_dir, fcd=False, n_test=7, progress=False)
    assert m7["n_samples"] == 7 and m7["samples"].startswith("QM9 test set (7 of ") and m["n_samples"] > 7


def test_unreadable_samples_name_the_file_and_the_structure(tmp_path):
    """evaluate.py prints these DataErrors as its error (the hostile table runs it on garbage and empty files)."""
    bad = tmp_path / "bad.extxyz"
    bad.write_text("3\nProperties=species:S:1:pos:R:3\nC 0 0 0\nH 1.0 0\n")
    with pytest.raises(DataError, match="structure 1 .line 1. is not valid extended XYZ") as e:
        read_samples(bad)
    assert str(bad) in str(e.value)
    (tmp_path / "empty.extxyz").write_text("\n")
    with pytest.raises(DataError, match="no structures"):
        read_samples(tmp_path / "empty.extxyz")
