"""label.py: teachers, the labels HDF5 file (round trip, crash safety, resume), bad inputs and the report.

Real structures: QM9 molecules (tests/data/qm9_sample.csv) and CDVAE perov-5 / carbon-24 crystals
(tests/data/*_sample.csv, rows of the real CSVs). Nothing is downloaded."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import ase
import ase.io
import numpy as np
import pytest
from ase.build import bulk, molecule

from conftest import QM9_FIXTURE, ROOT, run_script
from models.molecules import read_qm9pack_csv
from models.structures import check_structure, iter_structures
from models.labels import FORMAT_V1, LabelWriter, LabelsError, read_labels
from models.teachers import Teacher, TeacherError, get_teacher

import label

PEROV = ROOT / "tests" / "data" / "perov5_sample.csv"
CARBON = ROOT / "tests" / "data" / "carbon24_sample.csv"


def qm9_molecules(n, no_fluorine=True):
    mols = read_qm9pack_csv([QM9_FIXTURE])
    out = [mols.to_atoms(i) for i in range(len(mols))]
    return [a for a in out if not no_fluorine or 9 not in a.numbers][:n]


def metals(n=4, seed=0):
    """Small periodic structures of elements EMT knows, slightly rattled (no exact symmetry)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = bulk(["Cu", "Al", "Ni", "Pt"][i % 4], "fcc", a=[3.61, 4.05, 3.52, 3.92][i % 4], cubic=True)
        a = a.repeat((1, 1, 1 + i % 2))
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        out.append(a)
    return out


@pytest.fixture
def lj_teacher(monkeypatch):
    """A second teacher besides EMT for any element: ASE's Lennard-Jones calculator, registered as "lj"."""
    from ase.calculators.lj import LennardJones

    from models import teachers

    monkeypatch.setitem(teachers.TEACHERS, "lj", lambda device: Teacher("lj", f"ase {ase.__version__}", LennardJones(sigma=1.5, rc=6.0)))


def stored_atoms(lab: dict, s: int) -> ase.Atoms:
    """Structure s of a read_labels dict, exactly as stored (float32 geometry)."""
    o, n = lab["offset"][s], lab["n_atoms"][s]
    return ase.Atoms(numbers=lab["numbers"][o:o + n], positions=lab["positions"][o:o + n], cell=lab["cell"][s], pbc=lab["pbc"][s])


def run_label(*args):
    return label.main([str(a) for a in args] + ["--no-progress"])


def write_sdf(path, atoms_list):
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    w = Chem.SDWriter(str(path))
    for a in atoms_list:
        m = Chem.RWMol()
        for z in a.numbers:
            m.AddAtom(Chem.Atom(int(z)))
        conf = Chem.Conformer(len(a))
        for i, p in enumerate(a.positions):
            conf.SetAtomPosition(i, Point3D(*map(float, p)))
        m.AddConformer(conf)
        w.write(m)
    w.close()


