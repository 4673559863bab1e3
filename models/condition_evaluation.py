"""EDM's conditional-generation metric (evaluate.py --oracle): the mean absolute error between the property each
structure was asked for and the property oracle's prediction for it (molecules or crystals), beside the protocol's baselines, all computed
here on the same oracle and data (Hoogeboom et al. 2022, section 4.2 and table 3):

- L-bound: the oracle's own error on the generator's half of the training split (molecules it never trained on),
  the best a generator can be judged to do;
- #Atoms: the property predicted from the atom count alone (the median of the oracle's half at each count), scored
  on the generator's half: a generator below it conditions on more than size (on perov-5, whose cells all hold 5
  atoms, it is the median);
- U-bound: the oracle's predictions on the generator's half against the same half's properties shuffled, what a
  generator that ignores its condition scores.

One more, not EDM's: #Atoms, sampled, what a generator that gets each structure's size right and ignores its property
scores under a perfect judge: each structure of the generator's half against a structure of its size drawn from the
oracle's half. #Atoms is a point prediction, the median, with no scatter; a generator's structures scatter around
whatever they follow, so one that conditions on size alone lands about 1.4 times above #Atoms on QM9, and a
generator between the two conditions on more than size while still losing to the median.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.fileio import DataError

BATCH = 256  # structures per oracle pass


@torch.no_grad()
def predict(model, structures: list[tuple], norm, kind: str, vocabulary: list[int], progress: bool = False) -> np.ndarray:
    """The oracle's properties [S, C] in their units for structures: molecules as (atomic numbers [n], positions
    [n, 3]), crystals as (atomic numbers [n], frac [n, 3], lengths [3], angles [3]); vocabulary: the atomic numbers of
    the oracle's types. Batches of similar sizes, each padded only to its largest. progress: a bar in structures/s."""
    from tqdm import tqdm

    lut = np.full(256, -1)
    lut[np.asarray(vocabulary)] = np.arange(len(vocabulary))
    order = np.argsort([len(s[0]) for s in structures], kind="stable")
    out = np.zeros((len(structures), len(norm.names)))
    bar = tqdm(total=len(structures), unit="structure", desc="oracle", disable=not progress, dynamic_ncols=True)
    for lo in range(0, len(order), BATCH):
        rows = order[lo:lo + BATCH]
        n = max(len(structures[i][0]) for i in rows)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        types, coords = torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n, 3)
        for k, i in enumerate(rows):
            z, x = structures[i][0], structures[i][1]
            types[k, :len(z)], coords[k, :len(z)], mask[k, :len(z)] = torch.from_numpy(lut[z]), torch.from_numpy(np.asarray(x)).float(), True
        if kind == "molecules":
            batch = {"types": types, "pos": coords, "mask": mask}
        else:
            batch = {"types": types, "frac": coords, "mask": mask,
                     "lengths": torch.tensor(np.array([structures[i][2] for i in rows])).float(),
                     "angles": torch.tensor(np.array([structures[i][3] for i in rows])).float()}
        out[rows] = model(batch).double().numpy() * norm.std + norm.mean
        bar.update(len(rows))
    bar.close()
    return out


def training_halves(ckpt: dict, data_dir):
    """(the generator's half, the oracle's half) of the training split the oracle checkpoint was trained on."""
    from models.condition import protocol_halves

    if ckpt.get("domain", "molecules") == "molecules":
        from models.molecules import load_qm9
        train = load_qm9("train", data_dir)
    else:
        from types import SimpleNamespace

        from models.domains import get_domain
        train, _ = get_domain(ckpt["data"]).splits(SimpleNamespace(train_split=ckpt["args"]["train_split"], data_dir=data_dir),
                                                   progress=False)
    halves = protocol_halves(len(train))
    return train.subset(halves["generator"]), train.subset(halves["oracle"])


def as_inputs(train, kind: str) -> list[tuple]:
    """A MoleculeSet's or CrystalSet's structures in predict()'s form."""
    return [train[i] for i in range(len(train))] if kind == "molecules" else train.arrays()


