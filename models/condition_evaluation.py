"""EDM's conditional-generation metric (evaluate.py --oracle): the mean absolute error between the property each
molecule was asked for and the property oracle's prediction for it, beside the protocol's baselines, all computed
here on the same oracle and data (Hoogeboom et al. 2022, section 4.2 and table 3):

- L-bound: the oracle's own error on the generator's half of the training split (molecules it never trained on),
  the best a generator can be judged to do;
- #Atoms: the property predicted from the atom count alone (the median of the oracle's half at each count), scored
  on the generator's half: a generator below it conditions on more than size;
- U-bound: the oracle's predictions on the generator's half against the same half's properties shuffled, what a
  generator that ignores its condition scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.fileio import DataError

BATCH = 256  # molecules per oracle pass


@torch.no_grad()
def predict(model, molecules: list[tuple[np.ndarray, np.ndarray]], norm) -> np.ndarray:
    """The oracle's properties [S, C] in their units for molecules [(atomic numbers [n], positions [n, 3])]; batches
    of similar sizes, each padded only to its largest."""
    from models.molecules import NUMBER_TO_TYPE

    lut = np.full(128, -1)
    for z, t in NUMBER_TO_TYPE.items():
        lut[z] = t
    order = np.argsort([len(z) for z, _ in molecules], kind="stable")
    out = np.zeros((len(molecules), len(norm.names)))
    for lo in range(0, len(order), BATCH):
        rows = order[lo:lo + BATCH]
        n = max(len(molecules[i][0]) for i in rows)
        types, pos = torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n, 3)
        mask = torch.zeros(len(rows), n, dtype=torch.bool)
        for k, i in enumerate(rows):
            z, x = molecules[i]
            types[k, :len(z)], pos[k, :len(z)], mask[k, :len(z)] = torch.from_numpy(lut[z]), torch.from_numpy(x).float(), True
        out[rows] = model(types, pos, mask).double().numpy() * norm.std + norm.mean
    return out


def score_condition(samples_path: Path, oracle_path: Path, properties: list[str] | None, data_dir=None,
                    seed: int = 0) -> dict:
    """{property: {unit, n_samples, mae, l_bound, n_atoms, u_bound}} of the molecules in samples_path (sample.py's
    extxyz of a conditional checkpoint: each molecule's request in info['condition_<property>']), judged by the
    --task oracle checkpoint oracle_path. properties: those to score (default: every property the oracle predicts
    that the samples requested). Raises DataError naming the file and the problem (a molecule without its request,
    an element the oracle does not know, a property the oracle does not predict), CheckpointError for the oracle."""
    from models.checkpoint import load_checkpoint
    from models.condition import Normalisation, protocol_halves
    from models.evaluation import read_frames
    from models.molecules import NUMBER_TO_TYPE, load_qm9
    from models.oracle import build_oracle

    ckpt = load_checkpoint(oracle_path, task="oracle")
    model = build_oracle(ckpt)[0].eval()
    norm = Normalisation.from_state(ckpt["condition"])
    frames = read_frames(samples_path)
    requested = [n for n in norm.names if all(f"condition_{n}" in atoms.info for _, atoms in frames)]
    if properties is None:
        properties = requested
        if not properties:
            raise DataError(f"{samples_path}: the molecules request none of the properties the oracle {oracle_path} predicts "
                            f"({', '.join(norm.names)}): sample.py writes each request as condition_<property> in the "
                            "extxyz info of a conditional checkpoint's molecules")
    for name in properties:
        if name not in norm.names:
            raise DataError(f"{oracle_path} predicts {', '.join(norm.names)}, not {name}")
        for k, (line, atoms) in enumerate(frames):
            if f"condition_{name}" not in atoms.info:
                raise DataError(f"{samples_path}: structure {k + 1} (line {line}) has no requested {name} "
                                f"(condition_{name} in its extxyz info)")
    molecules = []
    for k, (line, atoms) in enumerate(frames):
        unknown = sorted(set(atoms.numbers.tolist()) - set(NUMBER_TO_TYPE))
        if unknown or not len(atoms) or atoms.pbc.any():
            raise DataError(f"{samples_path}: structure {k + 1} (line {line}) is not a QM9-like molecule the oracle can read "
                            f"({'atomic numbers ' + str(unknown) if unknown else 'no atoms' if not len(atoms) else 'periodic'})")
        molecules.append((atoms.numbers, atoms.positions))
    predicted = predict(model, molecules, norm)

    train = load_qm9("train", data_dir)
    halves = protocol_halves(len(train))
    generator, oracle_half = train.subset(halves["generator"]), train.subset(halves["oracle"])
    on_generator = predict(model, [generator[i] for i in range(len(generator))], norm)
    rng = np.random.default_rng(seed)
    result = {}
    for name in properties:
        c = norm.names.index(name)
        asked = np.array([float(atoms.info[f"condition_{name}"]) for _, atoms in frames])
        truth = generator.property_values(name)
        by_count = {n: np.median(oracle_half.property_values(name)[oracle_half.n_atoms == n]) for n in np.unique(oracle_half.n_atoms)}
        fallback = float(np.median(oracle_half.property_values(name)))
        from_count = np.array([by_count.get(n, fallback) for n in generator.n_atoms])
        result[name] = {"unit": norm.units[c], "n_samples": len(frames), "mae": float(np.abs(predicted[:, c] - asked).mean()),
                        "l_bound": float(np.abs(on_generator[:, c] - truth).mean()),
                        "n_atoms": float(np.abs(from_count - truth).mean()),
                        "u_bound": float(np.abs(on_generator[:, c] - rng.permutation(truth)).mean()),
                        "n_generator_half": len(generator)}
    return {"oracle": str(oracle_path), "oracle_step": ckpt["step"], "properties": result}
