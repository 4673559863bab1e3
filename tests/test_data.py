import io
import tarfile

import numpy as np
import pytest
import torch

from conftest import QM9_FIXTURE
from models.molecules import (DataError, PaddedMolecules, load_cache, load_qm9, parse_qm9_xyz, read_qm9_tarball,
                         read_qm9pack_csv, split_indices)


def test_fixture_reads_real_molecules():
    mols = read_qm9pack_csv([QM9_FIXTURE])
    assert len(mols) == 300
    assert set(np.unique(mols.numbers)) <= {1, 6, 7, 8, 9}
    assert mols.n_atoms.max() <= 29 and mols.offset[-1] + mols.n_atoms[-1] == len(mols.numbers)
    assert np.all(np.diff(mols.ids) > 0)  # sorted by QM9 index
    numbers, pos = mols[0]
    assert len(numbers) == mols.n_atoms[0] and pos.shape == (len(numbers), 3)
    # QM9 index 703 (C1CC1N1CC1) as qm9pack has it, in EDM's units: alpha, gap, homo, lumo (meV), mu, Cv
    assert mols.ids[0] == 703
    assert np.allclose(mols.properties[0], [56.86, 0.3114 * 27211.386, -0.2188 * 27211.386, 0.0925 * 27211.386, 1.0782, 22.08])
    assert np.isfinite(mols.properties).all() and (mols.property_values("alpha") > 0).all()


def test_split_sizes_and_determinism():
    full = split_indices(130_831)
    assert {k: len(v) for k, v in full.items()} == {"train": 100_000, "valid": 17_748, "test": 13_083}
    assert len(np.unique(np.concatenate(list(full.values())))) == 130_831
    again = split_indices(130_831)
    assert all(np.array_equal(full[k], again[k]) for k in full)
    small = split_indices(300)
    assert sum(len(v) for v in small.values()) == 300 and len(small["test"]) == 30


def test_cache_roundtrip_and_splits(qm9_dir):
    cached = load_cache(qm9_dir / "qm9.npz")
    direct = read_qm9pack_csv([QM9_FIXTURE])
    assert np.array_equal(cached.numbers, direct.numbers) and np.array_equal(cached.positions, direct.positions)
    assert list(cached.smiles) == list(direct.smiles) and np.array_equal(cached.properties, direct.properties)
    parts = [load_qm9(s, qm9_dir) for s in ("train", "valid", "test")]
    ids = np.concatenate([p.ids for p in parts])
    assert len(ids) == 300 and len(np.unique(ids)) == 300


def test_padded_batches_are_centred_and_masked(qm9_dir):
    mols = load_qm9("train", qm9_dir)
    data = PaddedMolecules(mols, n_max=29)
    batch = data.batch(torch.arange(8))
    assert batch["pos"].shape == (8, 29, 3) and batch["types"].shape == (8, 29)
    assert torch.equal(batch["mask"].sum(1), torch.from_numpy(mols.n_atoms[:8]).long())
    assert batch["pos"].sum(1).abs().max() < 1e-4  # zero centre of geometry
    assert (batch["pos"][~batch["mask"]] == 0).all() and (batch["types"][~batch["mask"]] == 0).all()
    # the geometry is the source's, only shifted
    numbers, pos = mols[3]
    p = batch["pos"][3][: len(numbers)].numpy()
    assert np.allclose(p - p[0], pos - pos[0], atol=1e-5)
    hist = mols.n_atoms_histogram()
    assert abs(hist.sum() - 1) < 1e-12 and hist[mols.n_atoms.max()] > 0


def _with_row(tmp_path, line, **fields):
    """A copy of the fixture whose data row at file line `line` has `fields` replaced."""
    import csv
    with open(QM9_FIXTURE, newline="") as f:
        rows = list(csv.DictReader(f))
    rows[line - 2].update(fields)
    out = tmp_path / "bad.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return out


@pytest.mark.parametrize("fields,problem", [
    (dict(Elements="['C','H']", XYZ_Ang="[[0.0,nan,1.0],[1.0,1.0,1.0]]"), "non-finite"),
    (dict(Elements="['C']", XYZ_Ang="[[0.0,zero,1.0]]"), "malformed"),
    (dict(Elements="['C','Xx']", XYZ_Ang="[[0.0,0.0,0.0],[1.5,0.0,0.0]]"), "unknown element"),
    (dict(Elements="['C','H']", XYZ_Ang="[[0.0,0.0,0.0],[0.1,0.0,0.0]]"), "overlap"),
    (dict(Elements="['C','H']", XYZ_Ang="[[0.0,0.0,0.0],[1.0,1.0]]"), "not a multiple of 3"),
    (dict(Elements="['C','H','H']", XYZ_Ang="[[0.0,0.0,0.0],[1.0,1.0,1.0]]"), "3 elements but coordinates"),
])
def test_bad_rows_name_file_and_row(tmp_path, fields, problem):
    bad = _with_row(tmp_path, 5, **fields)
    with pytest.raises(DataError) as e:
        read_qm9pack_csv([bad])
    msg = str(e.value)
    assert str(bad) in msg and "line 5" in msg and problem in msg