def generator_half_predictions(model, ckpt: dict, oracle_path: Path, generator, norm, kind: str, vocabulary: list[int],
                               data_dir, progress: bool = True) -> np.ndarray:
    """The oracle's predictions [S, C] on the generator's half, which the L-bound and U-bound read: 50,000 QM9
    molecules, minutes on a CPU. Cached in the data directory under the oracle file's content hash, so every
    evaluation with the same oracle reuses them and a retrained oracle (another file) never meets its predecessor's.
    progress: a bar while they are predicted."""
    import logging

    from models.fileio import git_blob_sha1, read_npz_cache, save_npz
    from models.molecules import default_data_dir

    split = ckpt["args"].get("train_split", "train") if kind == "crystals" else "train"
    path = Path(data_dir or default_data_dir()) / f"oracle_{ckpt['data']}_{split}_{git_blob_sha1(oracle_path)[:16]}_generator_half.npz"
    cached = read_npz_cache(path, ("predictions",), logging.getLogger("evaluate"))
    if cached is not None and cached["predictions"].shape == (len(generator), len(norm.names)):
        return cached["predictions"]
    predictions = predict(model, as_inputs(generator, kind), norm, kind, vocabulary, progress)
    try:
        save_npz(path, {"predictions": predictions})
    except OSError as e:  # a read-only data directory: the next evaluation predicts again
        logging.getLogger("evaluate").warning(f"warning: the oracle's predictions on the generator's half not cached at {path}: {e}")
    return predictions


def load_oracle(oracle_path: Path, data: str | None) -> dict:
    """The --task oracle checkpoint at oracle_path, which must judge the data set `data` (None: any); DataError or
    CheckpointError naming it otherwise."""
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(oracle_path, task="oracle")
    if data is not None and ckpt["data"] != data:
        raise DataError(f"{oracle_path} is an oracle of {ckpt['data']}, and the samples are scored as {data}")
    return ckpt


# The properties a universal potential predicts directly, by data set: CHGNet's energy per atom is a second judge of
# these, independent of the oracle (it never saw the data set). Carbon-24's energies are CASTEP's (about -154 eV/atom),
# on another zero than CHGNet's Materials Project one, so CHGNet's are shifted by the median difference on the
# oracle's half, which the generator never trains on.
CHGNET_CHECKED = {"carbon24": "energy_per_atom"}
CHGNET_REFERENCE = 256  # crystals of each half that CHGNet scores for the offset and for its L-bound


def chgnet_check(crystals: list[tuple], asked: np.ndarray, generator, oracle_half, name: str, rng) -> dict:
    """CHGNet's judgement of `name` (an energy per atom) for the samples `crystals` [(numbers, frac, lengths, angles)]
    that requested `asked`: its MAE after the offset to the data's energy zero (the median of data minus CHGNet over
    up to CHGNET_REFERENCE crystals of the oracle's half), and its own L-bound, the same MAE on up to
    CHGNET_REFERENCE crystals of the generator's half against their data values. NaN where CHGNet fails on a
    sample, which leaves the MAE and is counted."""
    from models.crystal_stability import chgnet_version, static_energies

    def subset(half):
        rows = np.sort(rng.choice(len(half), min(CHGNET_REFERENCE, len(half)), replace=False))
        arrays = half.arrays()
        return [arrays[i] for i in rows], half.property_values(name)[rows]
    reference, reference_values = subset(oracle_half)
    offset = float(np.nanmedian(reference_values - static_energies(reference, progress=False)))
    real, real_values = subset(generator)
    predicted = static_energies(crystals, progress=False) + offset
    failed = ~np.isfinite(predicted)
    return {"chgnet_mae": float(np.abs(predicted[~failed] - asked[~failed]).mean()) if (~failed).any() else float("nan"),
            "chgnet_l_bound": float(np.nanmean(np.abs(static_energies(real, progress=False) + offset - real_values))),
            "chgnet_offset": offset, "chgnet_failed": int(failed.sum()), "chgnet": chgnet_version()}


