"""evaluate.py scores another model's samples in the formats the field writes: XYZ and SDF for molecules, CIF
(multi-block, or a directory of files) for crystals. The same structures score the same in every format, and a
structure that cannot be read is named with its file and record."""
import json
from pathlib import Path

import ase
import ase.io
import numpy as np
import pytest

from conftest import ROOT, run_script
from models.crystals import read_cdvae_csv
from models.molecules import load_qm9, write_sdf

PEROV = ROOT / "tests" / "data" / "perov5_sample.csv"
SCORED = {"molecules": ("atom_stability", "mol_stability", "validity", "uniqueness"),
          "crystals": ("structural_validity", "compositional_validity")}


def evaluate(*args):
    proc = run_script("evaluate.py", *args, "--no-progress", check=False)
    return proc.returncode, proc.stdout + proc.stderr


def metrics(path: Path) -> dict:
    return json.loads(path.read_text())


def test_molecules_score_alike_as_extxyz_xyz_and_sdf(qm9_dir, tmp_path):
    data = load_qm9("test", qm9_dir)
    frames = []
    for i in range(min(20, len(data))):
        numbers, positions = data[i]
        atoms = ase.Atoms(numbers=numbers, positions=positions)  # atomic numbers
        atoms.info["sample_index"] = i
        frames.append(atoms)
    for name in ("extxyz", "xyz", "sdf"):
        (tmp_path / name).mkdir()
    ase.io.write(tmp_path / "extxyz" / "samples.extxyz", frames)
    ase.io.write(tmp_path / "xyz" / "samples.xyz", frames, format="xyz")  # plain XYZ: no extxyz properties
    assert write_sdf(tmp_path / "sdf" / "samples.sdf", frames) == 0
    scored = {}
    for name, file in (("extxyz", "samples.extxyz"), ("xyz", "samples.xyz"), ("sdf", "samples.sdf")):
        code, message = evaluate(tmp_path / name / file, "--data", "qm9", "--data-dir", qm9_dir, "--no-fcd")
        assert code == 0, message[-3000:]
        m = metrics(tmp_path / name / "metrics.json")
        scored[name] = {k: m[k] for k in SCORED["molecules"]}
    assert scored["extxyz"]["atom_stability"] > 0.9
    assert scored["xyz"] == scored["extxyz"] and scored["sdf"] == scored["extxyz"], scored


@pytest.fixture()
def perov_dir(tmp_path):
    d = tmp_path / "data"
    (d / "cdvae" / "perov_5").mkdir(parents=True)
    for split in ("train", "val", "test"):
        (d / "cdvae" / "perov_5" / f"{split}.csv").write_bytes(PEROV.read_bytes())
    return d


def test_crystals_score_alike_as_extxyz_multi_block_cif_and_a_directory_of_cifs(perov_dir, tmp_path):
    from pymatgen.io.ase import AseAtomsAdaptor

    from models.crystals import write_cif
    crystals = read_cdvae_csv(PEROV, progress=False)
    frames = [ase.Atoms(numbers=n, scaled_positions=f, cell=[*l, *a], pbc=True) for n, f, l, a in crystals.arrays()]
    for name in ("extxyz", "cif", "dir"):
        (tmp_path / name).mkdir()
    ase.io.write(tmp_path / "extxyz" / "samples.extxyz", frames)
    structures = [AseAtomsAdaptor.get_structure(a) for a in frames]
    write_cif(tmp_path / "cif" / "samples.cif", structures, [f"sample_{i}" for i in range(len(frames))])
    for i, s in enumerate(structures):
        write_cif(tmp_path / "dir" / f"{i:03d}.cif", [s], [f"sample_{i}"])
    scored = {}
    for name, target in (("extxyz", tmp_path / "extxyz" / "samples.extxyz"), ("cif", tmp_path / "cif" / "samples.cif"),
                         ("dir", tmp_path / "dir")):
        code, message = evaluate(target, "--data", "perov5", "--data-dir", perov_dir, "--no-coverage", "--workers", 1)
        assert code == 0, message[-3000:]
        m = metrics((target if target.is_dir() else target.parent) / "metrics.json")
        scored[name] = {k: m[k] for k in SCORED["crystals"]}
    assert scored["cif"] == scored["extxyz"] and scored["dir"] == scored["extxyz"], scored
    assert (tmp_path / "cif" / "crystals.png").stat().st_size > 10_000  # the picture of the first crystals


