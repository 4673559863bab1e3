"""Radius-graph continuous-filter convolution (SchNet-style), fused in Triton, with a PyTorch reference.

Shapes (A atoms, F features, S structures, K = n_rbf radial basis functions):
    pos            [A, 3]     Cartesian positions
    x              [A, F]     features of the sending atoms
    batch          [A]        integer structure index of each atom, sorted ascending
    cutoff         float      neighbour radius
    filter_weight  [K, F]     learned weights of the radial filter
    cell           None, or [S, 3, 3] lattice vectors (rows) of periodic structures; S > batch.max()
    y              [A, F]     same dtype as x

    y[i] = sum over j != i with batch[j] == batch[i] and d_ij = |r_ij| < cutoff of
           x[j] * edge_filter(d_ij, cutoff, filter_weight)

where r_ij = pos[j] - pos[i], replaced for periodic structures by its minimum image.

The filter (`edge_filter`): W(d) = envelope(d) * (rbf(d) @ filter_weight), shape [..., F], with
    rbf_k(d)    = exp(-(d - mu_k)^2 / (2 sigma^2)),  mu_k = k * sigma,  sigma = cutoff / max(K - 1, 1),
                  k = 0 .. K-1: Gaussians with centres evenly spaced on [0, cutoff], width = their spacing
                  (schnetpack's GaussianRBF convention; K = 1 is one Gaussian of width cutoff at 0);
    envelope(d) = 0.5 * (cos(pi d / cutoff) + 1) for d < cutoff, else 0 (the SchNet/Behler cosine
                  cutoff). It and its first derivative vanish at d = cutoff, so messages and forces
                  go to zero continuously as a neighbour leaves the sphere (the force is continuous,
                  its derivative is not: fine for forces, not for Hessians).

Periodic structures use the minimum-image convention: r_ij -> r_ij - round(r_ij @ cell^-1) @ cell. Each
pair contributes at most one image, so this is exact only when cutoff <= half the smallest perpendicular
width of the cell (volume / |a x b| etc.): then no two images of an atom fit in the cutoff sphere, the
nearest one is found by rounding fractional coordinates even for triclinic cells, and no atom sees its
own images. `radius_message_passing` checks this and raises ValueError otherwise. The Triton path treats
the cell as a constant (no gradient, hence no stress); the reference's autograd does differentiate
through it. batch gets no gradient.

Public API:
    radius_message_passing(pos, x, batch, cutoff, filter_weight, cell=None)            dispatches (below)
    radius_message_passing_reference(pos, x, batch, cutoff, filter_weight, cell=None)  explicit edge list
    spatial_order(pos, batch, cutoff, cell=None) -> perm   atoms sorted by grid cell within each structure
    check_cutoff(cell, cutoff)                           raises unless the minimum image is exact
    edge_filter(d, cutoff, filter_weight) -> [..., F]   the filter W(d), also used by the reference
    gaussian_rbf(d, cutoff, n_rbf) -> [..., n_rbf]      the basis alone
    backend(x) -> "triton" | "reference"                which path `radius_message_passing` takes

Dispatch: CUDA tensors take the Triton kernels. CPU tensors take them too when TRITON_INTERPRET=1
(Triton's interpreter runs them with numpy; this is how the tests exercise the kernels without a GPU),
otherwise the reference. Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, that is
when triton and this module are imported, so set it before both.

Kernels. The edges never exist in memory: a program owns a block of BLOCK_I consecutive receiver atoms
i and loops over blocks of BLOCK_J sender atoms j, restricted to the atom range [start, end) of the
structures its receivers belong to (batch is sorted, so that range is contiguous: per-atom start/end
offsets come from a searchsorted on the host, without a device sync). For each (i-block, j-block) tile
it computes the pair vectors (minimum image when periodic), distances, the same-structure / i != j /
d < cutoff mask, the envelope and one Gaussian at a time; per basis function k the tile of
B_k(i, j) = envelope(d_ij) rbf_k(d_ij) is multiplied with x_j ([BLOCK_J, F]) by tl.dot, and
y_i += (B_k @ x_j) * filter_weight[k]. The accumulator lives in fp32 registers. A tile without a single
edge skips everything after the distances (see "Large structures").

Backward (one kernel, same loop, basis functions outer so per-k sums stay in registers):
    dx[i]      = sum_j W(d_ij) dy[j]                     (W is symmetric in i, j: the forward with dy as x)
    dW[k, f]   = sum_i dy[i, f] sum_j B_k(i, j) x[j, f]   (a reduction over all edges, see below)
    dpos[i]    = -sum_j (g_ij + g_ji) r_ij / d_ij,   g_ij = sum_k B_k'(d_ij) sum_f dy[i, f] w[k, f] x[j, f]
A program writes dx and dpos of its own receivers only, so there are no atomics on atoms. The program
handles both directed edges i->j and j->i of each pair through g_ij + g_ji (two tl.dot's), which is why
the sender loop alone suffices for the position gradient.

dfilter_weight is a sum over all edges into one small [K, F] tensor. Each program reduces its receivers'
share in fp32 registers and writes it to its own row of a [programs, K, F] fp32 buffer, and torch sums
the rows. Atomic adds into one [K, F] buffer would save that buffer (A / BLOCK_I * K * F floats: 80 MB
for 100k atoms, K = 50, F = 128, BLOCK_I = 32, i.e. K / BLOCK_I times one [A, F] activation) but every
program would contend for the same K * F addresses and the result would depend on the order of the
atomics, so training would not be bitwise reproducible. The per-program partials are deterministic.

Precision: the kernels compute in fp32 (tl.dot with input_precision="ieee": no TF32). fp16 / bf16
inputs are upcast to fp32 on the host and the results cast back (correct, but no memory saving); fp64
inputs are refused by the Triton path (use the reference). Atoms i != j at the same position (d = 0)
get a zero position gradient from the kernel (the direction is undefined; the reference gives NaN).

Large structures: a tile without any edge skips everything but its distances, and `spatial_order`
(applied by `radius_message_passing` from SORT_MIN_ATOMS atoms on, or on request) sorts the atoms of
each structure by grid cells of side >= cutoff, so that neighbours share blocks and most tiles of a big
structure are empty. The expensive part (K tl.dot's per tile) then scales roughly with the edges;
the distance test still visits all n^2 pairs of a structure of n atoms. Not done: true cell lists
(each receiver block looping over the sender blocks of its 27 neighbouring cells only, which would make
that part linear too). For molecules and small unit cells (QM9, MP-20, perov-5, carbon-24: at most a
few dozen atoms per structure) none of this matters. Block sizes and SORT_MIN_ATOMS are untuned, and
the kernels were validated only in Triton's interpreter (no GPU was available when this was written).
"""
import math
import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Block sizes: receivers x senders per tile. tl.dot needs every dimension >= 16. 32 x 32 keeps the
# backward's fp32 tiles ([BLOCK_I, F] accumulators for dx plus x_i, dy_i) in registers for F <= 128 on
# a GPU; untuned. In the interpreter the cost is per program and loop step, so larger tiles are cheaper.
# Every entry point takes block_i / block_j to override them (the tests use 16).
# ---------------------------------------------------------------------------------------------
GPU_BLOCKS = (32, 32)
INTERPRETER_BLOCKS = (32, 32)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # upcast to fp32 on the host
SORT_MIN_ATOMS = 4096  # radius_message_passing sorts atoms spatially from this batch size on (untuned)


