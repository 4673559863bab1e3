"""The student force field (models/forcefield.py) on real structures: QM9 molecules and perov-5 / carbon-24
crystals from the fixtures. Forces and stress against finite differences, symmetries, ASE's stress sign,
reference energies, overfitting, and molecular dynamics through the ASE calculator."""
import importlib.util
from pathlib import Path

import ase
import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import QM9_FIXTURE
from models.molecules import read_qm9pack_csv
from models.forcefield import ForceField, ForceFieldConfig, fit_reference_energies, flat_batch, student_calculator
from models.structures import iter_structures

ROOT = Path(__file__).resolve().parents[1]
ELEMENTS = list(range(1, 84))


@pytest.fixture(scope="module")
def structures():
    mols = read_qm9pack_csv([QM9_FIXTURE])
    molecules = [mols.to_atoms(i) for i in (0, 7, 42)]
    crystals = [a for _, _, a in iter_structures([str(ROOT / "tests/data/perov5_sample.csv"),
                                                  str(ROOT / "tests/data/carbon24_sample.csv")])][:4:2]
    return molecules + crystals


def model(seed=0, **kw):
    torch.manual_seed(seed)
    m = ForceField(ForceFieldConfig(elements=ELEMENTS, hidden=16, n_layers=2, cutoff=4.0, n_rbf=8, **kw)).double()
    with torch.no_grad():  # random weights give tiny energies; scale them up so every check has something to see
        m.energy_scale.fill_(3.0)
    return m


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_forces_and_stress_are_derivatives_of_the_energy(structures, family):
    m = model(family=family)
    for atoms in structures:
        numbers, pos, batch, cell, pbc = flat_batch([atoms])
        e, f, s = m(numbers, pos.clone(), batch, cell, pbc, stress=True)
        assert f.abs().max() > 1e-3
        h = 1e-5
        for a, x in [(0, 0), (len(atoms) - 1, 2)]:
            p1, p2 = pos.clone(), pos.clone()
            p1[a, x] += h
            p2[a, x] -= h
            fd = -(m.energy(numbers, p1, batch, cell, pbc) - m.energy(numbers, p2, batch, cell, pbc)) / (2 * h)
            assert f[a, x].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)
        if atoms.pbc.any():
            assert torch.allclose(s, s.transpose(1, 2)) and s.abs().max() > 1e-5
            volume = abs(np.linalg.det(atoms.cell.array))
            for a, b in [(0, 0), (1, 2)]:
                eps = torch.zeros(3, 3, dtype=torch.float64)
                eps[a, b] = eps[b, a] = h / (1 if a == b else 2)
                energies = []
                for sign in (1, -1):
                    deform = torch.eye(3, dtype=torch.float64) + sign * eps
                    energies.append(m.energy(numbers, pos @ deform, batch, cell @ deform, pbc))
                fd = (energies[0] - energies[1]) / (2 * h) / volume
                assert s[0, a, b].item() == pytest.approx(fd.item(), rel=1e-4, abs=1e-9)
        else:
            assert s.abs().max() == 0


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_energy_invariant_forces_equivariant(structures, family):
    m = model(family=family)
    q, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    for atoms in structures:
        numbers, pos, batch, cell, pbc = flat_batch([atoms])
        e, f, _ = m(numbers, pos.clone(), batch, cell, pbc)
        perm = torch.randperm(len(atoms), generator=torch.Generator().manual_seed(2))
        moved = pos @ q.T + torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
        e2, f2, _ = m(numbers[perm], moved[perm].clone(), batch, cell @ q.T, pbc)
        assert e2.item() == pytest.approx(e.item(), rel=1e-10, abs=1e-10)
        assert torch.allclose(f2, (f @ q.T)[perm], atol=1e-9)
        if atoms.pbc.any():  # moving atoms by whole lattice vectors changes nothing
            shifted = pos.clone()
            shifted[0] += cell[0, 1]
            shifted[-1] += 2 * cell[0, 0] - 3 * cell[0, 2]
            e3, f3, _ = m(numbers, shifted, batch, cell, pbc)
            assert e3.item() == pytest.approx(e.item(), rel=1e-10) and torch.allclose(f3, f, atol=1e-9)


