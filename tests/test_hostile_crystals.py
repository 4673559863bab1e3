"""Hostile crystal inputs to train.py and label.py: a cell far larger than the rest, a validation split too small to
hold crystals out, sites that are not one whole atom (partial, negative or mixed occupancy), two records with one
material_id, a CSV that is not UTF-8, and label.py --generate with crystal checkpoints. The runner and its conventions are in tests/hostile.py."""
import json

import ase.io
import pytest

from conftest import run_script
from hostile import ROOT, hostile_table
from models.labels import read_labels

TRAIN = "train.py --preset tiny --iters 2 --eval-samples 2 --data perov5 --train-split val"
LABEL = "--teacher emt --no-progress"
# (id, command (placeholders: {w} the prepared world, {data} the QM9 fixture cache dir), exit status, words that the
#  message must contain, mount over {w}/mnt or None)
CASES = [
    # -- one cell far larger than the rest would pad batches to it: refused where the data enter
    ("train: a 500-atom crystal in a CDVAE CSV", f"{TRAIN} --data-dir {{w}}/big --out {{w}}/big_run", 1,
     ["val.csv, lines 2050-", "(material_id big-1)", "500 atoms, more than --max-atoms 32", "--max-atoms 500"], None),
    ("train: --train-split val on a file too small to hold crystals out", f"{TRAIN} --data-dir {{w}}/few --out {{w}}/few_run", 1,
     ["val.csv: none of its 2 crystals", "held out for validation", "no validation crystals"], None),
    # -- sites that are not one element at occupancy 1
    ("train: a site of occupancy -1", f"{TRAIN} --data-dir {{w}}/negative --out {{w}}/negative_run", 1,
     ["val.csv, lines", "(material_id negative-1)", "site Cu1", "Cu at occupancy <= 0"], None),
    ("train: a site of occupancy 0.5", f"{TRAIN} --data-dir {{w}}/half --out {{w}}/half_run", 1,
     ["val.csv, lines", "(material_id half-1)", "site Au0", "Au at occupancy 0.5"], None),
    ("train: a mixed Cu/Au site", f"{TRAIN} --data-dir {{w}}/mixed --out {{w}}/mixed_run", 1,
     ["val.csv, lines", "(material_id mixed-1)", "Cu at occupancy 0.5 and Au at occupancy 0.5"], None),
    ("label: partial, negative and mixed sites of a CDVAE CSV", f"label.py {{w}}/sites.csv {LABEL} --out {{w}}/sites/l.h5", 0,
     ["sites.csv, lines", "(material_id half-1)", "Au at occupancy 0.5", "(material_id negative-1)", "Cu at occupancy -1",
      "(material_id mixed-1)", "Cu at occupancy 0.5 and Au at occupancy 0.5", "3 failed"], None),
    ("label: partial, negative and mixed sites of a CIF file", f"label.py {{w}}/sites.cif {LABEL} --out {{w}}/cif/l.h5", 0,
     ["sites.cif, data block 1", "Au at occupancy 0.5", "data block 2", "Cu at occupancy -1", "data block 3",
      "Cu at occupancy 0.5 and Au at occupancy 0.5", "3 failed"], None),
    # -- one material_id for two records: the key is the file and the id, so one would never be labelled
    ("label: two crystals with one material_id", f"label.py {{w}}/twice.csv {LABEL} --out {{w}}/twice/l.h5", 1,
     ["twice.csv: lines 2-", "and lines", "the same material_id good-1", "two different structures"], None),
    ("label: a CDVAE CSV that is not UTF-8", f"label.py {{w}}/latin1.csv {LABEL} --out {{w}}/latin1/l.h5", 1,
     ["latin1.csv, line 2", "not UTF-8"], None),
    # -- label.py --generate with crystal checkpoints
    ("label: --generate with a crystal checkpoint", f"label.py --generate {{w}}/denovo/ckpt.pt --n-generate 3 --steps 2 "
     f"{LABEL} --out {{w}}/generated/l.h5", 0, ["--generate: 3 structures"], None),
    ("label: --generate with a structure-prediction checkpoint", f"label.py --generate {{w}}/csp/ckpt.pt --n-generate 3 "
     f"{LABEL} --out {{w}}/csp_generated/l.h5", 1, ["--generate", "csp/ckpt.pt", "structure-prediction model",
                                                    "sample.py --compositions"], None),
]

CELL = """data_{name}
_symmetry_space_group_name_H-M 'P 1'
_cell_length_a {a}
_cell_length_b {a}
_cell_length_c {a}
_cell_angle_alpha 90
_cell_angle_beta 90
_cell_angle_gamma 90
_symmetry_Int_Tables_number 1
loop_
 _symmetry_equiv_pos_site_id
 _symmetry_equiv_pos_as_xyz
  1  'x, y, z'
loop_
 _atom_site_type_symbol
 _atom_site_label
 _atom_site_symmetry_multiplicity
 _atom_site_fract_x
 _atom_site_fract_y
 _atom_site_fract_z
 _atom_site_occupancy
{sites}
"""
CU3AU = [("Au", "Au0", 0, 0, 0), ("Cu", "Cu1", 0, 0.5, 0.5), ("Cu", "Cu2", 0.5, 0, 0.5), ("Cu", "Cu3", 0.5, 0.5, 0)]