# ---------------------------------------------------------------------------------------------
# Indexing: pos [A, 3], x / dy / y / dx [A, F] contiguous; filter_weight [K, F]; batch, start, end [A]
# int32 (start[a], end[a] = the atom range of a's structure); cell and its inverse [S, 9] fp32 (row-major
# 3 x 3, rows = lattice vectors). The feature axis is padded to BLOCK_F = next power of two >= 16.
# Atom offsets are int64 so that A * F may exceed 2^31.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_cell(Cell, b):
    """The nine entries of the [3, 3] matrices Cell[b] ([S, 9] row-major) for a vector of structures b."""
    base = b.to(tl.int64) * 9
    return (tl.load(Cell + base + 0), tl.load(Cell + base + 1), tl.load(Cell + base + 2),
            tl.load(Cell + base + 3), tl.load(Cell + base + 4), tl.load(Cell + base + 5),
            tl.load(Cell + base + 6), tl.load(Cell + base + 7), tl.load(Cell + base + 8))


@triton.jit
def _load_xyz(Pos, offs, mask):
    """x, y, z of the atoms at offs (pos is [A, 3] row-major; int64 offsets, A * 3 may overflow int32)."""
    offs64 = offs.to(tl.int64)
    return (tl.load(Pos + offs64 * 3 + 0, mask=mask, other=0.0), tl.load(Pos + offs64 * 3 + 1, mask=mask, other=0.0),
            tl.load(Pos + offs64 * 3 + 2, mask=mask, other=0.0))