# QM9's electronic properties that GFN2-xTB computes as well: a second judge of these, independent of the oracle (xtb
# never saw QM9). Its orbital energies and dipoles are not B3LYP's, so each is mapped to the data's by a straight line
# fitted on molecules of the oracle's half (the generator never trains on them); its error on molecules of the
# generator's half is its L-bound. On 300 molecules of each half as QM9 has them (2026-12-06): correlation 0.89 for the
# gap, 0.91 homo, 0.92 lumo, 0.98 mu. QM9's molecules are DFT minima, a sample is not quite a minimum, and orbital energies are
# sensitive to bond lengths: unrelaxed, 150 stable generated molecules read 800 meV too small a gap to xtb and 90 meV
# to the oracle; relaxed with xtb, 5 and 97. So xtb judges every molecule, sample or reference, at its nearest xtb
# minimum (BFGS), and reports the samples as generated beside it.
XTB_CHECKED = ("homo", "lumo", "gap", "mu")
XTB_REFERENCE = 256  # molecules of each half that xtb scores for the line and for its L-bound
XTB_RELAX_FMAX, XTB_RELAX_STEPS = 0.05, 300  # eV/Angstrom, BFGS steps
BOHR_IN_ANGSTROM, E_BOHR_IN_DEBYE = 0.529177210903, 2.541746473


def xtb_properties(molecules: list[tuple], relax: bool = False) -> np.ndarray:
    """GFN2-xTB's (homo, lumo, gap in meV, dipole moment in D) [S, 4] for molecules [(atomic numbers [n], positions
    [n, 3] in Angstrom)], neutral; a molecule with an odd electron count as a doublet, its singly occupied orbital the
    HOMO. relax: at the molecule's nearest xtb minimum (BFGS to XTB_RELAX_FMAX, at most XTB_RELAX_STEPS steps). A row
    of NaN where xtb fails (no SCF convergence, atoms on top of each other)."""
    from tblite.interface import Calculator

    from models.molecules import HARTREE_IN_MEV

    out = np.full((len(molecules), 4), np.nan)
    for i, (numbers, positions) in enumerate(molecules):
        numbers, positions = np.asarray(numbers), np.asarray(positions, float)
        try:
            if relax:
                positions = xtb_relaxed(numbers, positions)
            calc = Calculator("GFN2-xTB", numbers, positions / BOHR_IN_ANGSTROM, uhf=int(numbers.sum()) % 2)
            calc.set("verbosity", 0)
            result = calc.singlepoint()
        except Exception:  # tblite raises a bare RuntimeError for every failure; a failed molecule is counted, not fatal
            continue
        energies = result.get("orbital-energies") * HARTREE_IN_MEV
        n_occupied = (int(round(result.get("orbital-occupations").sum())) + 1) // 2  # valence electrons, in orbitals
        homo, lumo = energies[n_occupied - 1], energies[n_occupied]
        out[i] = homo, lumo, lumo - homo, np.linalg.norm(result.get("dipole")) * E_BOHR_IN_DEBYE
    return out


