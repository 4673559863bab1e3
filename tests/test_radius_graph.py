"""Radius-graph message passing: the Triton kernels against the PyTorch reference (forward and the
gradients for pos, x and filter_weight; awkward structure sizes, periodic and triclinic cells, structures
without edges), their precision against float64 next to the reference's own, forces against finite
differences, invariances, and the dispatch. The reference itself is checked against a brute-force sum
over periodic images, and the filter against its smoothness promise at the cutoff.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1, numpy), in the child process
that `test_kernels_in_the_interpreter` starts for all kernel test files (tests/conftest.py), for the reasons
given in tests/test_triangle_attention.py (triton reads the variable at import; setting it here would leak
into other test files). The tests marked `kernels` run there, or in this process when it has a CUDA device
or was itself started with the variable.
"""
import pytest
import torch

from conftest import DEVICE, INTERPRETER, kernels

import kernels.radius_graph as rg

CUTOFF = 3.0
# One atom, less than a block, two blocks and one, several blocks (of 16, with a partial last one). The interpreter
# pays milliseconds per tile and basis function, and a structure of n atoms has (n / 16)^2 tiles: there the largest
# is as small as gives several; a GPU takes a larger one.
SIZES = (1, 7, 33, 130 if DEVICE == "cuda" else 50)


def test_kernels_in_the_interpreter(run_kernel_tests_in_interpreter):
    """This file's kernel tests, run in a child process whose triton is imported in interpreter mode."""
    run_kernel_tests_in_interpreter(__file__)


def _cells(n, kind, g):
    """[n, 3, 3] lattices (rows) whose perpendicular widths all exceed 2 * CUTOFF."""
    if kind == "cubic":
        return torch.eye(3).repeat(n, 1, 1) * (2 * CUTOFF + 1.5)
    # triclinic: a skewed, slightly random lattice; widths checked below
    base = 1.15 * torch.tensor([[7.5, 0.0, 0.0], [2.5, 7.0, 0.0], [-1.8, 2.2, 7.2]])  # widths ~7.7
    cells = base + 0.3 * torch.randn(n, 3, 3, generator=g)
    rg.check_cutoff(cells, CUTOFF)
    return cells


def _inputs(sizes=SIZES, F=24, K=6, cell=None, seed=0, spread=0.7, dtype=torch.float32):
    """batch, pos, x, filter_weight, an output gradient dy, and cell (None, "cubic" or "triclinic").
    Molecule positions are Gaussian with a spread growing like n^(1/3), so each atom has a few neighbours
    and many atoms are beyond the cutoff; periodic ones are uniform in the cell (some outside it)."""
    g = torch.Generator().manual_seed(seed)
    batch = torch.cat([torch.full((n,), s) for s, n in enumerate(sizes)])
    A = batch.numel()
    if cell is None:
        scale = torch.tensor([spread * n ** (1 / 3) for n in sizes])[batch]
        pos = torch.randn(A, 3, generator=g) * scale[:, None]
    else:
        cell = _cells(len(sizes), cell, g)
        frac = torch.rand(A, 3, generator=g) * 1.4 - 0.2  # also atoms outside the home cell
        pos = torch.einsum("aj,ajx->ax", frac, cell[batch])
        cell = cell.to(DEVICE, dtype)
    x, dy = torch.randn(A, F, generator=g), torch.randn(A, F, generator=g)
    w = torch.randn(K, F, generator=g) / K ** 0.5
    return batch.to(DEVICE), *(t.to(DEVICE, dtype) for t in (pos, x, w, dy)), cell


def _run(fn, batch, pos, x, w, dy, cell, **kw):
    """Output and gradients for pos, x, filter_weight."""
    leaves = [t.detach().clone().requires_grad_() for t in (pos, x, w)]
    y = fn(leaves[0], leaves[1], batch, CUTOFF, leaves[2], cell, **kw)
    return [y.detach()] + list(torch.autograd.grad(y, leaves, dy))


def _float64(batch, pos, x, w, dy, cell):
    return batch, pos.double(), x.double(), w.double(), dy.double(), None if cell is None else cell.double()


NAMES = ("y", "dpos", "dx", "dfilter_weight")


# ---------------------------------------------------------------------------------------------
# The reference and the filter (plain PyTorch: run in every process)
# ---------------------------------------------------------------------------------------------