@triton.jit
def _pairs(Pos, Batch, offs_i, i_in, px, py, pz, b_i, offs_j, hi, cutoff, c, ic, PERIODIC: tl.constexpr):
    """Geometry of one [BLOCK_I, BLOCK_J] tile: r_ij = pos_j - pos_i (minimum image when PERIODIC; c and
    ic are the receivers' cell and inverse cell entries, [BLOCK_I] each), d_ij, and the edge mask."""
    j_in = offs_j < hi
    qx, qy, qz = _load_xyz(Pos, offs_j, j_in)
    b_j = tl.load(Batch + offs_j, mask=j_in, other=-1)
    rx = qx[None, :] - px[:, None]
    ry = qy[None, :] - py[:, None]
    rz = qz[None, :] - pz[:, None]
    if PERIODIC:
        c00, c01, c02, c10, c11, c12, c20, c21, c22 = c
        i00, i01, i02, i10, i11, i12, i20, i21, i22 = ic
        # fractional coordinates f = r @ cell^-1, wrapped to [-1/2, 1/2), back to r = f @ cell
        fa = rx * i00[:, None] + ry * i10[:, None] + rz * i20[:, None]
        fb = rx * i01[:, None] + ry * i11[:, None] + rz * i21[:, None]
        fc = rx * i02[:, None] + ry * i12[:, None] + rz * i22[:, None]
        fa = fa - tl.floor(fa + 0.5)
        fb = fb - tl.floor(fb + 0.5)
        fc = fc - tl.floor(fc + 0.5)
        rx = fa * c00[:, None] + fb * c10[:, None] + fc * c20[:, None]
        ry = fa * c01[:, None] + fb * c11[:, None] + fc * c21[:, None]
        rz = fa * c02[:, None] + fb * c12[:, None] + fc * c22[:, None]
    d = tl.sqrt(rx * rx + ry * ry + rz * rz)
    edge = (i_in[:, None] & j_in[None, :] & (b_i[:, None] == b_j[None, :])
            & (offs_i[:, None] != offs_j[None, :]) & (d < cutoff))
    return rx, ry, rz, d, edge


@triton.jit
def _any(edge):
    """Whether a [BLOCK_I, BLOCK_J] mask has a True entry (a scalar, for a branch)."""
    return tl.sum(tl.sum(edge.to(tl.int32), 1), 0) > 0


@triton.jit
def _envelope(d, cutoff):
    """Cosine cutoff 0.5 (cos(pi d / c) + 1) and its derivative in d (the caller masks d >= cutoff)."""
    a = d * (3.141592653589793 / cutoff)
    return 0.5 * (tl.cos(a) + 1.0), -0.5 * (3.141592653589793 / cutoff) * tl.sin(a)


@triton.jit
def _receivers(Pos, Batch, Start, End, Cell, InvCell, A, BLOCK_I: tl.constexpr, PERIODIC: tl.constexpr):
    """This program's receiver block: indices, positions, structures, cells, and the sender range."""
    i0 = tl.program_id(0) * BLOCK_I
    offs_i = i0 + tl.arange(0, BLOCK_I)
    i_in = offs_i < A
    px, py, pz = _load_xyz(Pos, offs_i, i_in)
    b_i = tl.load(Batch + offs_i, mask=i_in, other=-2)
    # Senders: from the start of the first receiver's structure to the end of the last one's.
    lo = tl.load(Start + i0)
    hi = tl.load(End + tl.minimum(i0 + BLOCK_I, A) - 1)
    if PERIODIC:
        bc = tl.where(i_in, b_i, 0)
        c = _load_cell(Cell, bc)
        ic = _load_cell(InvCell, bc)
    else:
        c = (px, px, px, px, px, px, px, px, px)  # unused placeholders
        ic = c
    return offs_i, i_in, px, py, pz, b_i, lo, hi, c, ic


