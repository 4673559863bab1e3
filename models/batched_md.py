"""Many NVE trajectories of a student force field advanced at once: velocity Verlet on one flat batch.

A student's call costs milliseconds of fixed overhead (neighbour search, kernel launches, Python) whatever the size
of the structure, so one molecule at a time through ASE spends most of its time there; label.py's and evaluate.py's
workloads are many structures, not one. Here every structure is one part of a flat batch (models/forcefield.py) and
each step is one call of the model for all of them. The integrator is ASE's VelocityVerlet, step for step:

    v += dt F / (2 m);  x += dt v;  F = F(x);  v += dt F / (2 m)

so a batched trajectory equals the one ASE would run for each structure alone (tested), from the same initial
velocities: Maxwell-Boltzmann at the given temperature from one seed per structure, without centre-of-mass motion,
and for molecules without rotation (initial_velocities, which models/forcefield_eval.nve uses too).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from models.forcefield import flat_batch


def initial_velocities(atoms, temperature_k: float, seed: int) -> np.ndarray:
    """[n, 3] velocities in ASE units: Maxwell-Boltzmann at temperature_k from `seed`, without centre-of-mass motion
    and, for a molecule, without rotation (models/forcefield_eval.nve starts from them too)."""
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

    a = atoms.copy()
    MaxwellBoltzmannDistribution(a, temperature_K=temperature_k, rng=np.random.default_rng(seed))
    Stationary(a)
    if not a.pbc.any():
        ZeroRotation(a)
    return a.get_velocities()


@torch.no_grad()
def batched_nve(model, structures: list, steps: int, timestep_fs: float, temperature_k: float, seed: int = 0,
                device="cpu") -> dict:
    """Velocity Verlet of every structure (ase.Atoms) for `steps` steps of timestep_fs, in float64, structure k's
    velocities from seed + k. Returns {"positions": [A, 3] final, "velocities": [A, 3] final (ASE units), "batch": [A]
    structure of each atom, "total_energy_ev": [steps + 1, S] potential + kinetic per structure, "seconds",
    "atom_steps_per_s"}."""
    from ase import units

    if steps < 1:
        raise ValueError(f"an NVE run needs at least one step, not {steps}")
    dtype = next(model.parameters()).dtype
    numbers, pos, batch, cell, pbc = flat_batch(structures, device=device, dtype=dtype)
    masses = torch.tensor(np.concatenate([a.get_masses() for a in structures]), dtype=dtype, device=device)[:, None]
    velocities = torch.tensor(np.concatenate([initial_velocities(a, temperature_k, seed + k) for k, a in enumerate(structures)]),
                              dtype=dtype, device=device)
    dt = timestep_fs * units.fs
    n_struct = len(structures)

    def forces_and_energy(x):
        with torch.enable_grad():  # forces are the energy's gradient
            energy, forces, _ = model(numbers, x, batch, cell, pbc)
        return forces.detach(), energy.detach()

    def total(potential):
        kinetic = torch.zeros(n_struct, dtype=dtype, device=device).index_add(0, batch, 0.5 * (masses * velocities ** 2).sum(1))
        return (potential + kinetic).cpu().numpy()

    t0 = time.perf_counter()
    forces, potential = forces_and_energy(pos)
    energies = [total(potential)]
    for _ in range(steps):
        velocities = velocities + 0.5 * dt * forces / masses
        pos = pos + dt * velocities
        forces, potential = forces_and_energy(pos)
        velocities = velocities + 0.5 * dt * forces / masses
        energies.append(total(potential))
    seconds = time.perf_counter() - t0
    return {"positions": pos.cpu().numpy(), "velocities": velocities.cpu().numpy(), "batch": batch.cpu().numpy(),
            "total_energy_ev": np.array(energies), "seconds": seconds,
            "atom_steps_per_s": len(numbers) * steps / seconds}