def cu3au(name: str, occupancy: dict | None = None, extra: str = "", repeat: int = 1) -> str:
    """L1_2 Cu3Au (elements EMT labels) as pymatgen writes a CDVAE row; occupancy: label -> occupancy (default 1);
    extra: more site rows; repeat: an n x n x n supercell."""
    rows = [f"  {el} {label} 1 {(x + i) / repeat:.6f} {(y + j) / repeat:.6f} {(z + k) / repeat:.6f} "
            f"{(occupancy or {}).get(label, 1)}"
            for i in range(repeat) for j in range(repeat) for k in range(repeat) for el, label, x, y, z in CU3AU]
    return CELL.format(name=name, a=3.75 * repeat, sites="\n".join(rows) + extra)


BAD = {"half-1": cu3au("half", {"Au0": 0.5}), "negative-1": cu3au("negative", {"Cu1": -1}),
       "mixed-1": cu3au("mixed", {"Cu1": 0.5}, "\n  Au Au9 1 0.000000 0.500000 0.500000 0.5")}


def cdvae_csv(records: dict) -> str:
    return ",material_id,cif\n" + "".join(f'{i},{mid},"{cif}"\n' for i, (mid, cif) in enumerate(records.items()))


def data_dir(w, name: str, records: dict):
    (w / name / "cdvae" / "perov_5").mkdir(parents=True)
    (w / name / "cdvae" / "perov_5" / "val.csv").write_text(cdvae_csv(records))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """CDVAE files and data directories with one hostile record each, and two tiny perov-5 runs (de novo and
    structure prediction) for --generate."""
    w = tmp_path_factory.mktemp("crystal_world")
    good = {"good-1": cu3au("good")}
    perov = (ROOT / "tests" / "data" / "perov5_val_sample.csv").read_text()
    (w / "big" / "cdvae" / "perov_5").mkdir(parents=True)  # 64 perov-5 crystals of 5 atoms and one of 500
    (w / "big" / "cdvae" / "perov_5" / "val.csv").write_text(perov + f'64,big-1,"{cu3au("big", repeat=5)}"\n')
    data_dir(w, "few", {**good, "good-2": cu3au("good")})  # neither id falls in the held-out 5 %
    for mid in BAD:
        data_dir(w, mid.split("-")[0], {**good, mid: BAD[mid]})
    (w / "sites.csv").write_text(cdvae_csv({**good, **BAD}))
    (w / "sites.cif").write_text("".join([good["good-1"], *BAD.values()]))
    (w / "twice.csv").write_text(cdvae_csv(good)[:-1] + f'\n1,good-1,"{cu3au("good", {"Cu1": 1}).replace("3.75", "3.8")}"\n')
    (w / "latin1.csv").write_bytes(cdvae_csv({"caf\xe9-1": cu3au("cafe"), **good}).encode("latin-1"))
    (w / "perov" / "cdvae" / "perov_5").mkdir(parents=True)
    (w / "perov" / "cdvae" / "perov_5" / "val.csv").write_text(perov)
    for run, flags in (("denovo", []), ("csp", ["--csp"])):
        run_script("train.py", *TRAIN.split()[1:], *flags, "--data-dir", w / "perov", "--out", w / run)
    return w




def _no_run_started(name):
    def check(w):
        assert not (w / name / "ckpt.pt").exists()
    return check


def _only_whole_sites_labelled(out: str):
    """The whole crystal is labelled, the three others are failures of kind input naming their site."""
    def check(w):
        keys = read_labels(w / out / "l.h5")["key"].tolist()
        failed = [json.loads(line) for line in (w / out / "l.failed.jsonl").read_text().splitlines()]
        assert len(keys) == 1 and keys[0].endswith(("sites.csv:good-1", "sites.cif:0")), keys
        assert len(failed) == 3 and all(f["kind"] == "input" and "occupancy" in f["reason"] for f in failed), failed
    return check


def _nothing_labelled(w):
    assert not read_labels(w / "twice" / "l.h5")["key"].tolist()


def _crystals_generated(w):
    structures = ase.io.read(next((w / "generated").glob("generated_denovo_*.extxyz")), ":")
    assert len(structures) == 3 and all(a.pbc.all() and len(a) == 5 for a in structures)


THEN = {  # what must hold on disk after a case, beyond its exit status and message
    "train: a 500-atom crystal in a CDVAE CSV": _no_run_started("big_run"),
    "train: a site of occupancy -1": _no_run_started("negative_run"),
    "label: partial, negative and mixed sites of a CDVAE CSV": _only_whole_sites_labelled("sites"),
    "label: partial, negative and mixed sites of a CIF file": _only_whole_sites_labelled("cif"),
    "label: two crystals with one material_id": _nothing_labelled,
    "label: --generate with a crystal checkpoint": _crystals_generated,
}


outcomes, test_hostile_case = hostile_table(CASES, THEN)