@triton.jit
def _fwd_kernel(Pos, X, Batch, Start, End, Cell, InvCell, Wf, Y, A, F, cutoff, mu_step, gamma,
                N_RBF: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_F: tl.constexpr,
                PERIODIC: tl.constexpr):
    """One program: y for BLOCK_I receivers, looping over the sender blocks of their structures."""
    offs_i, i_in, px, py, pz, b_i, lo, hi, c, ic = _receivers(
        Pos, Batch, Start, End, Cell, InvCell, A, BLOCK_I, PERIODIC)
    offs_f = tl.arange(0, BLOCK_F)
    f_in = offs_f < F
    acc = tl.zeros([BLOCK_I, BLOCK_F], tl.float32)
    for j0 in range(lo, hi, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        rx, ry, rz, d, edge = _pairs(Pos, Batch, offs_i, i_in, px, py, pz, b_i, offs_j, hi, cutoff,
                                     c, ic, PERIODIC)
        if _any(edge):  # tiles without edges cost only their distances
            env, _ = _envelope(d, cutoff)
            env = tl.where(edge, env, 0.0)
            xj = tl.load(X + offs_j.to(tl.int64)[:, None] * F + offs_f[None, :],
                         mask=(offs_j < hi)[:, None] & f_in[None, :], other=0.0)
            for k in range(N_RBF):
                t = d - k * mu_step
                bk = env * tl.exp(-gamma * t * t)  # [BLOCK_I, BLOCK_J], zero off the edges
                wk = tl.load(Wf + k * F + offs_f, mask=f_in, other=0.0)
                acc += tl.dot(bk, xj, input_precision="ieee") * wk[None, :]
    tl.store(Y + offs_i.to(tl.int64)[:, None] * F + offs_f[None, :], acc,
             mask=i_in[:, None] & f_in[None, :])


@triton.jit
def _bwd_kernel(Pos, X, DY, Batch, Start, End, Cell, InvCell, Wf, DX, DPos, DWPart, A, F, cutoff,
                mu_step, gamma, N_RBF: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
                BLOCK_F: tl.constexpr, PERIODIC: tl.constexpr):
    """One program: dx and dpos of BLOCK_I atoms, and their share of dfilter_weight (see module doc)."""
    offs_i, i_in, px, py, pz, b_i, lo, hi, c, ic = _receivers(
        Pos, Batch, Start, End, Cell, InvCell, A, BLOCK_I, PERIODIC)
    offs_f = tl.arange(0, BLOCK_F)
    f_in = offs_f < F
    row_i = offs_i.to(tl.int64)[:, None] * F + offs_f[None, :]
    mask_i = i_in[:, None] & f_in[None, :]
    xi = tl.load(X + row_i, mask=mask_i, other=0.0)
    dyi = tl.load(DY + row_i, mask=mask_i, other=0.0)
    dx = tl.zeros([BLOCK_I, BLOCK_F], tl.float32)
    gx = tl.zeros([BLOCK_I], tl.float32)
    gy = tl.zeros([BLOCK_I], tl.float32)
    gz = tl.zeros([BLOCK_I], tl.float32)
    pid = tl.program_id(0).to(tl.int64)
    for k in range(N_RBF):
        mu = k * mu_step
        wk = tl.load(Wf + k * F + offs_f, mask=f_in, other=0.0)
        a_i = dyi * wk[None, :]  # pairs with x_j: g_ij
        b_i2 = xi * wk[None, :]  # pairs with dy_j: g_ji
        t_dx = tl.zeros([BLOCK_I, BLOCK_F], tl.float32)  # sum_j B_k dy_j
        t_dw = tl.zeros([BLOCK_I, BLOCK_F], tl.float32)  # sum_j B_k x_j
        for j0 in range(lo, hi, BLOCK_J):
            offs_j = j0 + tl.arange(0, BLOCK_J)
            rx, ry, rz, d, edge = _pairs(Pos, Batch, offs_i, i_in, px, py, pz, b_i, offs_j, hi, cutoff,
                                         c, ic, PERIODIC)
            if _any(edge):
                env, denv = _envelope(d, cutoff)
                t = d - mu
                e = tl.exp(-gamma * t * t)
                bk = tl.where(edge, env * e, 0.0)
                dbk = tl.where(edge, (denv - 2.0 * gamma * t * env) * e, 0.0)  # d B_k / d d
                row_j = offs_j.to(tl.int64)[:, None] * F + offs_f[None, :]
                mask_j = (offs_j < hi)[:, None] & f_in[None, :]
                xj = tl.load(X + row_j, mask=mask_j, other=0.0)
                dyj = tl.load(DY + row_j, mask=mask_j, other=0.0)
                t_dx += tl.dot(bk, dyj, input_precision="ieee")
                t_dw += tl.dot(bk, xj, input_precision="ieee")
                h = (tl.dot(a_i, tl.trans(xj), input_precision="ieee")
                     + tl.dot(b_i2, tl.trans(dyj), input_precision="ieee"))  # [BLOCK_I, BLOCK_J]
                g = dbk * h / tl.where(d > 0.0, d, 1.0)  # (g_ij + g_ji) / d_ij; 0 off the edges and at d = 0
                g = tl.where(d > 0.0, g, 0.0)
                gx -= tl.sum(g * rx, 1)
                gy -= tl.sum(g * ry, 1)
                gz -= tl.sum(g * rz, 1)
        dx += t_dx * wk[None, :]
        dw = tl.sum(dyi * t_dw, 0)  # [BLOCK_F]; padding receivers have dy = 0
        tl.store(DWPart + (pid * N_RBF + k) * F + offs_f, dw, mask=f_in)
    tl.store(DX + row_i, dx, mask=mask_i)
    offs_i64 = offs_i.to(tl.int64)
    tl.store(DPos + offs_i64 * 3 + 0, gx, mask=i_in)
    tl.store(DPos + offs_i64 * 3 + 1, gy, mask=i_in)
    tl.store(DPos + offs_i64 * 3 + 2, gz, mask=i_in)


# ---------------------------------------------------------------------------------------------
# Host side: checks, launches, autograd, dispatch.
# ---------------------------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when this module's kernels, and the @triton.jit helpers of triton.language they call
    (tl.zeros, tl.sum, ...), were decorated under TRITON_INTERPRET=1, so that numpy can run them.
    Triton decides when it decorates, at import: of triton itself, and of this module."""
    return all(type(f).__name__ == "InterpretedFunction" for f in (_fwd_kernel, tl.zeros))


def _rbf_params(cutoff: float, n_rbf: int):
    """Centre spacing and exponent factor gamma = 1 / (2 sigma^2) of the Gaussians (sigma = spacing)."""
    step = cutoff / max(n_rbf - 1, 1)
    return step, 0.5 / step ** 2


def gaussian_rbf(d, cutoff: float, n_rbf: int):
    """[...] distances -> [..., n_rbf] Gaussians exp(-(d - mu_k)^2 / (2 sigma^2)), mu_k = k sigma,
    sigma = cutoff / max(n_rbf - 1, 1): centres evenly spaced on [0, cutoff], width = spacing."""
    step, gamma = _rbf_params(cutoff, n_rbf)
    mu = torch.arange(n_rbf, device=d.device, dtype=d.dtype) * step
    return torch.exp(-gamma * (d[..., None] - mu) ** 2)


def cosine_envelope(d, cutoff: float):
    """0.5 (cos(pi d / cutoff) + 1) for d < cutoff, 0 beyond: value and slope vanish at the cutoff."""
    return torch.where(d < cutoff, 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0), torch.zeros_like(d))


def edge_filter(d, cutoff: float, filter_weight):
    """The continuous filter W(d) = cosine_envelope(d) * (gaussian_rbf(d) @ filter_weight).
    d [...] distances, filter_weight [n_rbf, F] -> [..., F]."""
    rbf = gaussian_rbf(d, cutoff, filter_weight.shape[0])
    return cosine_envelope(d, cutoff)[..., None] * (rbf @ filter_weight)


def _minimum_image(r, cell, inv_cell):
    """r [E, 3] with cell, inv_cell [E, 3, 3] (rows = lattice vectors) -> the image of r with fractional
    coordinates in [-1/2, 1/2). Same rounding as the kernels (floor(f + 1/2))."""
    frac = torch.einsum("eb,eba->ea", r, inv_cell)
    frac = frac - torch.floor(frac + 0.5)
    return torch.einsum("ea,eax->ex", frac, cell)


def _check(pos, x, batch, cutoff, filter_weight, cell):
    A = pos.shape[0]
    if pos.dim() != 2 or pos.shape[1] != 3:
        raise ValueError(f"pos must be [A, 3]; got {tuple(pos.shape)}")
    if x.dim() != 2 or x.shape[0] != A:
        raise ValueError(f"x must be [A, F] with A = {A}; got {tuple(x.shape)}")
    if batch.shape != (A,) or batch.is_floating_point():
        raise ValueError(f"batch must be an integer tensor [A] = [{A}]; got {batch.dtype} {tuple(batch.shape)}")
    if filter_weight.dim() != 2 or filter_weight.shape[1] != x.shape[1] or filter_weight.shape[0] < 1:
        raise ValueError(f"filter_weight must be [n_rbf, F] with F = {x.shape[1]}; got {tuple(filter_weight.shape)}")
    if not cutoff > 0:
        raise ValueError(f"cutoff must be positive; got {cutoff}")
    if A > 1 and bool((batch[1:] < batch[:-1]).any()):
        raise ValueError("batch must be sorted ascending (atoms of one structure contiguous)")
    if cell is not None:
        if cell.dim() != 3 or cell.shape[1:] != (3, 3):
            raise ValueError(f"cell must be [S, 3, 3] (rows = lattice vectors); got {tuple(cell.shape)}")
        if A > 0 and int(batch.max()) >= cell.shape[0]:
            raise ValueError(f"cell has {cell.shape[0]} structures but batch goes up to {int(batch.max())}")
        check_cutoff(cell, cutoff)


def check_cutoff(cell, cutoff: float):
    """Raise ValueError unless cutoff <= half the smallest perpendicular width of every cell (the
    condition under which the minimum image gives every neighbour within the cutoff exactly once)."""
    c = cell.detach().double()
    width = _perpendicular_widths(c).min(-1).values  # [S]
    if c.shape[0] and float(width.min()) < 2 * cutoff:
        s = int(width.argmin())
        raise ValueError(f"cutoff {cutoff} exceeds half the smallest perpendicular cell width "
                         f"({float(width[s]):.4g} for structure {s}): the minimum-image convention would "
                         f"miss neighbour images; use a supercell or a smaller cutoff")


def _segments(batch):
    """Per atom a: start[a], end[a] = the range of atoms of a's structure (batch sorted), int32."""
    b = batch.contiguous()
    start = torch.searchsorted(b, b, right=False).to(torch.int32)
    end = torch.searchsorted(b, b, right=True).to(torch.int32)
    return b.to(torch.int32), start, end


def _perpendicular_widths(cell):
    """[S, 3, 3] lattices (rows a, b, c) -> [S, 3] distances between opposite faces: the spacing of the
    planes of constant fractional coordinate along a, b, c (volume / |b x c| etc.)."""
    vol = torch.linalg.det(cell).abs()
    areas = torch.stack([torch.linalg.cross(cell[:, 1], cell[:, 2]).norm(dim=-1),
                         torch.linalg.cross(cell[:, 2], cell[:, 0]).norm(dim=-1),
                         torch.linalg.cross(cell[:, 0], cell[:, 1]).norm(dim=-1)], -1)
    return vol[:, None] / areas


def spatial_order(pos, batch, cutoff: float, cell=None):
    """A permutation of the atoms that keeps structures contiguous and in order, and within a structure
    sorts atoms by the grid cell (of side >= cutoff) they fall in, z-major: atoms that are neighbours
    land close together in the order, so that most (receiver block, sender block) tiles of a large
    structure hold no edge and the kernels skip their arithmetic. Periodic structures are binned in
    fractional coordinates, wrapped into the cell. Pure torch, no device sync."""
    b = batch.long()
    p = pos.detach().double()
    if p.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=pos.device)
    if cell is None:
        q = torch.floor((p - p.min(0).values) / cutoff)
    else:
        c = cell.detach().double()
        frac = torch.einsum("ax,axj->aj", p, torch.linalg.inv(c)[b])
        n = torch.floor(_perpendicular_widths(c) / cutoff).clamp_min(1)[b]  # bins per axis
        q = torch.floor((frac - torch.floor(frac)) * n)
    q = q.clamp(0, 2 ** 13 - 1).long()
    key = ((b * 2 ** 13 + q[:, 2]) * 2 ** 13 + q[:, 1]) * 2 ** 13 + q[:, 0]
    return torch.argsort(key, stable=True)


