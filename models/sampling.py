"""Sampling structures from a checkpoint alone: sample.py and label.py --generate both call this."""
from __future__ import annotations

import sys

import ase
import numpy as np
import torch
from ase.data import atomic_numbers
from tqdm import tqdm

from models.checkpoint import build_model


def sample_molecules(ckpt: dict, n: int, n_steps: int, method: str, batch_size: int, seed: int,
                     device: torch.device, weights: str = "ema") -> tuple[list[ase.Atoms], int]:
    """n molecules from a loaded checkpoint, in batches, with a progress bar: (the molecules with finite
    coordinates, how many had NaN / Inf coordinates and were dropped). Each kept molecule has
    info['sample_index'], its index among the n drawn, so dropped ones leave a visible gap."""
    model, process = build_model(ckpt, weights=weights)
    model.to(device).eval()
    numbers_of_type = torch.tensor([atomic_numbers[s] for s in ckpt["atom_symbols"]])
    generator = torch.Generator().manual_seed(seed)
    n_atoms = torch.multinomial(torch.tensor(ckpt["n_atoms_hist"]), n, replacement=True, generator=generator)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    structures, n_bad = [], 0
    with tqdm(total=n, unit="mol", desc="sampling", mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        for lo in range(0, n, batch_size):
            with autocast:
                out = process.sample(model, n_atoms[lo:lo + batch_size], n_steps=n_steps, method=method, generator=generator)
            types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
            for i in range(len(types)):
                positions = pos[i][mask[i]].double().numpy()
                if not np.isfinite(positions).all():
                    n_bad += 1
                    continue
                atoms = ase.Atoms(numbers=numbers_of_type[types[i][mask[i]]].numpy(), positions=positions)
                atoms.info["sample_index"] = lo + i
                structures.append(atoms)
            bar.update(len(types))
    return structures, n_bad