def test_emt_round_trip_all_formats(tmp_path):
    """extxyz + SDF + CIF + CDVAE CSV + qm9pack CSV + a directory: every structure once, labels equal a direct call."""
    mols, crystals = qm9_molecules(4), metals(4)
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    ase.io.write(inputs / "mols.extxyz", mols[:2], format="extxyz")
    write_sdf(inputs / "mols.sdf", mols[2:])
    ase.io.write(inputs / "sub" / "metals.cif", crystals, format="cif")
    out = tmp_path / "run" / "labels.h5"
    r = run_label(inputs, CARBON, QM9_FIXTURE, "--teacher", "emt", "--out", out, "--block", "7", "--limit", "40")

    lab = read_labels(out)
    S = len(lab["key"])
    assert r["labelled"] == S and S + r["failed"] == 40
    assert len(set(lab["key"])) == S
    assert {"mols.extxyz", "mols.sdf", "metals.cif", "carbon24_sample.csv", "qm9_sample.csv"} == {s.split("/")[1] for s in lab["source"]}
    assert lab["attrs"]["teacher"] == "emt" and "eV" in lab["attrs"]["units"] and lab["attrs"]["code_version"]
    assert lab["numbers"].dtype == np.int16 and lab["positions"].dtype == np.float32 and lab["energy"].dtype == np.float64
    # Every input structure, read independently, matches its stored record exactly; the labels equal a fresh EMT call.
    by_key = {k: a for k, _, a in iter_structures([str(inputs), str(CARBON), str(QM9_FIXTURE)], anchor=out.parent)}
    emt = get_teacher("emt")
    for s, key in enumerate(lab["key"]):
        o, n = lab["offset"][s], lab["n_atoms"][s]
        a = by_key[key]
        assert np.array_equal(lab["numbers"][o:o + n], a.numbers)
        assert np.array_equal(lab["positions"][o:o + n], a.positions.astype(np.float32))
        assert np.array_equal(lab["cell"][s], a.cell.array.astype(np.float32))
        assert np.array_equal(lab["pbc"][s], a.pbc)
        e, f, st = emt.label(stored_atoms(lab, s))
        assert lab["energy"][s] == e
        assert np.array_equal(lab["forces"][o:o + n], f.astype(np.float32))
        if a.pbc.any():
            assert np.isfinite(lab["stress"][s]).all() and np.allclose(lab["stress"][s], st, atol=1e-6)
        else:
            assert np.isnan(lab["stress"][s]).all()
    # the report: entropy and size CV recomputed by hand
    counts = np.bincount(lab["numbers"])
    p = counts[counts > 0] / counts.sum()
    assert r["element_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum())
    assert r["size_cv"] == pytest.approx(lab["n_atoms"].std() / lab["n_atoms"].mean())
    assert json.loads((out.parent / "labels.report.json").read_text())["verdict"] == r["verdict"] == "NO-GO"  # only ~5 elements
    assert (out.parent / "label.log").read_text().count("committed block") >= S // 7


def test_perturb_writes_compressed_and_rattled_copies_without_the_inputs_labels(tmp_path):
    """label.py perturb: --copies copies of each input, a crystal's cell (fractional coordinates kept) or a molecule's
    positions about their centroid scaled by a factor from --scale, then rattled; the inputs' labels are not carried
    over; the same seed writes the same file; the teacher labels the copies, and compressed metals cost it energy."""
    originals = qm9_molecules(2) + metals(2)
    ase.io.write(tmp_path / "in.extxyz", originals, format="extxyz")
    run_label(tmp_path / "in.extxyz", "--teacher", "emt", "--out", tmp_path / "labels.h5")
    label.main(["export", tmp_path / "labels.h5", "--out", tmp_path / "labelled.extxyz"])  # inputs that carry labels
    perturb = ["perturb", tmp_path / "labelled.extxyz", "--copies", 3, "--scale", 0.8, 0.9, "--rattle", 0.02, "--seed", 1]
    result = label.main([*perturb, "--out", tmp_path / "p.extxyz"])
    frames = ase.io.read(tmp_path / "p.extxyz", ":")
    assert result["n_inputs"] == 4 and result["n_structures"] == len(frames) == 12
    for i, atoms in enumerate(frames):
        source, scale = originals[i // 3], atoms.info["perturb_scale"]
        assert 0.8 <= scale <= 0.9 and atoms.info["perturbed_from"] == f"labelled.extxyz:{i // 3}"
        assert atoms.info["perturb_rattle"] == 0.02 and np.array_equal(atoms.numbers, source.numbers)
        if source.pbc.any():
            np.testing.assert_allclose(atoms.cell.array, scale * source.cell.array, atol=1e-6)
            moved = atoms.positions - scale * source.positions
        else:
            centre = source.positions.mean(0)
            moved = atoms.positions - (centre + scale * (source.positions - centre))
        assert 0.005 < moved.std() < 0.05  # the rattle, 0.02 A, and nothing more
        assert atoms.calc is None and "energy" not in atoms.info and set(atoms.arrays) == {"numbers", "positions"}
    assert len({f.info["perturb_scale"] for f in frames}) == 12
    label.main([*perturb, "--out", tmp_path / "again.extxyz"])
    assert (tmp_path / "again.extxyz").read_bytes() == (tmp_path / "p.extxyz").read_bytes()
    label.main(["perturb", tmp_path / "in.extxyz", "--scale", 1, 1, "--rattle", 0, "--copies", 1, "--out", tmp_path / "same.extxyz"])
    for atoms, source in zip(ase.io.read(tmp_path / "same.extxyz", ":"), originals):
        np.testing.assert_allclose(atoms.positions, source.positions, atol=1e-6)  # extxyz keeps 8 decimals
    run_label(tmp_path / "p.extxyz", "--teacher", "emt", "--out", tmp_path / "perturbed.h5")
    lab, ref = read_labels(tmp_path / "perturbed.h5"), read_labels(tmp_path / "labels.h5")
    assert len(lab["key"]) == 12
    for k in range(2, 4):  # the metals: squeezed by 10-20 %, each copy above its input's energy
        assert all(lab["energy"][3 * k + c] > ref["energy"][k] for c in range(3))
    with pytest.raises(SystemExit):
        label.main(["perturb", tmp_path / "in.extxyz", "--scale", 0.9, 0.8, "--out", tmp_path / "x.extxyz"])


@pytest.mark.parametrize("prefix", ["", "REF_"])
def test_export_writes_extxyz_that_reads_back_as_the_labels(tmp_path, prefix):
    """label.py export: every structure of the labels file as an extended XYZ frame whose energy, forces and (crystals)
    stress, read back with ase.io.read, are the stored labels, as ASE calculator results or as PREFIX-named fields."""
    mols, crystals = qm9_molecules(3), metals(3)
    ase.io.write(tmp_path / "in.extxyz", mols + crystals, format="extxyz")
    out = tmp_path / "labels.h5"
    run_label(tmp_path / "in.extxyz", "--teacher", "emt", "--out", out)
    lab = read_labels(out)
    flags = ["--prefix", prefix] if prefix else []
    result = label.main(["export", out, "--out", tmp_path / "labels.extxyz", *flags])
    frames = ase.io.read(tmp_path / "labels.extxyz", ":")
    assert result["n_structures"] == len(frames) == len(lab["key"]) == 6 and sum(f.pbc.any() for f in frames) == 3
    for s, atoms in enumerate(frames):
        o, n = lab["offset"][s], lab["n_atoms"][s]
        assert atoms.info["key"] == lab["key"][s] and atoms.info["teacher"] == "emt"
        assert np.array_equal(atoms.numbers, lab["numbers"][o:o + n])
        np.testing.assert_allclose(atoms.positions, lab["positions"][o:o + n], atol=1e-6)
        energy = atoms.info[f"{prefix}energy"] if prefix else atoms.get_potential_energy()
        forces = atoms.arrays[f"{prefix}forces"] if prefix else atoms.get_forces()
        assert energy == pytest.approx(lab["energy"][s], abs=1e-9)
        np.testing.assert_allclose(forces, lab["forces"][o:o + n], atol=1e-6)
        if lab["pbc"][s].any():
            stress = atoms.info[f"{prefix}stress"] if prefix else atoms.get_stress()
            np.testing.assert_allclose(stress, lab["stress"][s], atol=1e-6)
            np.testing.assert_allclose(atoms.cell.array, lab["cell"][s], atol=1e-6)
        else:
            assert not atoms.pbc.any()


def test_bad_inputs_are_recorded_and_written_data_survives(tmp_path):
    out = tmp_path / "labels.h5"
    good = tmp_path / "good.extxyz"
    ase.io.write(good, metals(3), format="extxyz")
    run_label(good, "--teacher", "emt", "--out", out)
    assert len(read_labels(out)["key"]) == 3

    bad_csv = tmp_path / "bad.csv"
    text = PEROV.read_text().splitlines(keepends=True)
    bad_csv.write_text(text[0] + "".join(text[1:]).replace("_cell_length_a", "_cell_length_a garbage ' \n loop_ \n", 1))
    (tmp_path / "empty.xyz").write_text("")
    (tmp_path / "nan.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH nan 0 0\nH 0 0 0.74\n")
    (tmp_path / "unknown.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nXx 0 0 0\nH 0 0 0.74\n")
    (tmp_path / "overlap.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.1\n")
    (tmp_path / "lonely.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 9\n")
    bad = ["empty.xyz", "nan.xyz", "unknown.xyz", "overlap.xyz", "lonely.xyz"]
    run_label(bad_csv, *[tmp_path / b for b in bad], good, "--teacher", "emt", "--out", out)
    lab = read_labels(out)
    assert list(lab["key"][:3]) == ["good.extxyz:0", "good.extxyz:1", "good.extxyz:2"]  # nothing lost
    assert len(lab["key"]) == 3 + 4  # plus the 4 perov rows EMT supports (Ag Au Cu Ni Pd Pt N O); nothing bad written
    failed = [json.loads(l) for l in (tmp_path / "labels.failed.jsonl").read_text().splitlines()]
    reasons = {f["key"]: f["reason"] for f in failed}
    assert "empty file" in reasons["empty.xyz"]
    assert "NaN" in reasons["nan.xyz:0"]
    assert "unknown element 'Xx'" in reasons["unknown.xyz:0"] and "unknown.xyz" in reasons["unknown.xyz:0"]
    assert "overlapping" in reasons["overlap.xyz:0"] and "isolated" in reasons["lonely.xyz:0"]
    corrupt = [r for k, r in reasons.items() if k.startswith("bad.csv:")]
    assert any("bad.csv, line" in r and "cannot parse" in r for r in corrupt)  # names the file and the record
    assert any("does not support element" in r for r in corrupt)  # EMT lacks Os, Ti, ...: a failure, not a crash
    # resume skips recorded failures; --retry-failed tries them again (and fails them again)
    r = run_label(bad_csv, *[tmp_path / b for b in bad], good, "--teacher", "emt", "--out", out)
    assert r["labelled_this_run"] == 0 and len(read_labels(out)["key"]) == 7
    r = run_label(bad_csv, "--teacher", "emt", "--out", out, "--retry-failed")
    assert r["labelled_this_run"] == 0 and r["failed"] == len(reasons) and len(read_labels(out)["key"]) == 7


def test_overlap_uses_periodic_images():
    a = bulk("Cu", "fcc", a=3.6)  # 1 atom per cell: its neighbours are all images
    assert check_structure(a) is None
    a.set_cell(a.cell * 0.1, scale_atoms=True)
    assert "overlapping" in check_structure(a)


def test_dense_neighbour_search_equals_ase_neighbour_list():
    """The numpy all-image-pairs path (small structures) and ase.neighborlist (large ones) give the same
    nearest-neighbour distances and closest pair: real molecules and crystals, a skewed cell smaller than
    the cutoff, unwrapped positions, a lone atom."""
    from models.structures import nearest_neighbours

    skewed = ase.Atoms("CuAu", scaled_positions=[[0, 0, 0], [0.3, 0.6, 0.2]], pbc=True,
                       cell=[[2.5, 0, 0], [2.2, 1.3, 0], [0.4, 0.9, 1.7]])
    unwrapped = skewed.copy()
    unwrapped.positions[0] += np.array([3, -2, 5]) @ unwrapped.cell.array  # the same crystal, an atom outside the cell
    lonely = ase.Atoms("H2O", positions=[[0, 0, 0], [0, 0, 0.96], [0, 9, 0]])
    structures = ([a for _, _, a in iter_structures([str(PEROV), str(CARBON)])] + qm9_molecules(20, no_fluorine=False)
                  + metals(4) + [skewed, unwrapped, lonely, bulk("Cu", "fcc", a=3.6)])
    for a in structures:
        for cutoff in (0.7, 1.5, 4.0):
            dense, (_, _, d) = nearest_neighbours(a, cutoff)
            reference, (_, _, d_ref) = nearest_neighbours(a, cutoff, dense_limit=0)
            assert np.allclose(dense, reference, rtol=0, atol=1e-9) and d == pytest.approx(d_ref, abs=1e-9)
    assert np.allclose(nearest_neighbours(skewed, 4.0)[0], nearest_neighbours(unwrapped, 4.0)[0])
    assert nearest_neighbours(lonely, 4.0)[0][2] == np.inf
    assert "isolated atom(s) [2]" in check_structure(lonely)


def test_fast_p1_cif_reader_equals_ase():
    """CDVAE rows take the fast P 1 path and give ASE's Atoms to the last bit; anything else is left to ASE."""
    import csv
    import io

    from models.structures import read_p1_cif

    rows = [row["cif"] for path in (PEROV, CARBON) for row in csv.DictReader(open(path))]
    for text in rows:
        fast, slow = read_p1_cif(text), ase.io.read(io.StringIO(text), format="cif")
        assert fast is not None
        for name in ("numbers", "positions", "pbc"):
            assert np.array_equal(getattr(fast, name), getattr(slow, name))
        assert np.array_equal(fast.cell.array, slow.cell.array)
    text = rows[0]
    first_site = text.strip().splitlines()[-1]
    not_p1 = {
        "partial occupancy": text.replace(first_site, first_site[:-1] + "0.5"),
        "another space group": text.replace("'P 1'", "'P m -3 m'"),
        "a second operation": text.replace("  1  'x, y, z'", "  1  'x, y, z'\n  2  '-x, -y, -z'"),
        "two data blocks": text + "\n" + text,
        "an uncertainty": text.replace(first_site.split()[3], first_site.split()[3] + "(3)", 1),
        "an unknown element": text.replace(first_site, "Xx" + first_site[first_site.index(" "):]),
        "overlapping sites": text + first_site + "\n",
    }
    for why, bad in not_p1.items():
        assert read_p1_cif(bad) is None, why


def cu3au_cif(name: str, cu1: str = "1", extra: str = "") -> str:
    """L1_2 Cu3Au as pymatgen writes a CDVAE row, with the occupancy of the site Cu1 and more site rows."""
    sites = [("Au0", "0 0 0", "1"), ("Cu1", "0 0.5 0.5", cu1), ("Cu2", "0.5 0 0.5", "1"), ("Cu3", "0.5 0.5 0", "1")]
    return (f"data_{name}\n_symmetry_space_group_name_H-M 'P 1'\n" + "".join(f"_cell_length_{x} 3.75\n" for x in "abc")
            + "".join(f"_cell_angle_{x} 90\n" for x in ("alpha", "beta", "gamma"))
            + "loop_\n _symmetry_equiv_pos_site_id\n _symmetry_equiv_pos_as_xyz\n  1  'x, y, z'\nloop_\n"
            + "".join(f" _atom_site_{c}\n" for c in ("type_symbol", "label", "fract_x", "fract_y", "fract_z", "occupancy"))
            + "".join(f"  {label[:2]} {label} {xyz} {occupancy}\n" for label, xyz, occupancy in sites) + extra)


def test_sites_that_are_not_one_whole_atom_fail_naming_the_site(tmp_path):
    """ASE reads a partial, negative, over-full or mixed site as one whole atom, and two rows on one position as one
    atom: each is a failure naming the file, the record and the site; an occupancy rounded when written is whole."""
    cases = {"half": (cu3au_cif("half", "0.5"), "holds Cu at occupancy 0.5"),
             "negative": (cu3au_cif("negative", "-1"), "holds Cu at occupancy -1"),
             "over": (cu3au_cif("over", "2"), "holds Cu at occupancy 2"),
             "mixed": (cu3au_cif("mixed", "0.5", "  Au Au9 0 0.5 0.5 0.5\n"), "Cu at occupancy 0.5 and Au at occupancy 0.5"),
             "twice": (cu3au_cif("twice", "1", "  Cu Cu9 0 0.5 0.5 1\n"), "row 5 of the _atom_site loop is at the position")}
    good, rounded = cu3au_cif("good"), cu3au_cif("rounded", "0.9999")
    (tmp_path / "sites.csv").write_text(",material_id,cif\n" + "".join(
        f'{i},{name},"{cif}"\n' for i, (name, cif) in enumerate([("good", good), ("rounded", rounded)]
                                                                + [(n, c[0]) for n, c in cases.items()])))
    (tmp_path / "sites.cif").write_text(good + rounded + "".join(cif for cif, _ in cases.values()))
    by_key = {k: a for k, _, a in iter_structures([str(tmp_path / "sites.csv"), str(tmp_path / "sites.cif")], anchor=tmp_path)}
    for key in ("sites.csv:rounded", "sites.cif:1"):
        assert np.array_equal(by_key[key].numbers, by_key["sites.csv:good"].numbers), key
        assert np.allclose(by_key[key].positions, by_key["sites.csv:good"].positions), key
    for block, (name, (_, held)) in enumerate(cases.items(), 2):
        csv_failure, cif_failure = by_key[f"sites.csv:{name}"], by_key[f"sites.cif:{block}"]
        assert "sites.csv, lines " in csv_failure.reason and f"(material_id {name})" in csv_failure.reason
        assert f"sites.cif, data block {block}: " in cif_failure.reason
        assert held in csv_failure.reason and held in cif_failure.reason, (csv_failure.reason, cif_failure.reason)


def test_one_record_id_twice_in_a_file_is_refused(tmp_path):
    """label.py keys a row by its file and material_id: a second row of the same id, different or not, would never
    be labelled, so the file is refused naming both rows. A byte that is not UTF-8 is refused naming its line."""
    from models.structures import InputError, iter_records

    header, a, b = ",material_id,cif\n", cu3au_cif("a"), cu3au_cif("b", extra="  Au Au9 0.25 0.25 0.25 1\n")
    (tmp_path / "other.csv").write_text(header + f'0,x-1,"{a}"\n1,x-2,"{a}"\n2,x-1,"{b}"\n')
    (tmp_path / "same.csv").write_text(header + f'0,x-1,"{a}"\n0,x-1,"{a}"\n')
    lines = 1 + a.count("\n")  # of one record
    for name, what in (("other.csv", "two different structures"), ("same.csv", "the same row twice")):
        with pytest.raises(InputError) as e:
            list(iter_records([str(tmp_path / name)]))
        first, second = f"lines 2-{1 + lines}", f"lines {2 + (2 if name == 'other.csv' else 1) * lines}-"
        assert f"{name}: {first} and {second}" in str(e.value) and f"same material_id x-1 ({what})" in str(e.value)
    (tmp_path / "latin1.csv").write_bytes((header + f'0,caf\xe9,"{a}"\n').encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.csv, line 2: not UTF-8"):
        list(iter_records([str(tmp_path / "latin1.csv")]))


def test_refuses_file_of_another_teacher(tmp_path):
    out = tmp_path / "labels.h5"
    ase.io.write(tmp_path / "m.extxyz", metals(1), format="extxyz")
    run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out)
    with pytest.raises(LabelsError, match=r"labels\.h5.*'emt'.*'xtb'"):
        LabelWriter(out, "xtb", "tblite 0")
    proc = run_script("label.py", tmp_path / "m.extxyz", "--teacher", "xtb", "--out", out, check=False)
    if importlib.util.find_spec("tblite"):
        assert proc.returncode != 0 and "emt" in proc.stderr and "xtb" in proc.stderr and "labels.h5" in proc.stderr
    assert len(read_labels(out)["key"]) == 1


def test_v1_file_with_a_half_written_block_is_read_and_upgraded(tmp_path):
    """A file of the first format (blocks appended in place, rows past n_structures from a killed append) reads
    without the partial rows; appending to it rewrites it once in the journalled format."""
    import h5py

    out = tmp_path / "labels.h5"
    ase.io.write(tmp_path / "m.extxyz", metals(4), format="extxyz")
    run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out, "--limit", "2")
    before = read_labels(out)
    with h5py.File(out, "a") as f:  # the v1 layout: no per-structure teacher_version, rows past n_structures
        del f["teacher_version"]
        del f.attrs["journal_seq"]
        f.attrs["format"] = FORMAT_V1
        for name in ("numbers", "positions", "forces"):
            f[name].resize(len(f[name]) + 5, axis=0)
        f["energy"].resize(3, axis=0)
    after = read_labels(out)
    assert all(np.array_equal(before[k], after[k]) for k in before if k != "attrs")
    run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out)
    lab = read_labels(out)
    assert len(lab["key"]) == 4 and lab["offset"][-1] + lab["n_atoms"][-1] == len(lab["numbers"])
    assert lab["attrs"]["format"] != FORMAT_V1 and set(lab["teacher_version"]) == {before["attrs"]["teacher_version"]}
    with h5py.File(out, "r") as f:
        assert len(f["numbers"]) == len(lab["numbers"]) and len(f["energy"]) == 4


