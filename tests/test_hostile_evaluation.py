"""Hostile samples and caches for evaluate.py: crystals whose cell is degenerate (which CrystalNN and CHGNet never
finish), structures past the per-structure time limit, frames of no atoms or with an atom of no element, and --stability caches
that are damaged or cannot be written. The runner and its conventions are in tests/hostile.py; the kill of a
--hull relaxed run is in test_crash_safety.py."""
import json
import shutil

import numpy as np
import pytest

from conftest import run_script
from hostile import ROOT, hostile_table

CARBON_RUN = "--data carbon24 --stability --relax-steps 2 --n-unique 3 --no-coverage --workers 1 --no-progress"
REFERENCE = "--reference carbon24 --stability --relax-steps 2 --n-unique 2 --no-coverage --workers 1 --no-progress"
RELAXED = "cdvae_carbon24_val_chgnet_relaxed.npz"
# (id, command (placeholders: {w} the prepared world, {data} the QM9 fixture cache dir), exit status, words that the
#  message must contain, mount over {w}/mnt or None)
CASES = [
    # -- a crystal judged not well formed gets none of the expensive work: the old code hung in CrystalNN or CHGNet
    ("evaluate: a crystal 1e-4 A thin", "evaluate.py {w}/thin.extxyz --data perov5 --data-dir {w}/perov --workers 2 "
     "--no-progress --json {w}/thin/metrics.json", 0,
     ["1 of 3 crystals are not well formed (structure 2 (line 8)", "uncovered"], None),
    ("evaluate: an atom 0.05 A from its own image", "evaluate.py {w}/skewed.extxyz --data perov5 --data-dir {w}/perov "
     "--workers 1 --no-progress --json {w}/skewed/metrics.json", 0,
     ["1 of 2 crystals are not well formed (structure 2 (line 8)", "structural validity 50.00 %"], None),
    ("evaluate --stability: a crystal 1e-4 A thin and an empty frame", "evaluate.py {w}/carbon_thin.extxyz "
     f"{CARBON_RUN} --data-dir {{w}}/stability --json {{w}}/carbon_thin/metrics.json", 0,
     ["2 of 3 crystals are not well formed (structures 1 (line 1), 2 (line 8)"], None),
    # -- one structure's work is bounded
    ("evaluate: a fingerprint past --structure-timeout", "evaluate.py {w}/big.extxyz --data perov5 --data-dir {w}/perov "
     "--workers 1 --structure-timeout 3 --no-progress --json {w}/big/metrics.json", 0,
     ["fingerprints: 1 of 2 not computed (1 over the time limit of 3 s per structure (--structure-timeout))",
      "they count as uncovered"], None),
    ("evaluate --stability: a relaxation past --structure-timeout", "evaluate.py {w}/squeezed.extxyz "
     f"{CARBON_RUN.replace('--relax-steps 2', '--relax-steps 500')} --structure-timeout 0.5 --data-dir {{w}}/stability "
     "--json {w}/slow_relax/metrics.json", 0,
     ["relaxations: 1 of 1 not computed (1 over the time limit of 0.5 s per structure", "they count as not stable"], None),
    ("evaluate: --structure-timeout 0", "evaluate.py {w}/thin.extxyz --data perov5 --structure-timeout 0", 2,
     ["--structure-timeout", "finite number > 0"], None),
    # -- frames of no atoms are samples that failed; an atom of no element is refused
    ("evaluate: crystal frames with no atoms", "evaluate.py {w}/empty_frames.extxyz --data perov5 --data-dir {w}/perov "
     "--workers 1 --no-progress --json {w}/empty_frames/metrics.json", 0,
     ["2 of 4 crystals are not well formed (structures 2 (line 8), 4 (line 17)", "count as invalid"], None),
    ("evaluate: a molecule frame with no atoms", "evaluate.py {w}/empty_molecule/samples.extxyz --data-dir {data} "
     "--no-fcd --no-progress", 0, ["1 of 2 structures have no atoms", "unstable and invalid"], None),
    ("evaluate: an atom of the dummy element X", "evaluate.py {w}/dummy.extxyz --data perov5 --data-dir {w}/perov "
     "--workers 1 --no-progress --json {w}/dummy/metrics.json", 0,
     ["1 of 2 crystals are not well formed (structure 2 (line 8)", "an atom of no element"], None),
    # -- damaged --stability caches are set aside, never deleted, and rebuilt
    ("evaluate --stability: a damaged CHGNet-energy cache", f"evaluate.py {REFERENCE} --data-dir {{w}}/damaged_static "
     "--json {w}/damaged_static_out/metrics.json", 0,
     ["cdvae_carbon24_val_chgnet.npz is damaged", "set aside as cdvae_carbon24_val_chgnet.npz.damaged.2", "rebuilt"], None),
    ("evaluate --hull relaxed: a truncated relaxed-hull cache", f"evaluate.py {REFERENCE} --hull relaxed --data-dir "
     "{w}/damaged_relaxed --json {w}/damaged_relaxed_out/metrics.json", 0,
     [f"{RELAXED} is damaged", f"set aside as {RELAXED}.damaged"], None),
    ("evaluate --stability: an elemental cache without its energies", f"evaluate.py {REFERENCE} --data-dir "
     "{w}/damaged_elements --json {w}/damaged_elements_out/metrics.json", 0,
     ["chgnet_elements.npz is damaged", "KeyError", "set aside as chgnet_elements.npz.damaged"], None),
    # -- a cache that cannot be written is an error before the work, not after it
    ("evaluate --stability: read-only --data-dir, energies not cached", f"evaluate.py {REFERENCE} --data-dir {{w}}/mnt/missing "
     "--json {w}/ro_missing/metrics.json", 1,
     ["cdvae_carbon24_val_chgnet.npz is to be written", "--data-dir", "mnt/missing is not writable"], "read-only copy of ro/"),
    ("evaluate --hull relaxed: read-only --data-dir, relaxations not cached", f"evaluate.py {REFERENCE} --hull relaxed "
     "--data-dir {w}/mnt/single --json {w}/ro_single/metrics.json", 1,
     [f"{RELAXED} is to be written", "not writable"], "read-only copy of ro/"),
    ("evaluate --stability: a damaged cache in a read-only --data-dir", f"evaluate.py {REFERENCE} --data-dir "
     "{w}/mnt/damaged --json {w}/ro_damaged/metrics.json", 1,
     ["cdvae_carbon24_val_chgnet.npz is damaged", "cannot be set aside", "move it away"], "read-only copy of ro/"),
]