def test_neighbour_edges_equal_ases_neighbour_list(structures):
    """Every image within the cutoff, as ase.neighborlist finds them, also for atoms outside the cell."""
    from ase.neighborlist import neighbor_list

    from models.forcefield import neighbour_edges

    for atoms in structures:
        a = atoms.copy()
        if a.pbc.any():
            a.positions[0] += 2 * a.cell[1] - a.cell[2]  # outside the cell: the same crystal
        numbers, pos, batch, cell, pbc = flat_batch([a])
        i, j, shift = neighbour_edges(pos, batch, cell, pbc, 4.0)
        ours = sorted(zip(i.tolist(), j.tolist(), map(tuple, shift.round().long().tolist())))
        ai, aj, a_shift = neighbor_list("ijS", a, 4.0)
        assert ours == sorted(zip(ai.tolist(), aj.tolist(), map(tuple, a_shift.tolist())))
        assert len(ours) > len(a)


def test_stress_sign_is_ases():
    """The model's stress is (1/V) dE/d(strain) (test above); so is an ASE calculator's: on compressed copper
    EMT's stress is negative and equals that derivative, so student and teacher stresses compare sign for sign."""
    from ase.calculators.emt import EMT

    cu = bulk("Cu", "fcc", a=3.4)  # below EMT's 3.6 A equilibrium: compressed
    cu.calc = EMT()
    assert (cu.get_stress()[:3] < 0).all()
    h, volume = 1e-5, cu.get_volume()
    e = [cu.copy() for _ in range(2)]
    for a, sign in zip(e, (1, -1)):
        a.set_cell(cu.cell.array * (1 + sign * h), scale_atoms=True)
        a.calc = EMT()
    fd = (e[0].get_potential_energy() - e[1].get_potential_energy()) / (2 * h) / volume / 3  # d/d(eps_xx + yy + zz)
    assert fd == pytest.approx(cu.get_stress()[:3].mean(), rel=1e-3)


def test_reference_energies_by_least_squares():
    rng = np.random.default_rng(0)
    truth = {1: -13.6, 6: -1030.0, 8: -2040.0}
    numbers = [rng.choice([1, 6, 8], size=rng.integers(3, 12)) for _ in range(40)]
    energies = np.array([sum(truth[z] for z in zs) + rng.normal(0, 0.01) for zs in numbers])
    e0 = fit_reference_energies(numbers, energies, [1, 6, 8, 9])
    assert np.allclose(e0[:3], [-13.6, -1030.0, -2040.0], atol=0.05) and e0[3] == 0


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_overfits_ten_emt_labelled_structures(family):
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(0)
    data = []
    for k in range(10):
        a = bulk("Cu", "fcc", a=3.6, cubic=True) if k % 2 else ase.Atoms("CuNi", positions=[[0, 0, 0], [0, 0, 2.4]])
        a.positions += rng.normal(0, 0.08, a.positions.shape)
        a.calc = EMT()
        data.append((a, a.get_potential_energy(), a.get_forces()))
    torch.manual_seed(0)
    m = ForceField(ForceFieldConfig(elements=[28, 29], hidden=16, n_layers=2, cutoff=3.5, n_rbf=8, family=family)).double()
    with torch.no_grad():
        m.reference_energy.copy_(torch.from_numpy(fit_reference_energies([a.numbers for a, _, _ in data],
                                                                          [e for _, e, _ in data], [28, 29])))
    numbers, pos, batch, cell, pbc = flat_batch([a for a, _, _ in data])
    e_ref = torch.tensor([e for _, e, _ in data], dtype=torch.float64)
    f_ref = torch.tensor(np.concatenate([f for _, _, f in data]), dtype=torch.float64)
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)

    def loss():
        e, f, _ = m(numbers, pos.clone(), batch, cell, pbc, create_graph=True)
        return ((e - e_ref) ** 2).mean() + ((f - f_ref) ** 2).mean()

    first = loss().item()
    for _ in range(150):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert value.item() < first / 10, (first, value.item())