def test_sigkill_then_resume(tmp_path):
    """Kill -9 after the first block is committed; the resumed run ends with exactly one record per input."""
    rng = np.random.default_rng(1)
    base = bulk("Cu", "fcc", a=3.61, cubic=True)
    structures = []
    for _ in range(3000):
        a = base.copy()
        a.positions += rng.normal(0, 0.05, a.positions.shape)
        structures.append(a)
    src = tmp_path / "many.extxyz"
    ase.io.write(src, structures, format="extxyz")
    out = tmp_path / "labels.h5"
    proc = subprocess.Popen([sys.executable, "label.py", str(src), "--teacher", "emt", "--out", str(out), "--block", "50",
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "label.log"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and "committed block" in log.read_text():
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_killed = len(read_labels(out)["key"])
    assert 50 <= n_killed < 3000 and n_killed % 50 == 0
    run_label(src, "--teacher", "emt", "--out", out, "--block", "500")
    lab = read_labels(out)
    assert len(lab["key"]) == 3000 and len(set(lab["key"])) == 3000
    assert set(lab["key"]) == {f"many.extxyz:{i}" for i in range(3000)}
    assert lab["offset"][-1] + lab["n_atoms"][-1] == len(lab["numbers"]) == 4 * 3000


@pytest.mark.parametrize("name,package", [("sevennet", "sevenn"), ("orb-v2", "orb_models"), ("mace-mp", "mace")])
def test_uninstalled_teachers_say_what_to_install(name, package):
    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed")
    with pytest.raises(TeacherError, match="pip install"):
        get_teacher(name)


@pytest.mark.skipif(not importlib.util.find_spec("tblite"), reason="tblite not installed (pip install tblite)")
def test_xtb_molecules(tmp_path):
    from tblite.ase import TBLite

    mols = qm9_molecules(3, no_fluorine=False)
    ase.io.write(tmp_path / "m.extxyz", mols, format="extxyz")
    out = tmp_path / "labels.h5"
    run_label(tmp_path / "m.extxyz", "--teacher", "xtb", "--out", out)
    lab = read_labels(out)
    assert len(lab["key"]) == 3 and np.isnan(lab["stress"]).all() and "GFN2" in lab["attrs"]["teacher_version"]
    for s in range(3):
        o, n = lab["offset"][s], lab["n_atoms"][s]
        a = stored_atoms(lab, s)
        a.calc = TBLite(method="GFN2-xTB", verbosity=0)  # a fresh calculator: no state carried between molecules
        assert lab["energy"][s] == pytest.approx(a.get_potential_energy(), abs=1e-6)
        assert np.allclose(lab["forces"][o:o + n], a.get_forces(), atol=1e-5)


@pytest.mark.skipif(not importlib.util.find_spec("chgnet"), reason="chgnet not installed (pip install chgnet)")
def test_chgnet_crystals_and_a_boxed_molecule(tmp_path):
    ase.io.write(tmp_path / "m.extxyz", qm9_molecules(1), format="extxyz")
    out = tmp_path / "labels.h5"
    run_label(tmp_path / "m.extxyz", PEROV, "--teacher", "chgnet", "--out", out, "--limit", "3", "--device", "cpu")
    lab = read_labels(out)
    assert len(lab["key"]) == 3 and np.isfinite(lab["energy"]).all() and np.isfinite(lab["forces"]).all()
    crystal = lab["pbc"].all(1)
    assert crystal.sum() == 2 and np.isfinite(lab["stress"][crystal]).all() and np.isnan(lab["stress"][~crystal]).all()
    assert np.all(lab["cell"][~crystal] == 0)  # the vacuum box is the teacher's business, not stored


@pytest.mark.skipif(not importlib.util.find_spec("chgnet"), reason="chgnet not installed (pip install chgnet)")
def test_chgnet_batched_labels_are_its_one_at_a_time_labels():
    """CHGNet's own batching (label_many: one forward for all) gives what its ASE calculator gives one structure at a
    time, for crystals of different sizes, a rattled supercell and a boxed molecule, in any order."""
    teacher = get_teacher("chgnet", "cpu")
    assert teacher.batch is not None
    crystals = [a for _, _, a in iter_structures([str(CARBON)])][:2] + [a for _, _, a in iter_structures([str(PEROV)])][:2]
    supercell = crystals[2].repeat((2, 1, 1))
    supercell.positions += np.random.default_rng(0).normal(0, 0.05, supercell.positions.shape)
    structures = [*crystals, qm9_molecules(1)[0], supercell]
    one_at_a_time = [teacher.label(a) for a in structures]
    for order in (range(len(structures)), reversed(range(len(structures)))):
        order = list(order)
        batched = teacher.label_many([structures[i] for i in order])
        for i, (energy, forces, stress) in zip(order, batched):
            e, f, s = one_at_a_time[i]
            assert energy == pytest.approx(e, abs=1e-4 * len(structures[i]))
            assert forces.shape == f.shape and np.allclose(forces, f, atol=1e-4)
            assert stress.shape == (6,) and np.allclose(stress, s, atol=1e-5, equal_nan=True)  # the molecule: NaN
    assert len(teacher.label_many(structures[:1])) == 1  # one structure: CHGNet answers a dict, not a list


def test_a_teacher_that_cannot_batch_labels_many_one_at_a_time():
    """label_many without a batched call is label() of each structure; unsupported elements raise as in label()."""
    teacher = get_teacher("emt")
    assert teacher.batch is None
    structures = metals(3)
    for (energy, forces, stress), a in zip(teacher.label_many(structures), structures):
        e, f, s = teacher.label(a)
        assert energy == e and np.array_equal(forces, f) and np.array_equal(stress, s)
    from models.teachers import UnsupportedElements
    with pytest.raises(UnsupportedElements, match="does not support"):
        teacher.label_many([*structures, bulk("Si")])


@pytest.mark.skipif(not importlib.util.find_spec("sevenn"), reason="sevenn not installed (pip install sevenn)")
def test_sevennet_crystals_and_a_boxed_molecule(tmp_path):
    """SevenNet-0 (weights in the sevenn wheel): the stored labels equal a direct call on the stored geometry."""
    from sevenn.calculator import SevenNetCalculator

    ase.io.write(tmp_path / "m.extxyz", qm9_molecules(1), format="extxyz")
    out = tmp_path / "labels.h5"
    run_label(tmp_path / "m.extxyz", PEROV, "--teacher", "sevennet", "--out", out, "--limit", "3", "--device", "cpu")
    lab = read_labels(out)
    assert len(lab["key"]) == 3 and lab["pbc"].all(1).sum() == 2 and "7net-0" in lab["attrs"]["teacher_version"]
    calc = SevenNetCalculator("7net-0", device="cpu")
    for s in range(3):
        o, n = lab["offset"][s], lab["n_atoms"][s]
        a = stored_atoms(lab, s)
        if not a.pbc.any():
            a.center(vacuum=10.0)
            a.pbc = True
        a.calc = calc
        assert lab["energy"][s] == pytest.approx(a.get_potential_energy(), abs=1e-4)
        assert np.allclose(lab["forces"][o:o + n], a.get_forces(), atol=1e-4)


def test_teacher_errors_and_nan_labels_are_recorded(tmp_path, monkeypatch):
    from ase.calculators.calculator import Calculator, all_changes

    from models import teachers

    class Flaky(Calculator):
        implemented_properties = ["energy", "forces", "stress"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            if len(self.atoms) == 4:
                raise RuntimeError("SCF exploded")
            nan = np.nan if len(self.atoms) == 8 else 0.0
            self.results = {"energy": nan, "forces": np.zeros((len(self.atoms), 3)), "stress": np.zeros(6)}

    monkeypatch.setitem(teachers.TEACHERS, "flaky", lambda device: Teacher("flaky", "0", Flaky()))
    ase.io.write(tmp_path / "m.extxyz", metals(2) + [molecule("H2")], format="extxyz")
    out = tmp_path / "labels.h5"
    r = run_label(tmp_path / "m.extxyz", "--teacher", "flaky", "--out", out)
    assert r["labelled"] == 1 and r["failures_by_kind"] == {"teacher": 1, "non-finite": 1}
    assert read_labels(out)["key"].tolist() == ["m.extxyz:2"]
    reasons = [json.loads(l)["reason"] for l in (tmp_path / "labels.failed.jsonl").read_text().splitlines()]
    assert "SCF exploded" in reasons[0] and "NaN" in reasons[1]


def test_not_a_labels_file(tmp_path):
    out = tmp_path / "labels.h5"
    out.write_text("not hdf5")
    with pytest.raises(LabelsError, match="labels.h5"):
        LabelWriter(out, "emt", get_teacher("emt").version)


def test_shards_merge_to_the_unsharded_set(tmp_path, lj_teacher):
    structures = metals(8)
    structures[3].positions[1] = structures[3].positions[0] + 0.1  # a recorded failure, whichever shard has it
    ase.io.write(tmp_path / "m.extxyz", structures, format="extxyz")
    for i in range(2):  # --shard I/N writes OUT_STEM.shardIofN.h5, so two shards never share a file
        run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", tmp_path / "s.h5", "--shard", f"{i}/2")
    run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", tmp_path / "all.h5")
    s0, s1 = (read_labels(tmp_path / f"s.shard{i}of2.h5") for i in range(2))
    assert len(s0["key"]) and len(s1["key"]) and not set(s0["key"]) & set(s1["key"])
    for _ in range(2):  # merging twice adds nothing: no rows, no failure records, no labelling time
        r = label.main(["merge", tmp_path / "s.shard0of2.h5", tmp_path / "s.shard1of2.h5", "--out", tmp_path / "merged.h5"])
    merged, full = read_labels(tmp_path / "merged.h5"), read_labels(tmp_path / "all.h5")
    order = np.argsort(merged["key"])
    assert merged["key"][order].tolist() == sorted(full["key"].tolist())
    # EMT reuses its neighbour list between structures, so summation order (the last bits) depends on the previous one
    assert np.allclose(np.sort(merged["energy"]), np.sort(full["energy"]), rtol=1e-12, atol=0)
    assert len(merged["numbers"]) == len(full["numbers"])
    assert merged["attrs"]["label_seconds"] == pytest.approx(s0["attrs"]["label_seconds"] + s1["attrs"]["label_seconds"])
    assert r["labelled"] == 7 and r["failed"] == 1 and r["failures_by_kind"] == {"check": 1}
    assert len(label.read_failed(tmp_path / "merged.h5")) == 1
    with pytest.raises(LabelsError, match="cannot merge"):
        ase.io.write(tmp_path / "h2.extxyz", [molecule("H2")], format="extxyz")
        run_label(tmp_path / "h2.extxyz", "--teacher", "lj", "--out", tmp_path / "other.h5")
        label.main(["merge", tmp_path / "s.shard0of2.h5", tmp_path / "other.h5", "--out", tmp_path / "bad.h5"])


def test_report_over_files_of_two_teachers(tmp_path, lj_teacher):
    """`label.py report` joins labels files of different teachers: counts, element statistics and
    duplicates over the union, each file's failures, throughput from the stored labelling time."""
    mols, crystals = qm9_molecules(6), metals(4)
    mols[5] = mols[0].copy()  # a duplicate geometry, caught across the two files below
    mols[4].positions[1] = mols[4].positions[0]  # overlapping atoms: a recorded failure
    ase.io.write(tmp_path / "mols.extxyz", mols, format="extxyz")
    ase.io.write(tmp_path / "metals.extxyz", crystals + [mols[0]], format="extxyz")
    run_label(tmp_path / "mols.extxyz", "--teacher", "lj", "--out", tmp_path / "mols.h5")
    run_label(tmp_path / "metals.extxyz", "--teacher", "emt", "--out", tmp_path / "metals.h5")
    r = label.main(["report", tmp_path / "mols.h5", tmp_path / "metals.h5", "--json", tmp_path / "all.json", "--min-elements", "6"])
    a, b = read_labels(tmp_path / "mols.h5"), read_labels(tmp_path / "metals.h5")
    assert [f["teacher"] for f in r["files"]] == ["lj", "emt"] and r["teachers"] == ["emt", "lj"]
    assert (r["labelled"], r["failed"]) == (5 + 5, 1) and r["success_rate"] == pytest.approx(10 / 11)
    numbers = np.concatenate([a["numbers"], b["numbers"]])
    counts = np.bincount(numbers)
    p = counts[counts > 0] / counts.sum()
    assert r["element_entropy_bits"] == pytest.approx(-(p * np.log2(p)).sum()) and r["elements"] == (counts > 0).sum()
    sizes = np.concatenate([a["n_atoms"], b["n_atoms"]])
    assert r["size_cv"] == pytest.approx(sizes.std() / sizes.mean())
    assert r["duplicates"] == 2 and r["duplicate_keys"] == 0  # mols[5] in one file, mols[0] again in the other
    seconds = a["attrs"]["label_seconds"] + b["attrs"]["label_seconds"]
    assert seconds > 0 and r["structures_per_hour"] == pytest.approx(3600 * 10 / seconds)
    assert json.loads((tmp_path / "all.json").read_text())["verdict"] == r["verdict"]
    assert r["checks"]["elements"] == (r["elements"] >= 6) and r["checks"]["success_rate"] is False


def test_blocks_are_committed_by_time_and_labelling_time_is_kept(tmp_path):
    ase.io.write(tmp_path / "m.extxyz", metals(5), format="extxyz")
    out = tmp_path / "labels.h5"
    run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out, "--limit", "2", "--commit-seconds", "0")
    assert (tmp_path / "label.log").read_text().count("committed block of 1:") == 2  # one block per structure
    first = read_labels(out)["attrs"]["label_seconds"]
    r = run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out)  # resumes with the other 3
    assert r["labelled"] == 5 and r["labelled_this_run"] == 3 and 0 < first < read_labels(out)["attrs"]["label_seconds"]


def test_bench_against_bare_teacher_calls(tmp_path):
    ase.io.write(tmp_path / "m.extxyz", metals(4) + qm9_molecules(3), format="extxyz")
    r = label.main(["bench", tmp_path / "m.extxyz", "--teachers", "emt", "--n", "5", "--repeats", "2", "--out", tmp_path / "bench"])
    (row,) = r["results"]
    assert row["structures"] == 5 and row["labelled"] == 5 and len(row["bare_seconds"]) == len(row["label_seconds"]) == 2
    assert min(row["bare_seconds"]) > 0 and np.isfinite(row["overhead"]) and np.isfinite(row["loop_overhead"])
    assert 0 < row["per_run_seconds"] < min(row["label_seconds"])
    assert "| ase" in (tmp_path / "bench" / "bench.md").read_text()
    assert len(read_labels(tmp_path / "bench" / f"emt-{tmp_path.name}_m.extxyz.h5")["key"]) == 5  # label.py really labelled them


def test_generate_from_a_checkpoint_and_resume(tmp_path):
    """--generate samples once into OUT's directory; every sample ends up labelled or recorded as failed."""
    import torch

    from models.checkpoint import save_checkpoint
    from models.molecule_flow import FlowConfig
    from models.egnn import EGNN, EGNNConfig

    torch.manual_seed(0)
    cfg = EGNNConfig(hidden=16, n_layers=1)
    model = EGNN(cfg)
    hist = np.zeros(10)
    hist[[5, 9]] = 0.5
    save_checkpoint(tmp_path / "run" / "ckpt.pt", {
        "arch": "gnn", "gen": "flow", "model_config": vars(cfg), "process_config": vars(FlowConfig()), "step": 0,
        "model": model.state_dict(), "ema": model.state_dict(), "atom_symbols": ["H", "C", "N", "O", "F"],
        "n_atoms_hist": hist.tolist()})
    args = ["--generate", tmp_path / "run" / "ckpt.pt", "--n-generate", "6", "--steps", "2", "--teacher", "emt",
            "--out", tmp_path / "labels.h5", "--min-dist", "0.1", "--isolated-dist", "0"]
    r = run_label(*args)
    assert r["labelled"] + r["failed"] == 6
    gen = list(tmp_path.glob("generated_run_*.extxyz"))
    assert len(gen) == 1 and len(ase.io.read(gen[0], ":")) == 6
    r2 = run_label(*args)
    assert r2["labelled_this_run"] == 0 and r2["labelled"] == r["labelled"]


def test_limit_selects_the_same_first_inputs_on_every_run(tmp_path):
    """--limit N is the first N inputs, not N more each time: the README's recipe can be re-run to resume."""
    ase.io.write(tmp_path / "m.extxyz", metals(6), format="extxyz")
    out = tmp_path / "labels.h5"
    for _ in range(2):
        r = run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out, "--limit", "3")
    assert r["labelled"] == 3 and r["labelled_this_run"] == 0
    assert read_labels(out)["key"].tolist() == [f"m.extxyz:{i}" for i in range(3)]
    r = run_label(tmp_path / "m.extxyz", "--teacher", "emt", "--out", out, "--limit", "5")
    assert r["labelled"] == 5 and r["labelled_this_run"] == 2


