"""Many NVE trajectories or relaxations of a student force field advanced at once, on one flat batch.

A student's call costs milliseconds of fixed overhead (neighbour search, kernel launches, Python) whatever the size
of the structure, so one molecule at a time through ASE spends most of its time there; label.py's and evaluate.py's
workloads are many structures, not one. Here every structure is one part of a flat batch (models/forcefield.py) and
each step is one call of the model for all of them. The integrator is ASE's VelocityVerlet, step for step:

    v += dt F / (2 m);  x += dt v;  F = F(x);  v += dt F / (2 m)

so a batched trajectory equals the one ASE would run for each structure alone (tested), from the same initial
velocities: Maxwell-Boltzmann at the given temperature from one seed per structure, without centre-of-mass motion,
and for molecules without rotation (initial_velocities, which models/forcefield_eval.nve uses too).

Relaxations (batched_fire) are ASE's FIRE the same way: each structure keeps its own time step, mixing and
counter, its step is capped by its own norm, and it stops when its largest force falls below fmax, the others
going on; positions only, in a fixed cell.
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
                device="cpu", snapshot_every: int = 0) -> dict:
    """Velocity Verlet of every structure (ase.Atoms) for `steps` steps of timestep_fs, in the model's precision,
    structure k's velocities from seed + k. Returns {"positions": [A, 3] final, "velocities": [A, 3] final (ASE units), "batch": [A]
    structure of each atom, "total_energy_ev": [steps + 1, S] potential + kinetic per structure, "seconds",
    "atom_steps_per_s"}, and with snapshot_every K > 0 "snapshots": [steps // K, A, 3], the positions after steps K,
    2K, ..., and "temperature_k": [steps // K, S] each structure's kinetic temperature there."""
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

    def kinetic():  # [S] eV
        return torch.zeros(n_struct, dtype=dtype, device=device).index_add(0, batch, 0.5 * (masses * velocities ** 2).sum(1))

    def total(potential):
        return (potential + kinetic()).cpu().numpy()

    # degrees of freedom per structure, as ASE counts them for its temperature: 3 per atom (ase.Atoms.get_temperature)
    dof = torch.zeros(n_struct, dtype=dtype, device=device).index_add(0, batch, torch.full_like(masses[:, 0], 3.0))

    t0 = time.perf_counter()
    forces, potential = forces_and_energy(pos)
    energies, snapshots, temperatures = [total(potential)], [], []
    for step in range(1, steps + 1):
        velocities = velocities + 0.5 * dt * forces / masses
        pos = pos + dt * velocities
        forces, potential = forces_and_energy(pos)
        velocities = velocities + 0.5 * dt * forces / masses
        energies.append(total(potential))
        if snapshot_every and step % snapshot_every == 0:
            snapshots.append(pos.cpu().numpy())
            temperatures.append((2 * kinetic() / (dof * units.kB)).cpu().numpy())
    seconds = time.perf_counter() - t0
    out = {"positions": pos.cpu().numpy(), "velocities": velocities.cpu().numpy(), "batch": batch.cpu().numpy(),
           "total_energy_ev": np.array(energies), "seconds": seconds, "atom_steps_per_s": len(numbers) * steps / seconds}
    if snapshot_every:
        out.update(snapshots=np.array(snapshots).reshape(-1, len(numbers), 3),
                   temperature_k=np.array(temperatures).reshape(-1, n_struct))
    return out


# ASE's FIRE defaults (ase.optimize.FIRE): initial and largest time step, the cap on one step's length (A, over the
# whole structure), steps before dt may grow, dt's growth and cut, the velocity mixing's start and decay.
FIRE = dict(dt=0.1, dtmax=1.0, maxstep=0.2, n_min=5, finc=1.1, fdec=0.5, astart=0.1, fa=0.99)


@torch.no_grad()
def batched_fire(model, structures: list, fmax: float = 0.05, steps: int = 200, device="cpu") -> dict:
    """Relax the positions of every structure (ase.Atoms; cells fixed) with FIRE, in the model's precision (the
    tests run it in float64, where it takes ASE's path to 1e-9; a student trains in float32): at most `steps`
    steps each, a structure stopping once its largest atomic force is below fmax (eV/A). Returns {"positions": [A, 3],
    "batch": [A], "energy_ev": [2, S] before and after, "fmax": [S] largest force after, "converged": [S] bool,
    "steps": [S] steps taken, "seconds"}."""
    if steps < 0 or not fmax > 0:
        raise ValueError(f"a relaxation needs steps >= 0 and fmax > 0, not steps={steps}, fmax={fmax}")
    dtype = next(model.parameters()).dtype
    numbers, pos, batch, cell, pbc = flat_batch(structures, device=device, dtype=dtype)
    n_struct = len(structures)

    def per_structure(values):  # [A] -> [S]: a sum over each structure's atoms
        return torch.zeros(n_struct, dtype=dtype, device=device).index_add(0, batch, values)

    def forces_and_energy(x):
        with torch.enable_grad():  # forces are the energy's gradient
            energy, forces, _ = model(numbers, x, batch, cell, pbc)
        return forces.detach(), energy.detach()

    def largest_force(forces):
        return torch.zeros(n_struct, dtype=dtype, device=device).scatter_reduce(0, batch, forces.norm(dim=1), "amax",
                                                                                include_self=False)

    t0 = time.perf_counter()
    velocities = torch.zeros_like(pos)
    dt = torch.full((n_struct,), FIRE["dt"], dtype=dtype, device=device)
    mix = torch.full((n_struct,), FIRE["astart"], dtype=dtype, device=device)
    since_uphill = torch.zeros(n_struct, dtype=torch.long, device=device)
    taken = torch.zeros(n_struct, dtype=torch.long, device=device)
    forces, energy = forces_and_energy(pos)
    first_energy = energy
    for step in range(steps):
        moving = largest_force(forces) >= fmax  # [S]: ASE stops a structure once its largest force is below fmax
        if not moving.any():
            break
        if step:  # ASE's first step starts from rest and only accelerates
            vf, f2, v2 = (per_structure((a * b).sum(1))
                          for a, b in ((forces, velocities), (forces, forces), (velocities, velocities)))
            downhill = vf > 0  # [S]: uphill, a structure stops, its dt is cut and its mixing restarts
            steer = mix[batch, None] * forces / f2.sqrt()[batch, None] * v2.sqrt()[batch, None]
            new_velocities = torch.where(downhill[batch, None], (1 - mix[batch, None]) * velocities + steer,
                                         torch.zeros_like(velocities))
            grow = downhill & (since_uphill > FIRE["n_min"])
            new_dt = torch.where(grow, torch.clamp(dt * FIRE["finc"], max=FIRE["dtmax"]),
                                 torch.where(downhill, dt, dt * FIRE["fdec"]))
            new_mix = torch.where(grow, mix * FIRE["fa"], torch.where(downhill, mix, torch.full_like(mix, FIRE["astart"])))
            new_since = torch.where(downhill, since_uphill + 1, torch.zeros_like(since_uphill))
            velocities = torch.where(moving[batch, None], new_velocities, velocities)
            dt, mix, since_uphill = (torch.where(moving, new, old)
                                     for new, old in ((new_dt, dt), (new_mix, mix), (new_since, since_uphill)))
        velocities = torch.where(moving[batch, None], velocities + dt[batch, None] * forces, velocities)
        dr = dt[batch, None] * velocities
        norm = per_structure((dr * dr).sum(1)).sqrt()
        dr = dr * torch.where(norm > FIRE["maxstep"], FIRE["maxstep"] / norm, torch.ones_like(norm))[batch, None]
        pos = torch.where(moving[batch, None], pos + dr, pos)
        taken += moving
        forces, energy = forces_and_energy(pos)
    return {"positions": pos.cpu().numpy(), "batch": batch.cpu().numpy(),
            "energy_ev": torch.stack([first_energy, energy]).cpu().numpy(), "fmax": largest_force(forces).cpu().numpy(),
            "converged": (largest_force(forces) < fmax).cpu().numpy(), "steps": taken.cpu().numpy(),
            "seconds": time.perf_counter() - t0}