def test_empty_and_foreign_csv(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="not a qm9pack CSV"):
        read_qm9pack_csv([empty])
    header_only = tmp_path / "header.csv"
    header_only.write_text(QM9_FIXTURE.read_text().splitlines()[0] + "\n")
    with pytest.raises(DataError, match="no molecules"):
        read_qm9pack_csv([header_only])


def _qm9_xyz_text(index, numbers, pos, smiles):
    """One molecule in the original QM9 release's .xyz layout (with a Mathematica exponent)."""
    symbols = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
    lines = [str(len(numbers)), f"gdb {index}\t157.7\t157.7\t157.7\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.36\t0.04\t-40.4\t-40.4\t-40.4\t-40.4\t6.4"]
    for z, (x, y, c) in zip(numbers, pos):
        lines.append(f"{symbols[int(z)]}\t{x:.10f}\t{y:.10f}\t{c:.10f}*^0\t-0.5")
    lines += ["1341.3\t1562.6", f"{smiles}\t{smiles}", "InChI=1S/x\tInChI=1S/x"]
    return "\n".join(lines) + "\n"


def test_original_release_tarball(tmp_path):
    """The download path's parser on a local archive in the original format, with an excluded molecule."""
    mols = read_qm9pack_csv([QM9_FIXTURE]).subset(range(5))
    tar_path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(tar_path, "w:bz2") as tar:
        for i in range(5):
            text = _qm9_xyz_text(mols.ids[i], *mols[i], mols.smiles[i]).encode()
            info = tarfile.TarInfo(f"dsgdb9nsd_{mols.ids[i]:06d}.xyz")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    excluded = tmp_path / "uncharacterized.txt"
    excluded.write_text(f"header line\n  Index  foo\n{mols.ids[2]}  x y z\n")
    got = read_qm9_tarball(tar_path, excluded)
    assert list(got.ids) == [mols.ids[i] for i in (0, 1, 3, 4)]
    assert np.allclose(got[2][1], mols[3][1], atol=1e-6) and np.array_equal(got[2][0], mols[3][0])
    # the header's properties in EDM's units (alpha, gap, homo, lumo, mu, Cv): Hartree -> meV for the orbital energies
    assert np.allclose(got.properties[0], [13.21, 0.5048 * 27211.386, -0.3877 * 27211.386, 0.1171 * 27211.386, 0.0, 6.4])
    # and through load_qm9's download code, from a local URL, into a fresh cache
    import models.molecules as data
    data_dir = tmp_path / "dl"
    orig = (data.QM9_XYZ_URL, data.QM9_EXCLUDED_URL)
    data.QM9_XYZ_URL, data.QM9_EXCLUDED_URL = tar_path.as_uri(), excluded.as_uri()
    try:
        loaded = load_qm9(None, data_dir, source="download")
    finally:
        data.QM9_XYZ_URL, data.QM9_EXCLUDED_URL = orig
    assert list(loaded.ids) == list(got.ids) and (data_dir / "qm9.npz").exists()


def test_corrupt_tarball_and_record(tmp_path):
    broken = tmp_path / "broken.tar.bz2"
    broken.write_bytes(b"BZh91AY&SY not really bzip2")
    with pytest.raises(DataError, match="broken.tar.bz2"):
        read_qm9_tarball(broken, None)
    with pytest.raises(DataError, match="rec.xyz: malformed"):
        parse_qm9_xyz("3\ngdb 1\nC 0 0 0\n", "rec.xyz")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing array", "old version", "inconsistent"])
def test_damaged_cache_is_named_and_rebuilt(tmp_path, monkeypatch, capsys, damage):
    """A damaged or stale data/qm9.npz is reported by name and rebuilt from the source (here the fixture CSV standing
    in for qm9pack's files); the rebuilt cache equals a fresh one."""
    import models.molecules as data
    from models.fileio import save_npz

    monkeypatch.setattr(data, "qm9pack_csv_files", lambda: [QM9_FIXTURE])
    good = load_qm9(None, tmp_path)
    cache = tmp_path / "qm9.npz"
    with np.load(cache) as z:
        arrays = dict(z)
    if damage == "truncated":
        cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    elif damage == "garbage":
        cache.write_bytes(b"not a zip file at all")
    elif damage == "missing array":
        save_npz(cache, {k: v for k, v in arrays.items() if k != "positions"})
    elif damage == "old version":
        save_npz(cache, {**arrays, "version": np.array(0)})
    else:
        save_npz(cache, {**arrays, "offset": arrays["offset"][:-1]})
    with pytest.raises(DataError, match="qm9.npz"):
        load_cache(cache)
    again = load_qm9("train", tmp_path)
    err = capsys.readouterr().err
    assert "qm9.npz" in err and "rebuilding" in err
    assert np.array_equal(again.ids, good.subset(split_indices(len(good))["train"]).ids)
    assert np.array_equal(load_cache(cache).positions, good.positions)  # the rebuilt cache is whole again