def test_failures_are_shown_and_a_verdict_that_cannot_be_computed_is_no(tmp_path):
    """Each failed record is printed (file, record, reason) and logged; with nothing labelled, the rates are n/a
    and n/a fails its check."""
    (tmp_path / "overlap.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.1\n")
    out = tmp_path / "labels.h5"
    proc = run_script("label.py", tmp_path / "overlap.xyz", "--teacher", "emt", "--out", out, "--no-progress", check=False)
    assert proc.returncode == 0
    assert "failed overlap.xyz:0 (check): overlapping atoms" in proc.stderr
    assert "failed overlap.xyz:0 (check): overlapping atoms" in (tmp_path / "label.log").read_text()
    report = json.loads((tmp_path / "labels.report.json").read_text())
    assert report["labelled"] == 0 and report["checks"]["structures_per_hour"] is False and report["verdict"] == "NO-GO"
    assert "structures_per_hour" in proc.stderr and "n/a  >= 100     NO" in proc.stderr


def test_a_failure_labelled_later_no_longer_counts(tmp_path, monkeypatch):
    from ase.calculators.calculator import Calculator, all_changes

    from models import teachers

    class OnceBroken(Calculator):
        implemented_properties = ["energy", "forces", "stress"]
        broken = True

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            if OnceBroken.broken:
                raise RuntimeError("SCF did not converge")
            self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3)), "stress": np.zeros(6)}

    monkeypatch.setitem(teachers.TEACHERS, "once", lambda device: Teacher("once", "0", OnceBroken()))
    ase.io.write(tmp_path / "m.extxyz", metals(2), format="extxyz")
    out = tmp_path / "labels.h5"
    assert run_label(tmp_path / "m.extxyz", "--teacher", "once", "--out", out)["failed"] == 2
    OnceBroken.broken = False
    r = run_label(tmp_path / "m.extxyz", "--teacher", "once", "--out", out, "--retry-failed")
    assert r["labelled"] == 2 and r["failed"] == 0 and r["success_rate"] == 1.0