def test_calculator_runs_velocity_verlet(structures):
    from ase import units
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
    from ase.md.verlet import VelocityVerlet

    m = model()
    for atoms in (structures[0], structures[3]):
        a = atoms.copy()
        a.calc = student_calculator(m)
        MaxwellBoltzmannDistribution(a, temperature_K=300, rng=np.random.default_rng(0))
        e0 = a.get_total_energy()
        VelocityVerlet(a, timestep=0.2 * units.fs).run(20)
        assert np.isfinite(a.positions).all() and abs(a.get_total_energy() - e0) < 0.05 * len(a)
        if a.pbc.any():
            assert a.get_stress().shape == (6,)


@pytest.mark.parametrize("family", ["schnet", "painn"])
def test_batched_nve_is_ases_velocity_verlet_for_each_structure(structures, family):
    """Three molecules and two crystals advanced in one batch follow, step for step, the trajectories ASE's
    VelocityVerlet runs for each alone with the student's calculator, from the same initial velocities; the snapshots
    every 5 steps are ASE's positions and temperatures there."""
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from models.batched_md import batched_nve, initial_velocities

    m = model(family=family)
    out = batched_nve(m, structures, steps=15, timestep_fs=0.5, temperature_k=300, seed=4, snapshot_every=5)
    assert out["total_energy_ev"].shape == (16, len(structures)) and out["atom_steps_per_s"] > 0
    assert out["snapshots"].shape == (3, len(out["batch"]), 3) and out["temperature_k"].shape == (3, len(structures))
    for k, atoms in enumerate(structures):
        a = atoms.copy()
        a.calc = student_calculator(m)
        a.set_velocities(initial_velocities(atoms, 300, 4 + k))
        mine = out["batch"] == k
        md = VelocityVerlet(a, 0.5 * units.fs)
        for snap in range(3):
            md.run(5)
            np.testing.assert_allclose(out["snapshots"][snap][mine], a.positions, atol=1e-9)
            assert out["temperature_k"][snap, k] == pytest.approx(a.get_temperature(), rel=1e-9)
        np.testing.assert_allclose(out["positions"][mine], a.positions, atol=1e-9)
        np.testing.assert_allclose(out["velocities"][mine], a.get_velocities(), atol=1e-9)
        assert out["total_energy_ev"][-1, k] == pytest.approx(a.get_potential_energy() + a.get_kinetic_energy(), abs=1e-8)


@pytest.mark.parametrize("family, fmax, steps", [("schnet", 1e-6, 25), ("painn", 0.3, 60)])
def test_batched_fire_is_ases_fire_for_each_structure(structures, family, fmax, steps):
    """Three molecules and two crystals relaxed in one batch take, step for step, the path ASE's FIRE takes for each
    alone, and each stops where ASE's stops: at fmax (PaiNN at 0.3 eV/A: after 40 and 44 steps, at once for the
    crystals, never for the third molecule) or after `steps`."""
    from ase.optimize import FIRE

    from models.batched_md import batched_fire

    m = model(family=family)
    out = batched_fire(m, structures, fmax=fmax, steps=steps)
    taken = []
    for k, atoms in enumerate(structures):
        a = atoms.copy()
        a.calc = student_calculator(m)
        first = a.get_potential_energy()
        opt = FIRE(a, logfile=None)
        converged = opt.run(fmax=fmax, steps=steps)
        taken.append(opt.nsteps)
        np.testing.assert_allclose(out["positions"][out["batch"] == k], a.positions, atol=1e-9)
        assert out["energy_ev"][:, k] == pytest.approx([first, a.get_potential_energy()], abs=1e-8)
        assert out["converged"][k] == converged and out["fmax"][k] == pytest.approx(np.linalg.norm(a.get_forces(), axis=1).max())
    assert out["steps"].tolist() == taken
    assert len(set(taken)) > 1 or fmax < 1e-3, taken  # early stops, one structure at a time


