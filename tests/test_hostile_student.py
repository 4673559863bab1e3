"""Hostile but realistic use of the student force field (train.py and evaluate.py --task ff): held-out structures
decided by key however the training file is copied or merged, labels no teacher gives (elements outside 1-118, atom
counts that do not tile the atoms, forces of 1e30 eV/A), files given twice, elements the student never saw, and
flags out of range. The runner and its conventions are in tests/hostile.py."""
import json
import shutil

import h5py
import numpy as np
import pytest
from ase.build import bulk

from conftest import run_script
from hostile import hostile_table
from models.checkpoint import load_checkpoint, save_checkpoint
from models.labels import LabelWriter
from test_train_ff import emt_rows

FF = "--task ff --preset tiny --iters 4 --ckpt-every 4 --batch-size 8 --val-fraction 0.2 --eval-every 0 --log-every 2"
EVAL = "evaluate.py --task ff --no-teacher --speed-structures 1 --md-structures 0"


def train(name, data, more=""):
    """A train.py --task ff command whose run goes to {w}/<name>."""
    return f"train.py {FF} --data {data} --out {{w}}/{name} {more}".strip()


def evaluate(name, labels, ckpt="{w}/student/ckpt.pt", more=""):
    """An evaluate.py --task ff command whose metrics go to {w}/<name>/m.json."""
    return f"{EVAL} --ckpt {ckpt} {labels} --json {{w}}/{name}/m.json {more}".strip()