def xtb_relaxed(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The positions [n, 3] after BFGS under GFN2-xTB (where it stopped, converged or not); raises where xtb fails."""
    from ase import Atoms
    from ase.optimize import BFGS
    from tblite.ase import TBLite

    atoms = Atoms(numbers=numbers, positions=positions)
    atoms.calc = TBLite(method="GFN2-xTB", multiplicity=1 + int(numbers.sum()) % 2, verbosity=0)
    BFGS(atoms, logfile=None).run(fmax=XTB_RELAX_FMAX, steps=XTB_RELAX_STEPS)
    return atoms.positions


def xtb_reference(generator, oracle_half, rng) -> dict:
    """xtb on up to XTB_REFERENCE molecules of each half, relaxed, for every checked property at once: {half: (rows into
    it, xtb_properties of them)}."""
    out = {}
    for half_name, half in (("oracle", oracle_half), ("generator", generator)):
        rows = np.sort(rng.choice(len(half), min(XTB_REFERENCE, len(half)), replace=False))
        out[half_name] = rows, xtb_properties([half[i] for i in rows], relax=True)
    return out


def xtb_check(name: str, asked: np.ndarray, oracle_said: np.ndarray, stable: np.ndarray, on_samples: np.ndarray,
              as_generated: np.ndarray, reference: dict, generator, oracle_half, on_generator: np.ndarray) -> dict:
    """xtb's judgement of `name` for samples that requested `asked` (the oracle said `oracle_said`; `stable`: the
    evaluator's molecule stability of each; on_samples and as_generated: their xtb_properties relaxed and unrelaxed):
    its MAE after the straight line to the data's values (fitted on the oracle half's reference molecules), on all
    samples and on the stable ones; its mean signed error, beside the oracle's and its own on the unrelaxed samples;
    and its own L-bound (the same MAE on the generator half's reference molecules). Beside them, how far the two
    judges lie apart on those real molecules (on_generator: the oracle's predictions on the generator's half) and on
    the samples: where they part far more on samples than on real molecules, at least one of them misreads generated
    molecules."""
    from models.teachers import package_version

    column = XTB_CHECKED.index(name)
    rows, on_reference = reference["oracle"]
    fits = np.isfinite(on_reference[:, column])
    truth = oracle_half.property_values(name)[rows][fits]
    slope, intercept = np.polyfit(on_reference[fits, column], truth, 1)
    rows, on_real = reference["generator"]
    real = slope * on_real[:, column] + intercept
    said = slope * on_samples[:, column] + intercept
    ok, stable = np.isfinite(said), np.asarray(stable, bool)
    errors = said - asked
    return {"xtb_mae": float(np.abs(errors[ok]).mean()) if ok.any() else float("nan"),
            "xtb_mae_stable": float(np.abs(errors[ok & stable]).mean()) if (ok & stable).any() else float("nan"),
            "xtb_n_stable": int((ok & stable).sum()), "xtb_bias": float(errors[ok].mean()) if ok.any() else float("nan"),
            "xtb_bias_as_generated": float(np.nanmean(slope * as_generated[:, column] + intercept - asked)),
            "oracle_bias": float((oracle_said - asked).mean()),
            "xtb_l_bound": float(np.nanmean(np.abs(real - generator.property_values(name)[rows]))),
            "xtb_line": [float(slope), float(intercept)],
            "xtb_corr_reference": float(np.corrcoef(on_reference[fits, column], truth)[0, 1]),
            "judges_apart_real": float(np.nanmean(np.abs(on_generator[rows] - real))),
            "judges_apart_samples": float(np.abs(oracle_said[ok] - said[ok]).mean()) if ok.any() else float("nan"),
            "xtb_failed": int((~ok).sum()), "xtb": f"tblite {package_version('tblite')} GFN2-xTB"}


def within_size_response(asked: np.ndarray, judged: np.ndarray, n_atoms: np.ndarray) -> dict:
    """How the judged property follows the requested one among samples of one size: the slope and correlation of
    judged on asked after each atom count's mean is taken from both. An MAE mixes how far a generator follows its
    condition with how widely its structures scatter around it; the #Atoms baseline, by construction, follows
    nothing beyond size (slope 0), so a slope above 0 is conditioning on more than size even where the MAE is not
    below that baseline's. NaN where no size has two samples with different requests (and the correlation where
    the judged values vary with size alone)."""
    a, j = asked.astype(float).copy(), judged.astype(float).copy()
    for n in np.unique(n_atoms):
        same = n_atoms == n
        a[same] -= a[same].mean()
        j[same] -= j[same].mean()
    spread = (a * a).sum()
    if spread == 0:
        return {"within_size_slope": float("nan"), "within_size_corr": float("nan")}
    if (j * j).sum() <= 1e-24 * (judged.astype(float) ** 2).sum():  # judged varies with size alone, up to rounding
        return {"within_size_slope": 0.0, "within_size_corr": float("nan")}
    return {"within_size_slope": float((a * j).sum() / spread),
            "within_size_corr": float((a * j).sum() / np.sqrt(spread * (j * j).sum()))}


def score_condition(samples_path: Path, oracle_path: Path, ckpt: dict, properties: list[str] | None, data_dir=None,
                    seed: int = 0, progress: bool = True) -> dict:
    """{property: {unit, n_samples, mae, mae_se (its standard error over the samples), within_size_slope and _corr
    (within_size_response), l_bound, n_atoms, n_atoms_sampled, u_bound}} of the structures in samples_path (sample.py's extxyz of a
    conditional checkpoint: each structure's request in info['condition_<property>']), judged by the --task oracle
    checkpoint ckpt read from oracle_path (load_oracle). properties: those to score (default: every property the
    oracle predicts that the samples requested). Raises
    DataError naming the file and the problem (a structure without its request, an element the oracle does not know, a
    property the oracle does not predict). A second judge adds its keys where it applies: CHGNet's (chgnet_*) for
    carbon-24's energy, xtb's (xtb_*, judges_apart_*) for QM9's homo, lumo, gap and mu. progress: bars while the
    oracle predicts the samples and the generator's half (once per oracle file; cached)."""
    from models.condition import Normalisation
    from models.evaluation import read_frames
    from models.molecules import ATOMIC_NUMBERS
    from models.oracle import build_oracle

    kind = ckpt.get("domain", "molecules")
    model = build_oracle(ckpt)[0].eval()
    norm = Normalisation.from_state(ckpt["condition"])
    vocabulary = list(ATOMIC_NUMBERS) if kind == "molecules" else list(ckpt["elements"])
    frames = read_frames(samples_path)
    requested = [n for n in norm.names if all(f"condition_{n}" in atoms.info for _, atoms in frames)]
    if properties is None:
        properties = requested
        if not properties:
            raise DataError(f"{samples_path}: the structures request none of the properties the oracle {oracle_path} predicts "
                            f"({', '.join(norm.names)}): sample.py writes each request as condition_<property> in the "
                            "extxyz info of a conditional checkpoint's structures")
    for name in properties:
        if name not in norm.names:
            raise DataError(f"{oracle_path} predicts {', '.join(norm.names)}, not {name}")
        for k, (line, atoms) in enumerate(frames):
            if f"condition_{name}" not in atoms.info:
                raise DataError(f"{samples_path}: structure {k + 1} ({line}) has no requested {name} "
                                f"(condition_{name} in its extxyz info)")
    # a structure with non-finite coordinates has no property to judge: left out of the MAE, counted (evaluate.py
    # counts it as a failed sample in the other metrics)
    finite = [k for k, (_, atoms) in enumerate(frames) if np.isfinite(atoms.positions).all() and np.isfinite(atoms.cell.array).all()]
    if not finite:
        raise DataError(f"{samples_path}: every structure has non-finite coordinates; nothing for the oracle to judge")
    structures = []
    for k in finite:
        line, atoms = frames[k]
        unknown = sorted(set(atoms.numbers.tolist()) - set(vocabulary))
        periodic = bool(atoms.pbc.all())
        if unknown or not len(atoms) or periodic != (kind == "crystals"):
            why = (f"elements {unknown} outside its vocabulary" if unknown else "no atoms" if not len(atoms)
                   else "periodic" if periodic else "not periodic")
            raise DataError(f"{samples_path}: structure {k + 1} ({line}) is not a structure the {kind} oracle can read ({why})")
        if kind == "molecules":
            structures.append((atoms.numbers, atoms.positions))
        else:
            cell = atoms.cell.cellpar()
            structures.append((atoms.numbers, atoms.get_scaled_positions(wrap=True), cell[:3], cell[3:]))
    predicted = predict(model, structures, norm, kind, vocabulary, progress)

    generator, oracle_half = training_halves(ckpt, data_dir)
    on_generator = generator_half_predictions(model, ckpt, oracle_path, generator, norm, kind, vocabulary, data_dir, progress)
    bounds = baselines(model, ckpt, oracle_path, properties, data_dir, seed, (generator, oracle_half), on_generator)
    rng = np.random.default_rng(seed)
    xtb_checked = [n for n in properties if n in XTB_CHECKED] if kind == "molecules" else []
    if xtb_checked:  # xtb once per molecule for every checked property
        from models.molecule_metrics import stability
        import logging
        logging.getLogger("evaluate").info(f"xtb: relaxing the {len(structures):,} samples and {2 * XTB_REFERENCE} molecules of "
                                             "the data (about half a second each on one core)")
        reference, on_samples = xtb_reference(generator, oracle_half, rng), xtb_properties(structures, relax=True)
        as_generated = xtb_properties(structures)
        stable = [stability(*m)[0] for m in structures]
    result = {}
    n_all, frames = len(frames), [frames[k] for k in finite]
    for name in properties:
        c = norm.names.index(name)
        asked = np.array([float(atoms.info[f"condition_{name}"]) for _, atoms in frames])
        errors = np.abs(predicted[:, c] - asked)
        result[name] = {"unit": norm.units[c], "n_samples": len(frames), "n_non_finite": n_all - len(frames),
                        "mae": float(errors.mean()),
                        "mae_se": float(errors.std(ddof=1) / np.sqrt(len(errors))) if len(errors) > 1 else float("nan"),
                        **within_size_response(asked, predicted[:, c], np.array([len(s[0]) for s in structures])), **bounds[name]}
        if kind == "crystals" and CHGNET_CHECKED.get(ckpt["data"]) == name:
            result[name].update(chgnet_check(structures, asked, generator, oracle_half, name, rng))
        if name in xtb_checked:
            result[name].update(xtb_check(name, asked, predicted[:, c], stable, on_samples, as_generated, reference, generator,
                                          oracle_half, on_generator[:, c]))
    return {"oracle": str(oracle_path), "oracle_step": ckpt["step"], "properties": result}


def size_matched_draw(sizes: np.ndarray, pool_values: np.ndarray, pool_sizes: np.ndarray, rng) -> np.ndarray:
    """For each size in sizes [S], the value [S] of a random member of the pool (with replacement) of the same size,
    or of the whole pool where it has none of that size."""
    drawn = np.empty(len(sizes))
    for n in np.unique(sizes):
        rows, same = np.flatnonzero(sizes == n), pool_values[pool_sizes == n]
        drawn[rows] = rng.choice(same if len(same) else pool_values, len(rows))
    return drawn


def baselines(model, ckpt: dict, oracle_path: Path, properties: list[str], data_dir=None, seed: int = 0,
              halves=None, on_generator=None) -> dict:
    """EDM's three baselines of each property, with this oracle on the generator's half of the training split:
    {property: {l_bound, n_atoms, n_atoms_sampled, u_bound, n_generator_half}} (the module's docstring defines them).
    They depend on the oracle and the data, not on any samples. The U-bound's shuffle and the sampled #Atoms' draw of
    each property are seeded by (seed, its index in the oracle's properties), so a property's baselines do not depend
    on which others are scored beside it.
    halves: training_halves(ckpt, data_dir), and on_generator: the oracle's predictions [S, C] on the generator's half
    (generator_half_predictions), when the caller has them."""
    from models.condition import Normalisation
    from models.molecules import ATOMIC_NUMBERS

    kind = ckpt.get("domain", "molecules")
    norm = Normalisation.from_state(ckpt["condition"])
    vocabulary = list(ATOMIC_NUMBERS) if kind == "molecules" else list(ckpt["elements"])
    generator, oracle_half = halves or training_halves(ckpt, data_dir)
    if on_generator is None:
        on_generator = generator_half_predictions(model, ckpt, oracle_path, generator, norm, kind, vocabulary, data_dir)
    result = {}
    for name in properties:
        c = norm.names.index(name)
        truth, known = generator.property_values(name), oracle_half.property_values(name)
        by_count = {n: np.median(known[oracle_half.n_atoms == n]) for n in np.unique(oracle_half.n_atoms)}
        fallback = float(np.median(known))
        from_count = np.array([by_count.get(n, fallback) for n in generator.n_atoms])
        shuffled = np.random.default_rng([seed, c]).permutation(truth)
        drawn = size_matched_draw(generator.n_atoms, known, oracle_half.n_atoms, np.random.default_rng([seed, c, 1]))
        result[name] = {"l_bound": float(np.abs(on_generator[:, c] - truth).mean()),
                        "n_atoms": float(np.abs(from_count - truth).mean()),
                        "n_atoms_sampled": float(np.abs(drawn - truth).mean()),
                        "u_bound": float(np.abs(on_generator[:, c] - shuffled).mean()),
                        "n_generator_half": len(generator)}
    return result


# EDM's table 3 (Hoogeboom et al. 2022), QM9 in the units of models.molecules.PROPERTIES: its oracle's L-bound,
# the #Atoms and U-bound baselines, and EDM's conditional generator.
EDM_QM9 = {"alpha": {"l_bound": 0.10, "n_atoms": 3.86, "u_bound": 9.01, "edm": 2.76},
           "gap": {"l_bound": 64, "n_atoms": 866, "u_bound": 1470, "edm": 655},
           "homo": {"l_bound": 39, "n_atoms": 426, "u_bound": 645, "edm": 356},
           "lumo": {"l_bound": 36, "n_atoms": 813, "u_bound": 1457, "edm": 584},
           "mu": {"l_bound": 0.043, "n_atoms": 1.053, "u_bound": 1.616, "edm": 1.111},
           "Cv": {"l_bound": 0.040, "n_atoms": 1.971, "u_bound": 6.857, "edm": 1.101}}


def baselines_table(oracle_path: Path, data_dir=None) -> str:
    """A markdown table of an oracle's baselines for every property it predicts, beside EDM's published ones on
    QM9: how good a judge the oracle is before it judges anything."""
    from models.condition import Normalisation
    from models.oracle import build_oracle

    ckpt = load_oracle(oracle_path, None)
    norm = Normalisation.from_state(ckpt["condition"])
    bounds = baselines(build_oracle(ckpt)[0].eval(), ckpt, oracle_path, norm.names, data_dir)
    qm9 = ckpt["data"] == "qm9"
    theirs = " (EDM's)" if qm9 else ""
    head = (f"| property | unit | L-bound{theirs} | #Atoms{theirs} | #Atoms, sampled | U-bound{theirs} |"
            + (" L-bound / EDM's |" if qm9 else ""))
    lines = [f"oracle {oracle_path} (step {ckpt['step']}, {ckpt['data']}), on the {bounds[norm.names[0]]['n_generator_half']:,} "
             "structures of the generator's half", "", head, "|" + "---|" * (head.count("|") - 1)]
    for name, unit in zip(norm.names, norm.units):
        b, edm = bounds[name], EDM_QM9.get(name) if qm9 else None
        cells = [f"{b[k]:.4g}" + (f" ({edm[k]:g})" if edm and k in edm else "")
                 for k in ("l_bound", "n_atoms", "n_atoms_sampled", "u_bound")]
        lines.append(f"| {name} | {unit} | " + " | ".join(cells) + " |" + (f" {b['l_bound'] / edm['l_bound']:.1f} x |" if edm else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m models.condition_evaluation",
                                     description="An oracle's baselines (EDM's L-bound, #Atoms and U-bound) for every "
                                     "property it predicts, on the generator's half of its training split, beside EDM's "
                                     "published ones on QM9.")
    parser.add_argument("oracle", type=Path, help="a train.py --task oracle checkpoint (ckpt.pt or weights.pt)")
    parser.add_argument("--data-dir", default=None, help="data directory (default ./data or $MOLGEN_DATA)")
    args = parser.parse_args()
    from models.precision import flush_denormals
    flush_denormals()  # a script's choice, not the library's: 3.9 x on a trained oracle
    from models.checkpoint import CheckpointError
    try:
        print(baselines_table(args.oracle, args.data_dir), end="")
    except (CheckpointError, DataError, OSError) as e:
        raise SystemExit(f"models.condition_evaluation: {e}")