def test_committee_deviation_is_the_largest_spread_of_the_members_forces(structures):
    """Two members: the spread on an atom is half the distance between their forces; identical members agree."""
    from models.active_learning import committee_deviation

    a, b = model(seed=0), model(seed=1)
    deviation = committee_deviation([a, b], structures, batch_size=2)
    for k, atoms in enumerate(structures):
        fa, fb = (m(*flat_batch([atoms]))[1].detach().numpy() for m in (a, b))
        assert deviation[k] == pytest.approx(np.linalg.norm(fa - fb, axis=1).max() / 2, rel=1e-9)
    assert np.all(deviation > 0) and np.all(committee_deviation([a, model(seed=0)], structures) < 1e-12)
    with pytest.raises(ValueError, match="at least two"):
        committee_deviation([a], structures)


def test_exploration_stops_a_trajectory_where_it_goes_unphysical_and_picks_the_snapshot_before():
    """A molecule driven hot (a temperature limit it must pass) ends at its first hot snapshot; the one before it is
    marked and picked before any calmer snapshot, however disputed."""
    from models.active_learning import explore, pick

    mols = read_qm9pack_csv([QM9_FIXTURE])
    inputs = [mols.to_atoms(i) for i in (0, 7)]
    driver = model(seed=0)
    calm = explore(driver, inputs, steps=20, every=5, temperature_k=300, max_temperature_k=1e9)
    assert [(f.info["explore_source"], f.info["explore_step"]) for f in calm] == [(k, s) for k in (0, 1) for s in (5, 10, 15, 20)]
    assert not any("explore_unphysical" in f.info for f in calm)
    limit = min(f.info["explore_temperature_k"] for f in calm if f.info["explore_source"] == 1 and f.info["explore_step"] > 5)
    hot = explore(driver, inputs, steps=20, every=5, temperature_k=300, max_temperature_k=limit - 1e-6)
    second = [f for f in hot if f.info["explore_source"] == 1]
    assert second[-1].info.get("explore_unphysical", "").startswith("temperature")
    assert all(f.info["explore_temperature_k"] <= limit for f in second)
    marked = hot.index(second[-1])
    deviation = np.linspace(1.0, 2.0, len(hot))
    deviation[marked] = 0.0  # picked first all the same
    chosen = pick(hot, deviation, n=3, min_deviation=0.5)
    assert chosen[0] == marked and len(chosen) == 3 and deviation[chosen[1]] >= deviation[chosen[2]]
    assert pick(hot, deviation, n=100, min_deviation=10.0) == [i for i in range(len(hot)) if "explore_unphysical" in hot[i].info]