# (id, command ({w}: the prepared world), exit status, words that the message must contain, None: no mount)
CASES = [
    # -- held out by key: a copy or a merge of the training file holds out what the file itself did
    ("ff evaluate: a byte copy of the training file", evaluate("ev_copy", "{w}/elsewhere/copy.h5"), 0, ["held-out structures of 32"], None),
    ("ff evaluate: a label.py merge of the training file", evaluate("ev_merged", "{w}/merged.h5"), 0, ["held-out structures of 38"], None),
    ("ff evaluate: the training file given twice", evaluate("ev_twice", "{w}/emt.h5 {w}/emt.h5"), 0,
     ["emt.h5 is given more than once", "32 structures are used once"], None),
    ("ff evaluate: a checkpoint without training keys", evaluate("ev_old", "{w}/elsewhere/copy.h5", ckpt="{w}/old.pt"), 0,
     ["old.pt records no training keys", "assumed it trained on every structure", "training side of its split"], None),
    # -- labels no teacher gives
    ("ff train: Z = 0", train("z0_run", "{w}/z0.h5"), 1, ["z0.h5, structure 1 (key 'vmol1')", "atomic number 0", "1 to 118"], None),
    ("ff train: Z = 250", train("z250_run", "{w}/z250.h5"), 1, ["z250.h5, structure 1", "atomic number 250"], None),
    ("ff evaluate: Z = 250", evaluate("ev_z250", "{w}/z250.h5"), 1, ["z250.h5, structure 1", "atomic number 250"], None),
    ("ff train: n_atoms that disagree with the atoms", train("natoms_run", "{w}/natoms.h5"), 1,
     ["natoms.h5: damaged labels file", "structure 2 (key 'vmol2') has n_atoms", "next structure starts"], None),
    ("ff evaluate: n_atoms that disagree with the atoms", evaluate("ev_natoms", "{w}/natoms.h5"), 1,
     ["natoms.h5: damaged labels file", "structure 2"], None),
    ("ff train: a structure without atoms", train("empty_run", "{w}/emt.h5 {w}/noatoms.h5"), 1,
     ["noatoms.h5, structure 3", "without atoms"], None),
    # -- implausible forces are left out, named; a bound that leaves nothing is an error
    ("ff train: a force of 1e30 eV/A", train("f30_run", "{w}/emt.h5 {w}/f30.h5"), 0,
     ["1 structure with an atom's force above 100 eV/A", "f30.h5, structure 2 (key 'vmol2'), 1e+30 eV/A"], None),
    ("ff evaluate: a force of 1e30 eV/A", evaluate("ev_f30", "{w}/f30.h5"), 0, ["f30.h5, structure 2", "left out"], None),
    ("ff train: a --max-force no structure meets", train("maxf_run", "{w}/f30.h5", "--max-force 0.001"), 1,
     ["every structure has an atom's force above 0.001 eV/A"], None),
    ("ff train: --max-force nan", train("x", "{w}/emt.h5", "--max-force nan"), 2, ["--max-force", "finite number > 0"], None),
    ("ff train: labels all at rest (crystals at equilibrium)", train("rest_run", "{w}/rest.h5"), 0, ["data: "], None),
    # -- one structure, one key
    ("ff train: the same file twice", train("twice_run", "{w}/emt.h5 {w}/emt.h5"), 0,
     ["emt.h5 is given more than once", "32 structures are used once"], None),
    ("ff train: a byte copy beside its original", train("copy_run", "{w}/emt.h5 {w}/elsewhere/copy.h5"), 0,
     ["32 structures of", "copy.h5 are also in", "each is used once"], None),
    ("ff train: two structures under one key", train("clash_run", "{w}/emt.h5 {w}/clash.h5"), 1,
     ["clash.h5, structure 0 (key 'mol0')", "share a key but hold different structures"], None),
    # -- elements the student never saw
    ("ff evaluate: a structure with an element it never saw", evaluate("ev_fluorine", "{w}/fluorine.h5"), 0,
     ["1 of 6 held-out structures", "F (9)", "it knows H, C, N, O, Cu", "fluorine.h5, structure 0", "not scored"], None),
    ("ff evaluate: only elements it never saw", evaluate("ev_gold", "{w}/gold.h5"), 1,
     ["4 of 4 held-out structures", "Au (79)", "it knows H, C, N, O, Cu", "nothing to score"], None),
    # -- flags
    ("ff train: --cutoff 1e6", train("x", "{w}/emt.h5", "--cutoff 1e6"), 2, ["--cutoff", "a radius in [2, 12] A", "'1e6'"], None),
    ("ff train: --cutoff 0.1", train("x", "{w}/emt.h5", "--cutoff 0.1"), 2, ["--cutoff", "a radius in [2, 12] A"], None),
    ("ff evaluate: --md-steps 5", evaluate("ev_md5", "{w}/f30.h5", more="--md-structures 1 --md-steps 5"), 0, ["NVE", "5 steps"], None),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny student of EMT labels (emt.h5: 24 molecules and 8 copper crystals), the same student's checkpoint as
    written before training keys were kept, copies and a merge of its training file, and damaged labels files."""
    w = tmp_path_factory.mktemp("student_world")
    teacher, rows = emt_rows(24, 8)

    def write(name, rows):
        with LabelWriter(w / name, teacher.name, teacher.version) as lw:
            lw.append(rows, 1.0)

    write("emt.h5", rows)
    run_script(*train("student", "{w}/emt.h5").format(w=w).split())
    ckpt = load_checkpoint(w / "student" / "ckpt.pt", task="ff")
    ckpt.pop("format")
    save_checkpoint(w / "old.pt", {k: v for k, v in ckpt.items() if k != "trained_key_hashes"})
    (w / "elsewhere").mkdir()
    shutil.copyfile(w / "emt.h5", w / "elsewhere" / "copy.h5")
    write("extra.h5", emt_rows(6, 0, seed=1, prefix="x")[1])
    run_script("label.py", "merge", w / "emt.h5", w / "extra.h5", "--out", w / "merged.h5")

    def variant(name, change):
        """Six of the structures under other keys ('v' + key), one of them changed."""
        copies = [{**r, "key": "v" + r["key"], "numbers": np.array(r["numbers"]), "forces": np.array(r["forces"])}
                  for r in rows[:6]]
        change(copies)
        write(name, copies)

    variant("z0.h5", lambda r: r[1]["numbers"].__setitem__(0, 0))
    variant("z250.h5", lambda r: r[1]["numbers"].__setitem__(0, 250))
    variant("f30.h5", lambda r: r[2]["forces"].__setitem__((0, 0), 1e30))
    variant("fluorine.h5", lambda r: r[0]["numbers"].__setitem__(0, 9))
    variant("noatoms.h5", lambda r: r[3].update(numbers=np.zeros(0, int), positions=np.zeros((0, 3)), forces=np.zeros((0, 3))))
    variant("natoms.h5", lambda r: None)
    with h5py.File(w / "natoms.h5", "a") as f:  # structure 2 claims three atoms more than it has
        f["n_atoms"][2] += 3
    moved = {**rows[0], "positions": np.array(rows[0]["positions"]) + 0.1}
    write("clash.h5", [moved])  # key "mol0" of emt.h5, other positions
    def crystals(element, a0, n):
        """n one-atom fcc cells of an element, strained by 0 to n %: no atom feels a force."""
        out = []
        for k in range(n):
            a = bulk(element, "fcc", a=a0 * (1 + 0.01 * k))
            e, f, s = teacher.label(a)
            out.append(dict(numbers=a.numbers, positions=a.positions, forces=f, energy=e, stress=s, cell=a.cell.array,
                            pbc=a.pbc, source="fcc", key=f"{element}{k}"))
        return out

    write("gold.h5", crystals("Au", 4.08, 4))
    write("rest.h5", crystals("Cu", 3.6, 12))
    return w




def _n_valid(w) -> int:
    return load_checkpoint(w / "student" / "ckpt.pt", task="ff")["n_valid"]


def _metrics(w, name) -> dict:
    return json.loads((w / name / "m.json").read_text())


def _held_out(name, extra=0):
    """The scored structures are the student's validation side (plus `extra` it never saw), not its training side."""
    def check(w):
        result = _metrics(w, name)
        assert 0 < _n_valid(w) < 32 and result["held_out"] == _n_valid(w) + extra, result["held_out"]
    return check


def _structures(name, n):
    """The run trained and validated on n structures: none twice, none left out but those the case names."""
    def check(w):
        ckpt = load_checkpoint(w / name / "ckpt.pt", task="ff")
        assert ckpt["n_train"] + ckpt["n_valid"] == n and len(ckpt["trained_key_hashes"]) == ckpt["n_train"]
    return check


def _scored(name, n):
    def check(w):
        assert _metrics(w, name)["held_out"] == n
    return check


def _finite_loss(w):
    """Forces all zero do not become the unit of force error (it was 1e-15 eV/A, and the loss 1e25): the loss stays finite."""
    ckpt = load_checkpoint(w / "rest_run" / "ckpt.pt", task="ff")
    assert ckpt["objective_config"]["force_scale"] == 0.01, ckpt["objective_config"]
    losses = [r["loss"] for r in map(json.loads, (w / "rest_run" / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(np.isfinite(v) and v < 1e4 for v in losses), losses


def _md_ran(w):
    """Every MD run made its 5 steps, so its verdict is about dynamics that happened."""
    runs = _metrics(w, "ev_md5")["md"]
    assert runs and all(r["steps"] == 5 and r["ps"] > 0 and len(r["trace"]["ps"]) == 2 for r in runs), runs


THEN = {  # what must hold on disk after a case, beyond its exit status and message
    "ff evaluate: a byte copy of the training file": _held_out("ev_copy"),
    "ff evaluate: a label.py merge of the training file": _held_out("ev_merged", extra=6),
    "ff evaluate: the training file given twice": _held_out("ev_twice"),
    "ff evaluate: a checkpoint without training keys": _held_out("ev_old"),  # the same split, assumed
    "ff train: a force of 1e30 eV/A": _structures("f30_run", 32 + 5),
    "ff evaluate: a force of 1e30 eV/A": _scored("ev_f30", 5),
    "ff train: labels all at rest (crystals at equilibrium)": _finite_loss,
    "ff train: the same file twice": _structures("twice_run", 32),
    "ff train: a byte copy beside its original": _structures("copy_run", 32),
    "ff evaluate: a structure with an element it never saw": _scored("ev_fluorine", 5),
    "ff evaluate: --md-steps 5": _md_ran,
}


outcomes, test_hostile_case = hostile_table(CASES, THEN, data="world")