def test_an_unreadable_outside_sample_is_named_with_its_file_and_record(perov_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    good = "data_ok\n_cell_length_a 4\n_cell_length_b 4\n_cell_length_c 4\n_cell_angle_alpha 90\n_cell_angle_beta 90\n" \
           "_cell_angle_gamma 90\n_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_type_symbol\n_atom_site_label\n" \
           "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n_atom_site_occupancy\n"
    (tmp_path / "bad" / "a.cif").write_text(good + "Sr Sr1 0 0 0 1\nTi Ti1 0.5 0.5 0.5 1\n")
    (tmp_path / "bad" / "b.cif").write_text(good.replace("data_ok", "data_half") + "Sr Sr1 0 0 0 0.5\n")
    code, message = evaluate(tmp_path / "bad", "--data", "perov5", "--data-dir", perov_dir, "--no-coverage", "--workers", 1)
    assert code == 1 and "b.cif" in message and "occupancy 0.5" in message and "Traceback" not in message, message[-3000:]
    (tmp_path / "empty").mkdir()
    code, message = evaluate(tmp_path / "empty", "--data", "perov5", "--data-dir", perov_dir)
    assert code == 1 and "a directory with no samples files" in message, message[-3000:]


def cdvae_file(path: Path, crystals, lattices: bool = False, extra=None) -> None:
    """A sample file as CDVAE and DiffCSP save one: a dict of tensors, the batch's crystals concatenated, one
    evaluation."""
    import torch
    arrays = crystals.arrays()
    data = {"num_atoms": torch.tensor([[len(n) for n, *_ in arrays]]),
            "atom_types": torch.tensor(np.concatenate([n for n, *_ in arrays]))[None],
            "frac_coords": torch.tensor(np.concatenate([f for _, f, *_ in arrays]), dtype=torch.float32)[None]}
    if lattices:
        data["lattices"] = torch.tensor(np.stack([ase.Atoms(cell=[*l, *a]).cell.array for *_, l, a in arrays]))[None]
    else:
        data["lengths"] = torch.tensor(np.stack([l for *_, l, _ in arrays]))[None]
        data["angles"] = torch.tensor(np.stack([a for *_, a in arrays]))[None]
    torch.save({**data, **(extra or {})}, path)


@pytest.mark.parametrize("lattices", [False, True], ids=["lengths-angles", "lattices"])
def test_cdvae_and_diffcsp_sample_files_convert_without_unpickling(perov_dir, tmp_path, lattices):
    """models.convert: a CDVAE / DiffCSP eval file of the perov-5 test crystals themselves becomes extended XYZ that
    evaluate.py scores: as structure prediction of the test compositions, every crystal matches its truth."""
    test = read_cdvae_csv(PEROV, progress=False)
    cdvae_file(tmp_path / "eval_diff.pt", test, lattices)
    run_script("-m", "models.convert", "cdvae", tmp_path / "eval_diff.pt", "--csp", "perov5", "--data-dir", perov_dir,
               "--out", tmp_path / "csp" / "samples.extxyz")
    code, message = evaluate(tmp_path / "csp" / "samples.extxyz", "--data", "perov5", "--data-dir", perov_dir, "--workers", 1)
    assert code == 0, message[-3000:]
    m = metrics(tmp_path / "csp" / "metrics.json")
    assert m["match_rate@1"] == 1.0 and m["rmse@1"] < 1e-4, m


def test_a_sample_file_with_pickled_objects_is_refused(tmp_path):
    from types import SimpleNamespace

    import torch

    test = read_cdvae_csv(PEROV, progress=False)
    cdvae_file(tmp_path / "eval_gen.pt", test)
    data = torch.load(tmp_path / "eval_gen.pt", weights_only=True)
    # an object in place of DiffCSP's torch_geometric batch, which only its own environment can unpickle
    torch.save({**data, "input_data_batch": SimpleNamespace(x=1)}, tmp_path / "pickled.pt")
    proc = run_script("-m", "models.convert", "cdvae", tmp_path / "pickled.pt", "--out", tmp_path / "x.extxyz", check=False)
    assert proc.returncode == 1 and "can be read without unpickling" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "x.extxyz").exists()