def test_teacher_versions_are_recorded_and_never_mixed_silently(tmp_path, lj_teacher, monkeypatch):
    from models import teachers

    ase.io.write(tmp_path / "a.extxyz", qm9_molecules(2), format="extxyz")
    ase.io.write(tmp_path / "b.extxyz", qm9_molecules(4)[2:], format="extxyz")
    run_label(tmp_path / "a.extxyz", "--teacher", "lj", "--out", tmp_path / "a.h5")
    old = read_labels(tmp_path / "a.h5")["attrs"]["teacher_version"]
    newer = teachers.TEACHERS["lj"]("cpu")
    monkeypatch.setitem(teachers.TEACHERS, "lj", lambda device: Teacher("lj", "lj 2.0", newer.calc))
    with pytest.raises(LabelsError, match="--mixed-versions"):
        run_label(tmp_path / "b.extxyz", "--teacher", "lj", "--out", tmp_path / "a.h5")
    run_label(tmp_path / "b.extxyz", "--teacher", "lj", "--out", tmp_path / "new.h5")
    with pytest.raises(LabelsError, match="different teacher versions"):
        label.main(["merge", tmp_path / "a.h5", tmp_path / "new.h5", "--out", tmp_path / "m.h5"])
    label.main(["merge", tmp_path / "a.h5", tmp_path / "new.h5", "--out", tmp_path / "m.h5", "--mixed-versions"])
    lab = read_labels(tmp_path / "m.h5")
    assert dict(zip(lab["key"], lab["teacher_version"])) == {
        **{f"a.extxyz:{i}": old for i in range(2)}, **{f"b.extxyz:{i}": "lj 2.0" for i in range(2)}}
