"""Sample molecules from a trained checkpoint (EMA weights) and write them as extxyz and SDF.

    python sample.py --ckpt out/qm9_gnn_flow_small/ckpt.pt --n 1000 --steps 50

Molecule sizes are drawn from the training set's atom-count distribution stored in the checkpoint,
so the checkpoint alone is enough. Writes OUT/samples.extxyz (every molecule, ASE reads it),
OUT/samples.sdf (bonds inferred from geometry, RDKit reads it) and OUT/sample.log.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ase
import ase.io
from ase.data import atomic_numbers
import numpy as np
import torch
from rdkit import Chem
from tqdm import tqdm

from models import PROCESSES
from models.checkpoint import CheckpointError, build_model, load_checkpoint
from models.data import ATOM_SYMBOLS, atomic_write
from models.metrics import build_mol


def sample_molecules(ckpt: dict, n: int, n_steps: int, method: str, batch_size: int, seed: int,
                     device: torch.device, weights: str = "ema") -> list[ase.Atoms]:
    """n molecules from a loaded checkpoint, in batches, with a progress bar."""
    model, process = build_model(ckpt, weights=weights)
    model.to(device).eval()
    numbers_of_type = torch.tensor([atomic_numbers[s] for s in ckpt["atom_symbols"]])
    generator = torch.Generator().manual_seed(seed)
    n_atoms = torch.multinomial(torch.tensor(ckpt["n_atoms_hist"]), n, replacement=True, generator=generator)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    structures = []
    with tqdm(total=n, unit="mol", desc="sampling", mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        for lo in range(0, n, batch_size):
            with autocast:
                out = process.sample(model, n_atoms[lo:lo + batch_size], n_steps=n_steps, method=method, generator=generator)
            types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
            for i in range(len(types)):
                atoms = ase.Atoms(numbers=numbers_of_type[types[i][mask[i]]].numpy(),
                                  positions=pos[i][mask[i]].double().numpy())
                atoms.info["sample_index"] = len(structures)
                structures.append(atoms)
            bar.update(len(types))
    return structures


def write_sdf(path: Path, structures: list[ase.Atoms]) -> int:
    """SDF with bonds inferred from geometry; returns how many molecules RDKit could not write."""
    failed = 0

    def write(tmp):
        nonlocal failed
        writer = Chem.SDWriter(tmp)
        writer.SetKekulize(False)  # bond orders come from distances, not an aromaticity model
        for atoms in structures:
            try:
                mol = build_mol(atoms.numbers, atoms.positions)
                mol.SetProp("_Name", f"sample_{atoms.info['sample_index']}")
                writer.write(mol)
            except Exception:  # a geometry RDKit refuses (e.g. impossible valence) is skipped, not fatal
                failed += 1
        writer.close()

    atomic_write(path, write)
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt)")
    parser.add_argument("--n", type=int, default=1000, help="number of molecules to sample")
    parser.add_argument("--steps", type=int, default=50, help="integration / denoising steps")
    parser.add_argument("--method", choices=sorted({m for p in PROCESSES.values() for m in p.SAMPLERS}), default=None,
                        help="sampler; flow: heun (default; 2nd order, 2 evaluations a step) or euler; diffusion: "
                             "ancestral (default; DDPM) or ode (DDIM, deterministic); interpolant: sde (default) or ode")
    parser.add_argument("--batch-size", type=int, default=None, help="molecules sampled at once (default: 100 on a CPU, where larger batches are slower per molecule; 1000 on a GPU)")
    parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA weights (default) or the raw ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes and noise")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    parser.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")
    args = parser.parse_args()

    try:
        ckpt = load_checkpoint(Path(args.ckpt))
    except CheckpointError as e:
        raise SystemExit(f"sample.py: {e}")
    out_dir = Path(args.out) if args.out else Path(args.ckpt).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if list(ckpt["atom_symbols"]) != list(ATOM_SYMBOLS):
        raise SystemExit(f"{args.ckpt}: atom vocabulary {ckpt['atom_symbols']} is not the molecule vocabulary {list(ATOM_SYMBOLS)}")

    samplers = PROCESSES[ckpt["gen"]].SAMPLERS
    args.method = args.method or samplers[0]
    if args.method not in samplers:
        raise SystemExit(f"sample.py: --method {args.method} is not a sampler of --gen {ckpt['gen']}; choose one of {samplers}")
    batch_size = args.batch_size or (1000 if device.type == "cuda" else 100)
    t0 = time.time()
    structures = sample_molecules(ckpt, args.n, args.steps, args.method, batch_size, args.seed, device, args.weights)
    elapsed = time.time() - t0
    for atoms in structures:
        atoms.info.update(ckpt_step=ckpt["step"], arch=ckpt["arch"], gen=ckpt["gen"], steps=args.steps, method=args.method)
    atomic_write(out_dir / "samples.extxyz", lambda tmp: ase.io.write(tmp, structures, format="extxyz"))
    sdf_failed = write_sdf(out_dir / "samples.sdf", structures)
    sizes = np.array([len(a) for a in structures])
    summary = (f"sampled {len(structures)} molecules ({sizes.mean():.1f} atoms on average) from {args.ckpt} "
               f"(step {ckpt['step']}, {args.weights} weights) with {args.steps} {args.method} steps on {device} "
               f"in {elapsed:.1f} s: {len(structures) / elapsed:,.1f} molecules/s; wrote {out_dir / 'samples.extxyz'} "
               f"and {out_dir / 'samples.sdf'} ({sdf_failed} not writable as SDF)")
    print(summary)
    with open(out_dir / "sample.log", "a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + summary + "\n")


if __name__ == "__main__":
    main()
