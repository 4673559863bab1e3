"""Other models' sample files as evaluate.py reads them (extended XYZ), without unpickling anything.

    python -m models.convert cdvae eval_gen.pt --out samples.extxyz                         # CDVAE / DiffCSP de novo
    python -m models.convert cdvae eval_diff.pt --csp perov5 --out samples.extxyz           # structure prediction
    cat outputs/*/molecule_*.txt > samples.xyz                                              # EDM: no conversion needed

CDVAE and DiffCSP save their samples with torch.save as a dict of tensors, the crystals of a batch concatenated:
num_atoms [E, B], atom_types [E, A] (atomic numbers), frac_coords [E, A, 3], and lengths and angles [E, B, 3] (A,
degrees) or lattices [E, B, 3, 3] (rows are the cell vectors); E is the number of evaluations (samples per
composition in structure prediction). The file is read with torch.load(weights_only=True), which refuses pickled
objects: a file that also holds a torch_geometric batch (DiffCSP's input_data_batch) must be re-saved in its own
environment with the tensors alone (torch.save({k: v for k, v in d.items() if torch.is_tensor(v)}, path)).
With --csp NAME the samples are structure predictions of NAME's test compositions in file order (as those codes
sample them): each gets the truth_id and truth_index evaluate.py matches against.

EDM writes each molecule as a small XYZ text file (atom count, a blank line, "symbol x y z" rows); concatenated,
they are one multi-frame XYZ file that evaluate.py reads as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.fileio import DataError

CDVAE_KEYS = ("num_atoms", "atom_types", "frac_coords")


def cdvae_structures(path: Path) -> list:
    """ase.Atoms of every crystal of a CDVAE / DiffCSP sample file, evaluation by evaluation, with info sample_index
    (the evaluation) and crystal_index (its place in the batch). DataError naming the file and the problem."""
    import ase
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled objects are refused by weights_only; a damaged file fails too
        raise DataError(f"{path}: not a file of tensors that can be read without unpickling ({type(e).__name__}: {e}). "
                        f"Re-save it in its own environment with its tensors alone (models/convert.py)") from None
    if not isinstance(data, dict) or any(k not in data for k in CDVAE_KEYS) or not ({"lengths", "angles"} <= set(data) or "lattices" in data):
        raise DataError(f"{path}: expected CDVAE's dict of tensors ({', '.join(CDVAE_KEYS)}, and lengths and angles or "
                        f"lattices), found {sorted(data) if isinstance(data, dict) else type(data).__name__}")
    num_atoms = data["num_atoms"].long().reshape(-1, data["num_atoms"].shape[-1]).numpy()  # [E, B]
    types = data["atom_types"].long().reshape(len(num_atoms), -1).numpy()
    frac = data["frac_coords"].double().reshape(len(num_atoms), -1, 3).numpy()
    structures = []
    for e in range(len(num_atoms)):
        if num_atoms[e].sum() != types.shape[1] or frac.shape[1] != types.shape[1]:
            raise DataError(f"{path}: evaluation {e}: num_atoms sum to {num_atoms[e].sum()}, but atom_types holds "
                            f"{types.shape[1]} atoms and frac_coords {frac.shape[1]}")
        starts = np.concatenate([[0], np.cumsum(num_atoms[e])])
        for b in range(num_atoms.shape[1]):
            lo, hi = starts[b], starts[b + 1]
            if "lattices" in data:
                cell = data["lattices"].double().reshape(len(num_atoms), -1, 3, 3)[e, b].numpy()
            else:
                cell = np.concatenate([data["lengths"].double().reshape(len(num_atoms), -1, 3)[e, b].numpy(),
                                       data["angles"].double().reshape(len(num_atoms), -1, 3)[e, b].numpy()])
            atoms = ase.Atoms(numbers=types[e, lo:hi], scaled_positions=frac[e, lo:hi] % 1.0, cell=cell, pbc=True)
            atoms.info.update(sample_index=e, crystal_index=b)
            structures.append(atoms)
    return structures


def name_truths(structures: list, name: str, data_dir=None) -> None:
    """Structure prediction of `name`'s test compositions in file order: each structure's crystal_index is its test
    row; set truth_id and truth_index, and check the composition is that row's (DataError otherwise)."""
    from models.crystals import load_crystals

    test = load_crystals(name, "test", data_dir, progress=False)
    arrays = test.arrays()
    for k, atoms in enumerate(structures):
        i = atoms.info["crystal_index"]
        if i >= len(test) or sorted(atoms.numbers.tolist()) != sorted(arrays[i][0].tolist()):
            raise DataError(f"structure {k + 1} (crystal {i} of its batch) is not a prediction of {name} test crystal "
                            f"{i}: its composition differs (the samples must follow the test file's order)")
        atoms.info.update(truth_id=str(test.ids[i]), truth_index=int(i))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["cdvae"], help="cdvae: a CDVAE or DiffCSP sample file (eval_gen.pt, eval_diff.pt)")
    parser.add_argument("path", type=Path, help="the sample file")
    parser.add_argument("--out", type=Path, required=True, help="the extended XYZ file to write")
    parser.add_argument("--csp", default=None, metavar="DATA", help="structure prediction of this CDVAE set's test compositions "
                        "(perov5, carbon24, mp20), in the test file's order")
    parser.add_argument("--data-dir", default=None, help="with --csp: the data directory (default ./data or $MOLGEN_DATA)")
    args = parser.parse_args(argv)
    try:
        structures = cdvae_structures(args.path)
        if args.csp:
            name_truths(structures, args.csp, args.data_dir)
    except DataError as e:
        sys.exit(f"models.convert: {e}")
    from models.domains import _write_extxyz
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write_extxyz(args.out, structures)
    print(f"wrote {len(structures)} crystals from {args.path} to {args.out}")


if __name__ == "__main__":
    main()