def _launch_config(F, on_gpu, block_i=None, block_j=None) -> dict:
    """Block constexprs and num_warps of both kernels for F features (N_RBF and PERIODIC come from the
    inputs). Takes no tensor so that kernels/bench.py compile can build the same configurations ahead
    of time, without a GPU."""
    if block_i is None or block_j is None:
        di, dj = GPU_BLOCKS if on_gpu else INTERPRETER_BLOCKS
        block_i, block_j = block_i or di, block_j or dj
    for block in (block_i, block_j):
        if block < 16 or block & (block - 1):
            raise ValueError(f"block sizes must be powers of two >= 16 (tl.dot's minimum); got {block}")
    block_f = max(16, triton.next_power_of_2(F))
    return dict(BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_F=block_f, num_warps=4 if block_f <= 64 else 8)


class RadiusMessagePassing(torch.autograd.Function):
    """Triton forward and backward, in fp32. Gradients for pos, x and filter_weight; batch and cell get
    none. Call as RadiusMessagePassing.apply(pos, x, batch, cutoff, filter_weight, cell, block_i, block_j);
    inputs are assumed checked (`radius_message_passing` does it)."""

    @staticmethod
    def forward(ctx, pos, x, batch, cutoff, filter_weight, cell=None, block_i=None, block_j=None):
        out_dtype = x.dtype
        pos, x, w = (t.detach().float().contiguous() for t in (pos, x, filter_weight))
        b, start, end = _segments(batch)
        A, F = x.shape
        periodic = cell is not None
        if periodic:
            cell64 = cell.detach().double()
            cells = cell64.float().reshape(-1, 9).contiguous()
            inv = torch.linalg.inv(cell64).float().reshape(-1, 9).contiguous()
        else:
            cells = inv = torch.zeros(1, 9, device=x.device)
        meta = _launch_config(F, x.is_cuda, block_i, block_j)
        step, gamma = _rbf_params(float(cutoff), w.shape[0])
        y = torch.zeros_like(x)
        if A > 0:
            _fwd_kernel[(triton.cdiv(A, meta["BLOCK_I"]),)](
                pos, x, b, start, end, cells, inv, w, y, A, F, float(cutoff), step, gamma,
                N_RBF=w.shape[0], PERIODIC=periodic, **meta)
        ctx.save_for_backward(pos, x, w, b, start, end, cells, inv)
        ctx.meta = (float(cutoff), periodic, block_i, block_j)
        return y.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # no double backward: a clear error instead of a wrong one
    def backward(ctx, dy):
        pos, x, w, b, start, end, cells, inv = ctx.saved_tensors
        cutoff, periodic, block_i, block_j = ctx.meta
        dy = dy.float().contiguous()
        A, F = x.shape
        K = w.shape[0]
        meta = _launch_config(F, x.is_cuda, block_i, block_j)
        step, gamma = _rbf_params(cutoff, K)
        n_prog = triton.cdiv(A, meta["BLOCK_I"])
        dx = torch.zeros_like(x)
        dpos = torch.zeros_like(pos)
        dw_part = torch.empty((n_prog, K, F), device=x.device, dtype=torch.float32)  # every entry written
        if A > 0:
            _bwd_kernel[(n_prog,)](
                pos, x, dy, b, start, end, cells, inv, w, dx, dpos, dw_part, A, F, cutoff, step, gamma,
                N_RBF=K, PERIODIC=periodic, **meta)
        dw = dw_part.sum(0)
        need = ctx.needs_input_grad  # autograd casts each gradient to its input's dtype
        return (dpos if need[0] else None, dx if need[1] else None, None, None,
                dw if need[4] else None, None, None, None)