def _brute_force(pos, x, batch, cutoff, w, cell):
    """Double loop over atom pairs and all 27 neighbouring images: the definition, with no minimum image."""
    y = torch.zeros_like(x)
    shifts = torch.cartesian_prod(*[torch.tensor([-1.0, 0.0, 1.0], dtype=pos.dtype)] * 3)
    for i in range(len(pos)):
        for j in range(len(pos)):
            if batch[i] != batch[j]:
                continue
            images = [pos[j]] if cell is None else list(pos[j] + shifts @ cell[batch[j]])
            for pj in images:
                d = (pj - pos[i]).norm()
                if (j != i or cell is not None) and 0 < d < cutoff:
                    y[i] += x[j] * rg.edge_filter(d, cutoff, w)
    return y


@pytest.mark.parametrize("cell", [None, "cubic", "triclinic"])
def test_reference_is_the_definition(cell, monkeypatch):
    """Minimum image == all images within the cutoff, when the cutoff is below half the cell width
    (positions wrapped into the home cell, so that the 27 neighbouring images suffice)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    batch, pos, x, w, _, cell = (t.cpu() if torch.is_tensor(t) else t
                                 for t in _float64(*_inputs((1, 5, 12), F=4, K=3, cell=cell, seed=4)))
    if cell is not None:
        frac = torch.einsum("ax,axj->aj", pos, torch.linalg.inv(cell[batch]))
        pos = torch.einsum("aj,ajx->ax", frac % 1.0, cell[batch])
    want = _brute_force(pos, x, batch, CUTOFF, w, cell)
    assert want.abs().sum() > 0
    torch.testing.assert_close(rg.radius_message_passing_reference(pos, x, batch, CUTOFF, w, cell), want)


def test_filter_vanishes_smoothly_at_the_cutoff():
    w = torch.randn(5, 3, dtype=torch.float64)
    d = torch.tensor([CUTOFF - 1e-4, CUTOFF, CUTOFF + 0.5], dtype=torch.float64, requires_grad=True)
    f = rg.edge_filter(d, CUTOFF, w)
    assert f[0].abs().max() < 1e-6 and (f[1:] == 0).all()
    (grad,) = torch.autograd.grad(f.sum(), d)
    assert grad[0].abs() < 1e-3 and (grad[1:] == 0).all()
    assert rg.gaussian_rbf(torch.zeros(1), CUTOFF, 1).shape == (1, 1)  # n_rbf = 1 is allowed


def test_too_large_cutoff_and_bad_inputs_raise():
    batch, pos, x, w, _, cell = _inputs((3, 4), F=4, K=2, cell="cubic")
    with pytest.raises(ValueError, match="half the smallest perpendicular"):
        rg.radius_message_passing(pos, x, batch, 0.5 * float(cell[0, 0, 0]) + 0.1, w, cell)
    skewed = cell.clone()
    skewed[:, 1] = cell[:, 1] + 3.0 * cell[:, 0]  # same lattice vectors' lengths >= 7.5, but a thin slab
    rg.check_cutoff(cell, CUTOFF)
    with pytest.raises(ValueError, match="perpendicular"):
        rg.check_cutoff(skewed, CUTOFF)
    with pytest.raises(ValueError, match="sorted"):
        rg.radius_message_passing(pos, x, batch.flip(0), CUTOFF, w)
    with pytest.raises(ValueError, match="filter_weight"):
        rg.radius_message_passing(pos, x, batch, CUTOFF, w[:, :2])


# ---------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------


@kernels
def test_kernels_run_where_expected():
    x = torch.zeros(1, device=DEVICE)
    assert rg.backend(x) == "triton"
    assert rg._interpreted() == INTERPRETER


@kernels
@pytest.mark.parametrize("cell,F,K", [
    (None, 24, 6),          # F padded to 32
    (None, 16, 1),          # a single Gaussian
    ("cubic", 24, 6),
    ("triclinic", 7, 4),    # F padded to 16
])
def test_matches_reference(cell, F, K):
    inputs = _inputs(F=F, K=K, cell=cell)
    got = _run(rg.radius_message_passing, *inputs, block_i=16, block_j=16)
    want = _run(rg.radius_message_passing_reference, *_float64(*inputs))
    assert want[0][:1].abs().sum() == 0 and want[0].abs().sum() > 0  # the lone atom gets nothing
    for name, a, b in zip(NAMES, got, want):
        assert a.dtype == torch.float32 and torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item(), msg=name)


@kernels
@pytest.mark.parametrize("cell", [None, "triclinic"])
def test_block_shapes_and_atom_order_do_not_matter(cell):
    inputs = _inputs((5, 40, 21), F=8, K=3, cell=cell, seed=1)
    a = _run(rg.radius_message_passing, *inputs, block_i=16, block_j=32, sort_atoms=False)
    b = _run(rg.radius_message_passing, *inputs, block_i=32, block_j=16, sort_atoms=False)
    c = _run(rg.radius_message_passing, *inputs, block_i=16, block_j=16, sort_atoms=True)
    for name, u, v, w in zip(NAMES, a, b, c):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5, msg=name)
        torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("cell", [None, "periodic"])
def test_spatial_order_groups_neighbours(cell):
    """spatial_order keeps structures contiguous and in order, and after it far fewer 24 x 24 tiles of a
    600-atom structure hold an edge (the tiles the kernels compute)."""
    g = torch.Generator().manual_seed(10)
    sizes = (3, 600, 2)
    batch = torch.cat([torch.full((n,), s) for s, n in enumerate(sizes)])
    cells = torch.eye(3).repeat(3, 1, 1) * 18.0
    cells[:, 1, 0] = 4.0  # a little skew
    pos = torch.einsum("aj,ajx->ax", torch.rand(len(batch), 3, generator=g), cells[batch])
    cells = cells if cell else None
    perm = rg.spatial_order(pos, batch, CUTOFF, cells)
    assert torch.equal(perm.sort().values, torch.arange(len(batch)))
    assert torch.equal(batch[perm], batch)

    def tiles_with_edges(p):
        r = p[None] - p[:, None]
        if cells is not None:
            c = cells[1].expand(r.shape[0] * r.shape[1], 3, 3)
            r = rg._minimum_image(r.reshape(-1, 3), c, torch.linalg.inv(c)).reshape(r.shape)
        edge = r.norm(dim=-1) < CUTOFF
        edge.fill_diagonal_(False)
        return int(edge.reshape(600 // 24, 24, 600 // 24, 24).any(3).any(1).sum())

    big = slice(3, 603)
    assert tiles_with_edges(pos[perm][big]) < 0.6 * tiles_with_edges(pos[big])


@kernels
@pytest.mark.parametrize("cell", [None, "triclinic"])
def test_no_edges_give_zeros(cell):
    """Atoms far apart (and, periodic, a lattice too: atoms on a coarse grid) have no neighbours."""
    batch, pos, x, w, dy, c = _inputs((1, 7, 20), F=8, K=3, cell=cell, seed=2)
    if cell is None:
        noise = torch.randn(pos.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        pos = noise + 10 * torch.arange(len(pos), device=DEVICE)[:, None]
    else:
        batch = torch.arange(3, device=DEVICE)  # one atom per cell: only its own images, never edges
        pos, x, dy = pos[:3], x[:3], dy[:3]
    for t in _run(rg.radius_message_passing, batch, pos, x, w, dy, c, block_i=16, block_j=16):
        assert (t == 0).all()


@kernels
@pytest.mark.parametrize("cell", [None, "triclinic"])
def test_precision_against_float64(cell):
    """The fp32 kernel's error against float64 is at most 3x the fp32 reference's (plus a tiny floor)."""
    inputs = _inputs((7, 33, 60), F=16, K=8, cell=cell, seed=3)
    exact = _run(rg.radius_message_passing_reference, *_float64(*inputs))
    torch_ = _run(rg.radius_message_passing_reference, *inputs)
    kernel = _run(rg.radius_message_passing, *inputs, block_i=16, block_j=16)
    for name, k, t, e in zip(NAMES, kernel, torch_, exact):
        err_kernel = (k.double() - e).abs().max().item()
        err_torch = (t.double() - e).abs().max().item()
        floor = 1e-6 * e.abs().max().item()
        assert err_kernel <= 3 * err_torch + floor, f"{name}: kernel {err_kernel:.3g} vs torch {err_torch:.3g}"


@kernels
@pytest.mark.parametrize("cell", [None, "triclinic"])
def test_forces_match_finite_differences(cell):
    """forces = -dE/dpos, E = sum(y), from the kernel, against central differences of the float64
    reference (atoms in both halves of the structures, every coordinate)."""
    batch, pos, x, w, _, c = _inputs((1, 7, 12), F=8, K=4, cell=cell, seed=5)
    p = pos.clone().requires_grad_()
    energy = rg.radius_message_passing(p, x, batch, CUTOFF, w, c, block_i=16, block_j=16).sum()
    (forces,) = torch.autograd.grad(-energy, p)
    b64, p64, x64, w64, _, c64 = _float64(batch, pos, x, w, pos, c)

    def E(q):
        return rg.radius_message_passing_reference(q, x64, b64, CUTOFF, w64, c64).sum().item()

    h = 1e-5
    for a in (0, 3, 8, 19):
        for k in range(3):
            plus, minus = p64.clone(), p64.clone()
            plus[a, k] += h
            minus[a, k] -= h
            fd = -(E(plus) - E(minus)) / (2 * h)
            assert abs(forces[a, k].item() - fd) <= 1e-4 * (1 + abs(fd)), (a, k, forces[a, k].item(), fd)
    assert forces[0].abs().max() == 0  # the lone atom feels nothing
    assert forces.sum(0).abs().max() < 1e-4 * forces.abs().max()  # Newton's third law


def _rotation(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return (q * torch.sign(torch.linalg.det(q))).float().to(DEVICE)


@kernels
@pytest.mark.parametrize("cell", [None, "triclinic"])
def test_translation_and_rotation(cell):
    """y is invariant (x is a scalar feature), dpos rotates with the frame. Periodic: rotating the cell
    with the atoms, and moving single atoms by lattice vectors, change nothing."""
    batch, pos, x, w, dy, c = _inputs((7, 40), F=8, K=4, cell=cell, seed=6)
    kw = dict(block_i=16, block_j=16)
    y, dpos, dx, dw = _run(rg.radius_message_passing, batch, pos, x, w, dy, c, **kw)
    tol = dict(rtol=1e-4, atol=1e-4)
    moved = pos + torch.tensor([3.0, -1.5, 20.0], device=DEVICE)
    torch.testing.assert_close(_run(rg.radius_message_passing, batch, moved, x, w, dy, c, **kw)[0], y, **tol)
    R = _rotation(7)
    rc = None if c is None else c @ R.T
    y2, dpos2, dx2, dw2 = _run(rg.radius_message_passing, batch, pos @ R.T, x, w, dy, rc, **kw)
    torch.testing.assert_close(y2, y, **tol)
    torch.testing.assert_close(dpos2, dpos @ R.T, **tol)
    torch.testing.assert_close(dx2, dx, **tol)
    torch.testing.assert_close(dw2, dw, **tol)
    if c is not None:
        n = torch.randint(-2, 3, (len(pos), 3), generator=torch.Generator().manual_seed(8)).float().to(DEVICE)
        hopped = pos + torch.einsum("aj,ajx->ax", n, c[batch])
        torch.testing.assert_close(_run(rg.radius_message_passing, batch, hopped, x, w, dy, c, **kw)[0], y, **tol)


@kernels
def test_half_precision_inputs_are_upcast():
    inputs = _inputs((7, 20), F=8, K=3, seed=9)
    want = _run(rg.radius_message_passing_reference, *_float64(*inputs))
    batch, pos, x, w, dy, _ = inputs
    got = _run(rg.radius_message_passing, batch, pos, x.bfloat16(), w, dy.bfloat16(), None, block_i=16, block_j=16)
    assert got[0].dtype == torch.bfloat16 and got[2].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].double(), want[0], rtol=2e-2, atol=2e-2 * want[0].abs().max().item())


@kernels
def test_dispatch_takes_the_kernels(monkeypatch):
    batch, pos, x, w, _, _ = _inputs((3, 9), F=8, K=3)
    y = rg.radius_message_passing(pos.requires_grad_(), x, batch, CUTOFF, w)
    assert type(y.grad_fn).__name__ == "RadiusMessagePassingBackward"
    torch.testing.assert_close(y, rg.radius_message_passing_reference(pos, x, batch, CUTOFF, w))
    with pytest.raises(ValueError, match="fp32"):
        rg.radius_message_passing(pos.double(), x.double(), batch, CUTOFF, w.double())
    for sort in (False, True):
        empty = rg.radius_message_passing(pos[:0], x[:0], batch[:0], CUTOFF, w, sort_atoms=sort)
        assert empty.shape == (0, 8)
    # The variable is read at each call: unset, CPU tensors take the reference even where the kernels were
    # decorated for the interpreter (the test below checks it where they were not).
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert rg.backend(x.cpu()) == "reference"


def test_dispatch_cpu_without_interpreter_is_the_reference(monkeypatch):
    batch, pos, x, w, _, _ = (t.cpu() if torch.is_tensor(t) else t for t in _inputs((3, 9), F=8, K=3))
    pos.requires_grad_()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert rg.backend(x) == "reference"
    y = rg.radius_message_passing(pos, x, batch, CUTOFF, w)
    assert type(y.grad_fn).__name__ != "RadiusMessagePassingBackward"
    assert torch.equal(y, rg.radius_message_passing_reference(pos, x, batch, CUTOFF, w))
    assert rg.radius_message_passing(pos[:0], x[:0], batch[:0], CUTOFF, w).shape == (0, 8)
    if not rg._interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="before importing"):
            rg.radius_message_passing(pos, x, batch, CUTOFF, w)
