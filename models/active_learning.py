"""One exploration round of active learning for a student force field (label.py explore): run the student's own
dynamics from the structures it will meet, and pick the snapshots its teacher should label next.

A committee of students (the same recipe, other seeds) agrees where the training data pinned the energy surface
down and disagrees away from it. The disagreement of a snapshot is the largest, over its atoms, of the spread of the
members' forces on the atom (DP-GEN's max force deviation, Zhang et al. 2020):

    deviation = max_i sqrt(mean_m |F_m,i - mean_m F_m,i|^2)        [eV/A]

The first member drives NVE trajectories from every input structure (models/batched_md.py, all of them in one
batch), snapshots every few steps. A trajectory that goes unphysical (two atoms closer than label.py's --min-dist,
an atom left with no neighbour, or a temperature past the limit) ends there, and its last physical snapshot is
picked first: the student's forces were wrong on the way out of it, and a label there teaches the missing
repulsion. The rest are picked by deviation, highest first, above a floor where the committee already agrees.
"""
from __future__ import annotations

import numpy as np
import torch

from models.batched_md import batched_nve
from models.forcefield import flat_batch
from models.structures import check_structure


@torch.no_grad()
def committee_deviation(models: list, structures: list, batch_size: int = 128, device="cpu") -> np.ndarray:
    """[S] the committee's max force deviation (eV/A) on each structure (ase.Atoms)."""
    if len(models) < 2:
        raise ValueError(f"a committee needs at least two students, not {len(models)}")
    out = np.zeros(len(structures))
    for lo in range(0, len(structures), batch_size):
        chunk = structures[lo:lo + batch_size]
        numbers, pos, batch, cell, pbc = flat_batch(chunk, device=device, dtype=next(models[0].parameters()).dtype)
        forces = []
        for model in models:
            with torch.enable_grad():
                forces.append(model(numbers, pos.clone(), batch, cell, pbc)[1].detach())
        forces = torch.stack(forces)  # [M, A, 3]
        spread = (forces - forces.mean(0)).square().sum(-1).mean(0).sqrt()  # [A]
        out[lo:lo + len(chunk)] = torch.zeros(len(chunk), dtype=spread.dtype).scatter_reduce(
            0, batch.cpu(), spread.cpu(), "amax", include_self=False).numpy()
    return out


def explore(driver, structures: list, steps: int, every: int, temperature_k: float, max_temperature_k: float,
            timestep_fs: float = 0.5, seed: int = 0, min_dist: float = 0.5, isolated_dist: float = 4.0,
            device="cpu") -> list:
    """Snapshots (ase.Atoms) of the driver student's NVE trajectories from every structure: after steps `every`,
    2 `every`, ... up to the first unphysical one. Each carries in its info explore_source (the input's index),
    explore_step, explore_temperature_k and, for the last physical snapshot of a trajectory that then went
    unphysical, explore_unphysical (why, at which step); that snapshot is the input itself when the first one
    already fails."""
    md = batched_nve(driver, structures, steps, timestep_fs, temperature_k, seed=seed, device=device, snapshot_every=every)
    kept = []
    for k, atoms in enumerate(structures):
        mine = md["batch"] == k
        last = atoms.copy()
        last.info.update(explore_source=k, explore_step=0, explore_temperature_k=float(temperature_k))
        trajectory = []
        for snap, positions in enumerate(md["snapshots"]):
            frame = atoms.copy()
            frame.calc = None
            frame.positions = positions[mine]
            temperature = float(md["temperature_k"][snap, k])
            frame.info.update(explore_source=k, explore_step=(snap + 1) * every, explore_temperature_k=temperature)
            why = check_structure(frame, min_dist, isolated_dist) or (
                f"temperature {temperature:.0f} K > {max_temperature_k:g} K" if temperature > max_temperature_k else None)
            if why:  # `last` is the trajectory's last kept snapshot, or the input when none was kept
                last.info["explore_unphysical"] = f"{why} at step {(snap + 1) * every}"
                if not trajectory:
                    trajectory.append(last)
                break
            trajectory.append(frame)
            last = frame
        kept += trajectory
    return kept


def pick(snapshots: list, deviation: np.ndarray, n: int, min_deviation: float) -> list[int]:
    """Indices of up to n snapshots: the last physical ones of unphysical trajectories first (highest deviation
    first), then the others whose deviation is at least min_deviation, highest first."""
    order = np.argsort(-deviation, kind="stable")
    first = [i for i in order if "explore_unphysical" in snapshots[i].info]
    rest = [i for i in order if "explore_unphysical" not in snapshots[i].info and deviation[i] >= min_deviation]
    return (first + rest)[:n]
