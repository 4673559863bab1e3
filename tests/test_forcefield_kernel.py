"""The student force field through the fused radius-graph kernel (the path it takes on CUDA) against its edge-list
path: energies and forces of QM9 molecules and of a copper supercell, and which batches may take the kernel.
Without a GPU the kernel runs in Triton's interpreter, in the child process of all kernel test files (tests/conftest.py)."""
import numpy as np
import torch
from ase.build import bulk

from conftest import DEVICE, QM9_FIXTURE, kernels
from models.molecules import read_qm9pack_csv
from models.forcefield import ForceField, ForceFieldConfig, flat_batch, neighbour_edges


def test_kernels_in_the_interpreter(run_kernel_tests_in_interpreter):
    run_kernel_tests_in_interpreter(__file__)


def student():
    torch.manual_seed(0)
    m = ForceField(ForceFieldConfig(elements=[1, 6, 7, 8, 9, 29], hidden=16, n_layers=2, cutoff=3.0, n_rbf=8)).to(DEVICE)
    with torch.no_grad():
        m.energy_scale.fill_(3.0)  # random weights give tiny energies; make the comparison see something
    return m


@kernels
def test_fused_path_matches_edge_list_path():
    qm9 = read_qm9pack_csv([QM9_FIXTURE])
    rng = np.random.default_rng(0)
    copper = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)  # 7.2 A wide: a 3 A cutoff fits the minimum image
    copper.positions += rng.normal(0, 0.1, copper.positions.shape)
    m = student()
    for structures in ([qm9.to_atoms(i) for i in (0, 5, 17)], [copper]):
        numbers, pos, batch, cell, pbc = flat_batch(structures, device=DEVICE, dtype=torch.float32)
        assert m.fused_kernel_applies(pos, cell, pbc)
        e_fused, f_fused, _ = m(numbers, pos.clone(), batch, cell, pbc)  # no edges given: the kernel
        e_edges, f_edges, _ = m(numbers, pos.clone(), batch, cell, pbc, edges=neighbour_edges(pos, batch, cell, pbc, 3.0))
        # the same float32 model in float64 is the truth both paths are judged against
        m64 = student().double()
        m64.load_state_dict(m.state_dict())
        e64, f64, _ = m64(numbers, pos.double().clone(), batch, cell.double(), pbc)
        err_edges = (f_edges.double() - f64).abs().max().item()
        assert (e_fused.double() - e64).abs().max().item() <= 10 * (e_edges.double() - e64).abs().max().item() + 1e-5
        assert (f_fused.double() - f64).abs().max().item() <= 10 * err_edges + 1e-5
        assert f64.abs().max() > 1e-2


@kernels
def test_fused_path_is_taken_only_where_it_applies():
    m = student()
    small = bulk("Cu", "fcc", a=3.6)  # 2.1 A wide: the minimum image would miss neighbours
    numbers, pos, batch, cell, pbc = flat_batch([small], device=DEVICE, dtype=torch.float32)
    assert not m.fused_kernel_applies(pos, cell, pbc)
    mixed = flat_batch([bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2), read_qm9pack_csv([QM9_FIXTURE]).to_atoms(0)],
                       device=DEVICE, dtype=torch.float32)
    assert not m.fused_kernel_applies(mixed[1], mixed[3], mixed[4])
    molecules = flat_batch([read_qm9pack_csv([QM9_FIXTURE]).to_atoms(0)], device=DEVICE, dtype=torch.float64)
    assert not m.fused_kernel_applies(molecules[1], molecules[3], molecules[4])  # the kernel takes float32
    e, f, _ = m(numbers, pos.clone(), batch, cell, pbc)  # falls back to the edge list, with every image
    assert torch.isfinite(f).all()