CELL = '"{cell}" Properties=species:S:1:pos:R:3 pbc="T T T" train_split=val'
CUBE = CELL.format(cell="4 0 0 0 4 0 0 0 4")
PEROVSKITE = f"5\nLattice={CUBE}\nCa 0 0 0\nTi 2 2 2\nO 2 2 0\nO 2 0 2\nO 0 2 2\n"
THIN = f"5\nLattice={CELL.format(cell='6 0 0 0 6 0 0 0 0.0001')}\nCs 0 0 0\nPb 3 3 0\nI 3 0 0\nI 3 3 0\nI 0 3 0\n"
# 5 A edges at 119.999 degrees: a lattice vector of 0.05 A, though every edge is long and the volume 1 A^3
SKEWED = f"5\nLattice={CELL.format(cell='5 0 0 -2.49992442 4.33017065 0 -2.49992442 -4.32990886 0.0476148')}\n" \
         "Ca 0 0 0\nTi 1 1 0.02\nO 2 0.5 0.01\nO 0 1 0.03\nO 1 2 0.01\n"


def big_crystal() -> str:
    """125 carbon atoms on a 5 x 5 x 5 grid in an 8.125 A cell: well formed, and about 11 s of CrystalNN on one core
    here, against a fraction of a second for the perovskite beside it. The case's limit, 3 s, sits well inside both
    margins, so neither a loaded machine nor a faster one moves a crystal across it."""
    grid = np.stack(np.meshgrid(*[np.arange(5)] * 3, indexing="ij"), -1).reshape(-1, 3) * 8.125 / 5
    grid += np.random.default_rng(0).normal(0, 0.05, grid.shape)
    return f"125\nLattice={CELL.format(cell='8.125 0 0 0 8.125 0 0 0 8.125')}\n" + "".join(f"C {x} {y} {z}\n" for x, y, z in grid)