def radius_message_passing_reference(pos, x, batch, cutoff: float, filter_weight, cell=None):
    """Plain PyTorch, same contract as `radius_message_passing`: builds the explicit directed edge list
    (all ordered pairs i != j of each structure, minimum image with cell, filtered by the cutoff),
    evaluates edge_filter per edge and scatters with index_add_. O(sum n_s^2) memory; autograd gives
    the gradients (NaN for pos if two atoms of a structure coincide)."""
    A = pos.shape[0]
    batch = batch.long()
    counts = torch.bincount(batch, minlength=int(batch.max()) + 1 if A else 0)
    first = torch.cumsum(counts, 0) - counts  # first atom of each structure
    n = counts[batch]  # [A] partners (incl. itself) per atom
    i = torch.repeat_interleave(torch.arange(A, device=pos.device), n)
    local = torch.arange(i.numel(), device=pos.device) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    j = first[batch[i]] + local
    keep = i != j
    i, j = i[keep], j[keep]
    r = pos[j] - pos[i]
    if cell is not None:
        cell = cell.to(pos.dtype)
        r = _minimum_image(r, cell[batch[i]], torch.linalg.inv(cell)[batch[i]])
    d = r.norm(dim=-1)
    keep = d < cutoff
    i, j, d = i[keep], j[keep], d[keep]
    msg = x[j] * edge_filter(d, cutoff, filter_weight.to(d.dtype)).to(x.dtype)  # the filter at pos's precision
    return torch.zeros_like(x).index_add_(0, i, msg)