def test_compiled_inference_is_the_eager_model(structures):
    """compile_inference changes how the layers run, not what they compute: energies, forces and stresses of
    molecules and crystals, one at a time and batched (other atom and edge counts than the first call's), and an
    isolated atom (no edges: the eager layers) match the eager model's in float64. Training's path (create_graph)
    stays eager. (A compiled PaiNN student runs in tests/test_student_bench.py.)"""
    eager = model()
    compiled = model().compile_inference()
    lonely = structures[0].copy()
    lonely.positions[0] += 50.0  # one atom far beyond the cutoff of every other
    for group in ([structures[0]], structures, [lonely]):
        batch = flat_batch(group)
        for got, want in zip(compiled(*batch, stress=True), eager(*batch, stress=True)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    batch = flat_batch(structures)
    _, forces, _ = compiled(*batch, create_graph=True)
    assert forces.requires_grad  # the forces of a loss are still differentiable


@pytest.mark.skipif(not importlib.util.find_spec("chgnet"), reason="chgnet not installed (pip install chgnet)")
def test_speed_times_a_teacher_that_batches_batched_too(structures):
    """forcefield_eval.speed beside CHGNet: the teacher one at a time and in one batched call, and the student's
    batched speed against each; a teacher that cannot batch (EMT) gets no batched columns. Its times mean nothing here."""
    from models.forcefield_eval import speed
    from models.teachers import get_teacher

    groups = {"crystals": structures[3:], "molecules": structures[:1]}
    chgnet, emt = speed(model(), get_teacher("chgnet"), groups, repeats=1), speed(model(), get_teacher("emt"), {"metal": [bulk("Cu")]}, repeats=1)
    for row in chgnet:
        assert row["teacher_atoms_per_s"] > 0 and row["teacher_batched_atoms_per_s"] > 0
        assert row["speedup_batched_vs_batched"] == pytest.approx(
            row["student_batched_atoms_per_s"] / row["teacher_batched_atoms_per_s"])
    assert emt[0]["teacher_atoms_per_s"] > 0 and "teacher_batched_atoms_per_s" not in emt[0]


def test_repulsion_changes_nothing_at_data_distances_and_pushes_overlapping_atoms_apart(structures):
    """The ZBL term (ForceFieldConfig.repulsion): on the fixture's molecules and crystals, whose every pair lies beyond
    0.6 of its covalent-radii sum, a student with it gives exactly what the same weights give without it. Squeezed
    below that, a pair's energy rises as it closes, zero slope where it switches on, and forces and stress stay the
    derivatives of the energy (finite differences)."""
    from ase.data import covalent_radii

    plain, repelled = model(), model(repulsion=0.6)
    repelled.load_state_dict(plain.state_dict())
    for atoms in structures:
        args = flat_batch([atoms])
        for a, b in zip(plain(*args, stress=True), repelled(*args, stress=True)):
            assert torch.equal(a, b)

    crystal = structures[3].copy()  # a perov-5 cell: push atom 1 toward atom 0 along their (minimum-image) bond
    z0, z1 = crystal.numbers[:2]
    r_off = 0.6 * (covalent_radii[z0] + covalent_radii[z1])
    bond = crystal.get_distance(0, 1, mic=True, vector=True)
    added = []
    for r in (1.2 * r_off, 0.999 * r_off, 0.9 * r_off, 0.6 * r_off, 0.3 * r_off):
        squeezed = crystal.copy()
        squeezed.positions[1] = squeezed.positions[0] + bond / np.linalg.norm(bond) * r
        args = flat_batch([squeezed])
        added.append((repelled.energy(*args) - plain.energy(*args)).item())
    assert added[0] == 0 and 0 < added[1] < 1e-3 * added[2] and added[2] < added[3] < added[4]

    numbers, pos, batch, cell, pbc = args  # the pair at 0.3 of r_off: the repulsion dominates the forces
    e, f, s = repelled(numbers, pos.clone(), batch, cell, pbc, stress=True)
    h = 1e-6
    for a, x in [(0, 0), (1, 2)]:
        p1, p2 = pos.clone(), pos.clone()
        p1[a, x] += h
        p2[a, x] -= h
        fd = -(repelled.energy(numbers, p1, batch, cell, pbc) - repelled.energy(numbers, p2, batch, cell, pbc)) / (2 * h)
        assert f[a, x].item() == pytest.approx(fd.item(), rel=1e-5)
    eps = torch.zeros(3, 3, dtype=torch.float64)
    eps[0, 0] = h
    energies = [repelled.energy(numbers, pos @ (torch.eye(3, dtype=torch.float64) + sign * eps), batch,
                                cell @ (torch.eye(3, dtype=torch.float64) + sign * eps), pbc) for sign in (1, -1)]
    fd = (energies[0] - energies[1]) / (2 * h) / abs(np.linalg.det(squeezed.cell.array))
    assert s[0, 0, 0].item() == pytest.approx(fd.item(), rel=1e-4)


def test_repulsion_must_lie_within_the_cutoff():
    with pytest.raises(ValueError, match="beyond the cutoff"):
        ForceFieldConfig(elements=[55, 7], cutoff=2.0, repulsion=0.6)  # Cs: 2 x 2.44 A x 0.6 = 2.9 A
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        ForceFieldConfig(repulsion=1.5)