@pytest.fixture(scope="module")
def world(tmp_path_factory, carbon_reference_cache):
    """Sample files and data directories: perov-5's fixture for the cases without CHGNet; for the rest, carbon-24's,
    with the caches of one real --hull relaxed run copied in, whole, damaged or left out (its carbon reference given,
    carbon_reference_cache: the case of a damaged one relaxes them again)."""
    import ase.io

    from models.crystals import read_cdvae_csv

    w = tmp_path_factory.mktemp("world")
    (w / "mnt").mkdir()
    (w / "perov" / "cdvae" / "perov_5").mkdir(parents=True)
    for split, fixture in (("val", "perov5_val_sample.csv"), ("test", "perov5_sample.csv")):
        shutil.copy(ROOT / "tests" / "data" / fixture, w / "perov" / "cdvae" / "perov_5" / f"{split}.csv")
    (w / "thin.extxyz").write_text(PEROVSKITE + THIN + PEROVSKITE)
    (w / "skewed.extxyz").write_text(PEROVSKITE + SKEWED)
    (w / "big.extxyz").write_text(PEROVSKITE + big_crystal())
    (w / "empty_frames.extxyz").write_text(f"{PEROVSKITE}0\nLattice={CUBE}\n{PEROVSKITE}0\nno cell\n")
    (w / "dummy.extxyz").write_text(PEROVSKITE + PEROVSKITE.replace("Ti 2 2 2", "X 2 2 2"))
    (w / "empty_molecule").mkdir()
    (w / "empty_molecule" / "samples.extxyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.74\n"
                                                        "0\nProperties=species:S:1:pos:R:3\n")
    carbon = read_cdvae_csv(ROOT / "tests" / "data" / "carbon24_sample.csv", progress=False).to_atoms(0)
    carbon.info["train_split"] = "val"
    ase.io.write(w / "carbon.extxyz", [carbon], format="extxyz")
    (w / "carbon_thin.extxyz").write_text(THIN.replace("Cs", "C").replace("Pb", "C").replace("I ", "C ") + "0\nno cell\n"
                                          + (w / "carbon.extxyz").read_text())
    carbon.set_cell(carbon.cell * 0.85, scale_atoms=True)  # compressed by 15 %: hundreds of FIRE steps to relax
    ase.io.write(w / "squeezed.extxyz", [carbon], format="extxyz")

    seed = w / "seed"
    (seed / "cdvae" / "carbon_24").mkdir(parents=True)
    for split in ("val", "test"):
        shutil.copy(ROOT / "tests" / "data" / "carbon24_sample.csv", seed / "cdvae" / "carbon_24" / f"{split}.csv")
    carbon_reference_cache(seed)
    run_script("evaluate.py", *REFERENCE.split(), "--hull", "relaxed", "--data-dir", seed, "--json", w / "seed_out" / "metrics.json")

    def data_dir(path, leave_out=(), damage=None):
        """A copy of the seed's data and caches at path, without the caches leave_out, with damage {name: bytes}."""
        shutil.copytree(seed, path, ignore=shutil.ignore_patterns("*.lock", *leave_out))
        for name, content in (damage or {}).items():
            (path / name).write_bytes(content)

    relaxed = (seed / RELAXED).read_bytes()
    data_dir(w / "stability")
    data_dir(w / "damaged_static", damage={"cdvae_carbon24_val_chgnet.npz": b"garbage\n",
                                           "cdvae_carbon24_val_chgnet.npz.damaged": b"set aside by an earlier run\n"})
    data_dir(w / "damaged_relaxed", damage={RELAXED: relaxed[:len(relaxed) // 2]})
    with open(w / "elements_without_energies.npz", "wb") as f:
        np.savez(f, version=np.array("chgnet"), z=np.array([6]))
    data_dir(w / "damaged_elements", damage={"chgnet_elements.npz": (w / "elements_without_energies.npz").read_bytes()})
    data_dir(w / "ro" / "missing", leave_out=("*chgnet*",))
    data_dir(w / "ro" / "single", leave_out=(RELAXED,))
    data_dir(w / "ro" / "damaged", damage={"cdvae_carbon24_val_chgnet.npz": b"garbage\n"})
    return w




def metrics(path):
    return json.loads(path.read_text())


def _thin_skipped(w):
    m = metrics(w / "thin" / "metrics.json")
    assert m["not_well_formed"] == 1 and m["not_computed"]["fingerprints"] == {"not well formed": 1}
    assert m["structural_validity"] == pytest.approx(2 / 3) and m["uniqueness"] == pytest.approx(2 / 3)  # two copies


def _skewed_invalid(w):  # the old code took it as valid, its 107 g/cm^3 into the density distance
    m = metrics(w / "skewed" / "metrics.json")
    assert m["structural_validity"] == 0.5 and m["not_computed"]["fingerprints"] == {"not well formed": 1}


def _thin_not_relaxed(w):
    import ase.io

    m = metrics(w / "carbon_thin" / "metrics.json")
    assert m["stability_of"] == 3 and m["relax_failed"] == 0 and m["empty"] == 1
    assert m["not_computed"]["relaxations"] == {"not well formed": 2} and m["stable_rate"] <= 1 / 3
    assert len(ase.io.read(w / "carbon_thin" / "relaxed.extxyz", ":")) == 3


def _fingerprint_stopped(w):
    assert metrics(w / "big" / "metrics.json")["not_computed"]["fingerprints"] == {"over the time limit": 1}


def _relaxation_stopped(w):
    m = metrics(w / "slow_relax" / "metrics.json")
    assert m["not_computed"]["relaxations"] == {"over the time limit": 1} and m["stable_rate"] == 0 and m["relax_failed"] == 0


def _empty_frames_counted(w):
    m = metrics(w / "empty_frames" / "metrics.json")
    assert m["crystals"] == 4 and m["empty"] == 2 and m["validity"] == 0.5


def _empty_molecule_counted(w):
    m = metrics(w / "empty_molecule" / "metrics.json")
    assert m["empty"] == 1 and m["n_samples"] == 2 and m["mol_stability"] == 0.5 and m["validity"] == 0.5


def _dummy_invalid(w):
    m = metrics(w / "dummy" / "metrics.json")
    assert m["compositional_validity"] == 0.5 and m["not_computed"]["fingerprints"] == {"not well formed": 1}


def _static_set_aside(w):
    d = w / "damaged_static"
    assert (d / "cdvae_carbon24_val_chgnet.npz.damaged").read_bytes() == b"set aside by an earlier run\n"
    assert (d / "cdvae_carbon24_val_chgnet.npz.damaged.2").read_bytes() == b"garbage\n"
    with np.load(d / "cdvae_carbon24_val_chgnet.npz") as z, np.load(w / "seed" / "cdvae_carbon24_val_chgnet.npz") as seed:
        assert np.array_equal(z["energy"], seed["energy"])


def _relaxed_set_aside(w):
    d, seed = w / "damaged_relaxed", (w / "seed" / RELAXED).read_bytes()
    assert (d / f"{RELAXED}.damaged").read_bytes() == seed[:len(seed) // 2]
    with np.load(d / RELAXED) as z:
        assert z["done"].all()
    expected = metrics(w / "seed_out" / "metrics.json")
    got = metrics(d.with_name("damaged_relaxed_out") / "metrics.json")
    assert {k: v for k, v in got.items() if "seconds" not in k} == {k: v for k, v in expected.items() if "seconds" not in k}


def _elements_set_aside(w):
    d = w / "damaged_elements"
    assert (d / "chgnet_elements.npz.damaged").read_bytes() == (w / "elements_without_energies.npz").read_bytes()
    with np.load(d / "chgnet_elements.npz") as z, np.load(w / "seed" / "chgnet_elements.npz") as seed:
        assert z["z"].tolist() == [6] and np.array_equal(z["energy"], seed["energy"])


THEN = {  # what must hold on disk after a case, beyond its exit status and message
    "evaluate: a crystal 1e-4 A thin": _thin_skipped, "evaluate: an atom 0.05 A from its own image": _skewed_invalid,
    "evaluate --stability: a crystal 1e-4 A thin and an empty frame": _thin_not_relaxed,
    "evaluate: a fingerprint past --structure-timeout": _fingerprint_stopped,
    "evaluate --stability: a relaxation past --structure-timeout": _relaxation_stopped,
    "evaluate: crystal frames with no atoms": _empty_frames_counted,
    "evaluate: a molecule frame with no atoms": _empty_molecule_counted, "evaluate: an atom of the dummy element X": _dummy_invalid,
    "evaluate --stability: a damaged CHGNet-energy cache": _static_set_aside,
    "evaluate --hull relaxed: a truncated relaxed-hull cache": _relaxed_set_aside,
    "evaluate --stability: an elemental cache without its energies": _elements_set_aside,
}


outcomes, test_hostile_case = hostile_table(CASES, THEN)
