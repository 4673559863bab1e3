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
                     device: torch.device, weights: str = "ema", time_power: float = 1.0,
                     by_size: bool = False) -> tuple[list[ase.Atoms], int]:
    """n molecules from a loaded checkpoint, in batches, with a progress bar, on the sampler time grid of time_power
    (models/time.py): (the molecules with finite coordinates, how many had NaN / Inf coordinates and were dropped),
    in the order their sizes were drawn. Each kept molecule has info['sample_index'], its index among the n drawn,
    so dropped ones leave a visible gap. by_size: batches of the drawn sizes in increasing order, each padded only
    to its largest molecule rather than to about the largest of all (1.4 x the molecules/s on QM9 in the README;
    other noise, the same distribution)."""
    model, process = build_model(ckpt, weights=weights)
    model.to(device).eval()
    numbers_of_type = torch.tensor([atomic_numbers[s] for s in ckpt["atom_symbols"]])
    generator = torch.Generator().manual_seed(seed)
    n_atoms = torch.multinomial(torch.tensor(ckpt["n_atoms_hist"]), n, replacement=True, generator=generator)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    order = torch.argsort(n_atoms, stable=True) if by_size else torch.arange(n)
    structures, n_bad = [], 0
    with tqdm(total=n, unit="mol", desc="sampling", mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        for lo in range(0, n, batch_size):
            rows = order[lo:lo + batch_size]
            with autocast:
                out = process.sample(model, n_atoms[rows], n_steps=n_steps, method=method, generator=generator,
                                     time_power=time_power)
            types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
            for i in range(len(types)):
                positions = pos[i][mask[i]].double().numpy()
                if not np.isfinite(positions).all():
                    n_bad += 1
                    continue
                atoms = ase.Atoms(numbers=numbers_of_type[types[i][mask[i]]].numpy(), positions=positions)
                atoms.info["sample_index"] = int(rows[i])
                structures.append(atoms)
            bar.update(len(types))
    return sorted(structures, key=lambda atoms: atoms.info["sample_index"]), n_bad


def sample_crystals(ckpt: dict, n: int, n_steps: int, method: str, batch_size: int, seed: int, device: torch.device,
                    weights: str = "ema", compositions=None, n_per_composition: int = 1,
                    truth_rows: list[int] | None = None, time_power: float = 1.0,
                    by_size: bool = False, anneal_slope: float = 0.0) -> tuple[list[ase.Atoms], int]:
    """Crystals from a loaded crystal checkpoint, on the sampler time grid of time_power (models/time.py): (the crystals with finite coordinates and cell, how many were
    dropped for NaN / Inf). De novo: n crystals, sizes from the training histogram; info['sample_index'].
    Structure prediction: n_per_composition samples for each crystal of `compositions` (a models.crystals.
    CrystalSet, e.g. the test split or a part of it), whose elements the model must know; info['truth_id'] (its
    material_id), info['truth_index'] (its row in the split: truth_rows[i] when the compositions are a part of it)
    and info['sample_index'] (0..n_per_composition-1). Either way the crystals come in that order (drawn sizes; compositions
    x samples). by_size: batches of the jobs in increasing size, each padded only to its largest crystal, as for
    molecules (other noise, the same distribution). anneal_slope: the ODE samplers' inference anti-annealing of the
    coordinates (models/crystal_process.py; flow and interpolant only)."""
    from models.crystals import PaddedCrystals, crystal_atoms, unpad

    model, process = build_model(ckpt, weights=weights)
    model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    options = dict(time_power=time_power, **({"anneal_slope": anneal_slope} if anneal_slope else {}))
    if process.config.csp:
        padded = PaddedCrystals(compositions, ckpt["elements"], name="the compositions")
        jobs = [(i, k) for i in range(len(padded)) for k in range(n_per_composition)]
        sizes = padded.mask.sum(1)
    else:
        n_atoms = torch.multinomial(torch.tensor(ckpt["n_atoms_hist"]), n, replacement=True, generator=generator)
        jobs = [(i, 0) for i in range(n)]
        sizes = n_atoms
    order = torch.argsort(sizes[[i for i, _ in jobs]], stable=True).tolist() if by_size else list(range(len(jobs)))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    structures, n_bad = [], 0  # structures: (job index, crystal), put back in job order at the end
    with tqdm(total=len(jobs), unit=" crystals", desc="sampling", mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        for lo in range(0, len(jobs), batch_size):
            batch_jobs = order[lo:lo + batch_size]
            rows = torch.tensor([jobs[j][0] for j in batch_jobs])
            with autocast:
                if process.config.csp:
                    b = padded.batch(rows, width=int(sizes[rows].max()) if by_size else None)  # random: padded as before, the same noise
                    out = process.sample(model, types=b["types"], mask=b["mask"], n_steps=n_steps, method=method, generator=generator,
                                         **options)
                else:
                    out = process.sample(model, n_atoms=n_atoms[rows], n_steps=n_steps, method=method, generator=generator,
                                         **options)
            for j, (numbers, frac, lengths, angles) in zip(batch_jobs, unpad(out, ckpt["elements"])):
                i, k = jobs[j]
                if not (np.isfinite(frac).all() and np.isfinite(lengths).all() and np.isfinite(angles).all()):
                    n_bad += 1
                    continue
                atoms = crystal_atoms(numbers, frac, lengths, angles)
                atoms.info["sample_index"] = k if process.config.csp else i
                if process.config.csp:
                    atoms.info.update(truth_id=str(compositions.ids[i]), truth_index=truth_rows[i] if truth_rows else i)
                structures.append((j, atoms))
            bar.update(len(rows))
    return [atoms for _, atoms in sorted(structures, key=lambda pair: pair[0])], n_bad
