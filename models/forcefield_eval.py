"""How good a student force field is against its teacher: accuracy on held-out labelled structures, speed on the
same device, and molecular dynamics that must stay physical. evaluate.py --task ff runs these and writes the
JSON and figures; definitions in models/README.md, "Metrics".
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from models.forcefield import ForceField, flat_batch
from models.labelled_data import EV_PER_A3_IN_GPA, LabelledStructures


def predict(model: ForceField, data: LabelledStructures, batch_size: int = 64, device="cpu") -> dict:
    """The student's energy [S] (eV), forces [A, 3] (eV/A) and stress [S, 6] (eV/A^3, Voigt; NaN for molecules) on
    every structure of `data`, in its order."""
    energies, forces, stresses = [], [], []
    dtype = next(model.parameters()).dtype
    for lo in range(0, len(data), batch_size):
        b = data.batch(range(lo, min(lo + batch_size, len(data))), device, model.config.cutoff, dtype=dtype)
        periodic = bool(b["pbc"].any())
        e, f, s = model(b["numbers"], b["pos"].requires_grad_(True), b["batch"], b["cell"], b["pbc"], stress=periodic,
                        edges=b["edges"])
        energies.append(e.detach().cpu().numpy())
        forces.append(f.detach().cpu().double().numpy())
        voigt = np.full((len(e), 6), np.nan)
        if s is not None:
            s = s.detach().cpu().double().numpy()
            voigt = np.stack([s[:, 0, 0], s[:, 1, 1], s[:, 2, 2], s[:, 1, 2], s[:, 0, 2], s[:, 0, 1]], axis=1)
            voigt[~b["pbc"].cpu().numpy()] = np.nan
        stresses.append(voigt)
    if not energies:
        return {"energy": np.zeros(0), "forces": np.zeros((0, 3)), "stress": np.zeros((0, 6))}
    return {"energy": np.concatenate(energies), "forces": np.concatenate(forces), "stress": np.concatenate(stresses)}


def accuracy(pred: dict, data: LabelledStructures) -> dict:
    """MAE and RMSE against the teacher: energy per atom (meV/atom), force components (meV/A), stress components of
    crystals (GPa); for all structures, separately for molecules and crystals when both are present, and for each
    `source` (generated structures, a data set's split, ...) when there are several."""
    c = data.c
    per_atom = (pred["energy"] - c["energy"]) / c["n_atoms"]
    force_err = pred["forces"] - c["forces"]

    def summary(structures: np.ndarray) -> dict:
        atoms = np.repeat(structures, c["n_atoms"])
        out = {"structures": int(structures.sum()), "atoms": int(atoms.sum())}
        if not structures.any():
            return out
        e, f = per_atom[structures], force_err[atoms]
        out.update(energy_mae_mev_per_atom=1000 * np.abs(e).mean(), energy_rmse_mev_per_atom=1000 * np.sqrt((e ** 2).mean()),
                   force_mae_mev_per_a=1000 * np.abs(f).mean(), force_rmse_mev_per_a=1000 * np.sqrt((f ** 2).mean()))
        crystals = structures & data.periodic
        if crystals.any():
            s = (pred["stress"][crystals] - c["stress"][crystals]) * EV_PER_A3_IN_GPA
            out.update(stress_mae_gpa=np.abs(s).mean(), stress_rmse_gpa=np.sqrt((s ** 2).mean()))
        return out

    result = {"all": summary(np.ones(len(data), dtype=bool))}
    if data.periodic.any() and not data.periodic.all():
        result.update(molecules=summary(~data.periodic), crystals=summary(data.periodic))
    sources = np.unique(c["source"])
    if len(sources) > 1:
        result.update({f"source {name}": summary(c["source"] == name) for name in sources})
    return {k: {m: float(v) if isinstance(v, np.floating) else v for m, v in d.items()} for k, d in result.items()}


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


MD_SPEED_STEPS = 5  # velocity-Verlet steps of the student's MD speed rows


def speed(model: ForceField, teacher, groups: dict[str, list], device="cpu", repeats: int = 3) -> list[dict]:
    """Atom-steps per second (one energy + forces (+ stress for crystals) evaluation of every atom) of the teacher and
    the student on the same structures and device: the teacher one structure at a time through ASE (how label.py
    calls it) and, where it can batch (CHGNet), all of a group in one call; the student both one at a time through
    its ASE calculator and as one flat batch; and the student's
    NVE molecular dynamics (forces only), one structure at a time through ASE's VelocityVerlet and all at once
    (models/batched_md.py). groups: name -> ase.Atoms list. Median of `repeats` passes (the teacher: one pass when it
    takes over 30 s; the batched MD: one run)."""
    from models.batched_md import batched_nve
    from models.forcefield import student_calculator

    calc = student_calculator(model, device)
    dtype = next(model.parameters()).dtype
    rows = []
    for name, structures in groups.items():
        atoms = sum(len(a) for a in structures)

        def student_single():
            for a in structures:
                b = a.copy()
                b.calc = calc
                b.get_forces()
                if b.pbc.any():
                    b.get_stress()

        def student_batched():
            numbers, pos, batch, cell, pbc = flat_batch(structures, device=device, dtype=dtype)
            model(numbers, pos, batch, cell, pbc, stress=bool(pbc.any()))  # neighbour search included
            if device != "cpu" and torch.cuda.is_available():
                torch.cuda.synchronize()

        def md_single():  # ASE's velocity Verlet, one structure at a time, as evaluate.py's NVE runs
            from ase import units
            from ase.md.verlet import VelocityVerlet
            for a in structures:
                b = a.copy()
                b.calc = calc
                VelocityVerlet(b, 0.5 * units.fs).run(MD_SPEED_STEPS)

        student_batched(), student_single()  # warm-up: first calls allocate and pick kernels
        row = {"group": name, "structures": len(structures), "atoms": atoms,
               "mean_atoms": atoms / len(structures),
               "student_single_atoms_per_s": atoms / _median_seconds(student_single, repeats),
               "student_batched_atoms_per_s": atoms / _median_seconds(student_batched, repeats),
               # MD: atom-steps/s of MD_SPEED_STEPS steps, one structure at a time through ASE and all at once
               "student_md_single_atom_steps_per_s": atoms * MD_SPEED_STEPS / _median_seconds(md_single, repeats),
               "student_md_batched_atom_steps_per_s": batched_nve(model, structures, MD_SPEED_STEPS, 0.5, 300,
                                                                  device=device)["atom_steps_per_s"]}
        if teacher is not None:
            teacher.label(structures[0])  # warm-up
            t = _median_seconds(lambda: [teacher.label(a) for a in structures], 1)
            if t < 30:
                t = _median_seconds(lambda: [teacher.label(a) for a in structures], repeats)
            row.update(teacher_atoms_per_s=atoms / t,
                       speedup_single=row["student_single_atoms_per_s"] * t / atoms,
                       speedup_batched=row["student_batched_atoms_per_s"] * t / atoms)
            if teacher.batch is not None:  # like for like: the student batched against the teacher batched
                teacher.label_many(structures[:2])  # warm-up
                t = _median_seconds(lambda: teacher.label_many(structures), repeats)
                row.update(teacher_batched_atoms_per_s=atoms / t,
                           speedup_batched_vs_batched=row["student_batched_atoms_per_s"] * t / atoms)
        rows.append(row)
    return rows


def nve(atoms, calc, steps: int, timestep_fs: float, temperature_k: float, seed: int = 0, every: int = 10) -> dict:
    """Velocity-Verlet (NVE) from Maxwell-Boltzmann velocities: the energy drift (slope of a linear fit to the total
    energy, meV/atom/ps), its fluctuation, and whether the run stays physical: no two atoms closer than 0.5 A
    (collapse), no atom without a neighbour within 4 A (flying apart: for molecules), the temperature below 5,000 K,
    every energy finite. Records every `every` steps and after the last, so every one of the `steps` (>= 1) is
    checked."""
    if steps < 1:  # a run of no step would check only the start, and be called physical
        raise ValueError(f"an NVE run needs at least one step, not {steps}")
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from models.batched_md import initial_velocities

    a = atoms.copy()
    a.calc = calc
    a.set_velocities(initial_velocities(atoms, temperature_k, seed))
    periodic = bool(a.pbc.any())
    times, energies, temperatures, problems = [], [], [], []

    def record(step: int):
        e = a.get_potential_energy() + a.get_kinetic_energy()
        d = a.get_all_distances(mic=periodic) + np.eye(len(a)) * 1e9
        times.append(step * timestep_fs / 1000)
        energies.append(e)
        temperatures.append(a.get_temperature())
        if not np.isfinite(e):
            problems.append(f"non-finite energy at {times[-1]:.3f} ps")
        elif d.min() < 0.5:
            problems.append(f"atoms {d.min():.2f} A apart at {times[-1]:.3f} ps")
        elif not periodic and len(a) > 1 and d.min(axis=1).max() > 4.0:
            problems.append(f"an atom {d.min(axis=1).max():.1f} A from its nearest neighbour at {times[-1]:.3f} ps")
        elif temperatures[-1] > 5000:
            problems.append(f"temperature {temperatures[-1]:.0f} K at {times[-1]:.3f} ps")
        return not problems

    dyn = VelocityVerlet(a, timestep_fs * units.fs)
    t0 = time.perf_counter()
    done = 0
    record(done)
    while done < steps:
        n = min(every, steps - done)
        dyn.run(n)
        done += n
        if not record(done):
            break
    seconds = time.perf_counter() - t0
    t, e = np.array(times), np.array(energies)
    ok = np.isfinite(e)
    slope = np.polyfit(t[ok], e[ok], 1)[0] if ok.sum() >= 2 else float("nan")
    return {"formula": a.get_chemical_formula(), "atoms": len(a), "periodic": periodic, "steps": done,
            "timestep_fs": timestep_fs, "temperature_k": temperature_k, "ps": float(t[-1]),
            "drift_mev_per_atom_per_ps": 1000 * float(slope) / len(a),
            "energy_std_mev_per_atom": 1000 * float(np.std(e[ok])) / len(a),
            "mean_temperature_k": float(np.mean(temperatures)), "physical": not problems,
            "problem": problems[0] if problems else None, "seconds": seconds,
            "trace": {"ps": t.tolist(), "total_energy_ev": e.tolist(), "temperature_k": temperatures}}