def backend(x) -> str:
    """Which implementation `radius_message_passing` uses for x: "triton" or "reference"."""
    if x.is_cuda:
        return "triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        if not _interpreted():
            raise RuntimeError("TRITON_INTERPRET=1 was set after triton or kernels.radius_graph was "
                               "imported; Triton picks the interpreter when it decorates a function, at import. "
                               "Set it before importing either, or unset it to use the PyTorch reference.")
        return "triton"
    return "reference"


def radius_message_passing(pos, x, batch, cutoff: float, filter_weight, cell=None, *,
                           block_i=None, block_j=None, sort_atoms=None):
    """Continuous-filter convolution over the radius graph; shapes and formula in the module docstring.

    pos [A, 3]; x [A, F]; batch [A] int, sorted; filter_weight [n_rbf, F]; cell None or [S, 3, 3]
    -> y [A, F]. block_i / block_j override the Triton tile sizes (receivers / senders per block;
    powers of two >= 16). sort_atoms (Triton path only): run the kernels on the atoms permuted by
    `spatial_order` and permute y back (same result up to summation order; worth it for structures of
    hundreds of atoms and more); None = when A >= SORT_MIN_ATOMS. Raises ValueError on bad shapes,
    unsorted batch, or a cutoff above half the smallest perpendicular cell width (these checks read
    values back from the device: one sync per call, two with a cell).
    """
    _check(pos, x, batch, cutoff, filter_weight, cell)
    if backend(x) == "triton":
        dtypes = {pos.dtype, x.dtype, filter_weight.dtype}
        if not dtypes <= {torch.float32, *HALF_DTYPES}:
            raise ValueError("the Triton kernels take fp32 (or fp16/bf16, upcast) inputs; "
                             f"got {sorted(map(str, dtypes))}")
        if sort_atoms is None:
            sort_atoms = pos.shape[0] >= SORT_MIN_ATOMS
        if not sort_atoms:
            return RadiusMessagePassing.apply(pos, x, batch, float(cutoff), filter_weight, cell, block_i, block_j)
        perm = spatial_order(pos, batch, cutoff, cell)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        y = RadiusMessagePassing.apply(pos[perm], x[perm], batch[perm], float(cutoff), filter_weight, cell,
                                       block_i, block_j)
        return y[inv]
    return radius_message_passing_reference(pos, x, batch, cutoff, filter_weight, cell)
