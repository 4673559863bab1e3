"""A compact student force field (SchNet-style, or PaiNN-style and equivariant) and its ASE calculator.

Energy is a sum of atomic energies on top of per-element reference energies, forces are minus its gradient
(so the field is conservative), and the stress of a periodic structure is the derivative of the energy with
respect to a strain of the cell, divided by the volume (ASE's sign: stress = (1/V) dE/d(strain), so a
compressed crystal has negative stress).

    E = sum_i [ e0(Z_i) + scale * MLP(h_i) ] (+ E_rep),   h_i after n_layers interactions over the neighbours within the cutoff
    schnet: h_i += MLP( sum_j (W1 h_j) * filter(d_ij) )
    painn (Schuett et al. 2021): each atom also carries vector features v_i [3, F], 0 at the start; a message adds
    sum_j phi_s(h_j) W_s(d_ij) to h_i and sum_j [v_j phi_vv(h_j) W_vv(d_ij) + r_ij / d_ij phi_vs(h_j) W_vs(d_ij)] to v_i,
    an update mixes each atom's own scalars and vectors through |V v_i| and <U v_i, V v_i>. Directions enter the
    features, so the model sees angles, which a distance-only SchNet sees only through several layers.

The filter is kernels.radius_graph.edge_filter (Gaussian basis times learned weights times a cosine cutoff
envelope), the form the fused Triton kernel computes. On CUDA, energy and forces without stress go through
the kernel (ForceField.fused_kernel_applies); otherwise the sum runs over an explicit edge list that includes
every periodic image within the cutoff, which small crystal cells need (the kernel's minimum image covers only
cutoffs up to half the cell's width), and training always takes it (the loss differentiates the forces, and the
kernel has no double backward; the kernel is SchNet's layer, so PaiNN always takes the edge list). Why SchNet:
the smallest model whose layers have the kernel's form, invariant by construction, and cheap per atom, which is
what a student is for; why PaiNN beside it: equivariant messages buy accuracy per parameter (`--student`).

Batches are flat: numbers [A] atomic numbers, pos [A, 3], batch [A] structure index (sorted), cell [S, 3, 3]
(rows are lattice vectors; ignored for molecules), pbc [S] bool (a structure is periodic in all three
directions or in none).

E_rep (`repulsion` > 0, off by default): the ZBL screened nuclear repulsion of every pair closer than `repulsion`
times the sum of the two atoms' covalent radii, switched off smoothly at that distance. Training structures hold
no pair that close (at 0.6 not one of perov-5's or carbon-24's 11,634 test and validation crystals does; their
closest pair is a Cs-N at 0.667 of the sum), so the learnt part is unchanged where it was trained; the term only
keeps atoms from overlapping in a relaxation or a trajectory. It does not remove a spurious basin of the learnt
part just outside its reach, which only data can (models/EXPERIMENTS.md, "The shipped students").
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ase.data import covalent_radii

from kernels.radius_graph import backend, check_cutoff, cosine_envelope, gaussian_rbf, radius_message_passing


@dataclass
class ForceFieldConfig:
    elements: list[int] = field(default_factory=lambda: [1, 6, 7, 8, 9])  # atomic numbers the model knows
    hidden: int = 64
    n_layers: int = 3
    cutoff: float = 5.0  # A
    n_rbf: int = 20
    family: str = "schnet"  # the layers: "schnet" (invariant, continuous filters) or "painn" (equivariant vector features)
    repulsion: float = 0.0  # ZBL repulsion below this fraction of the covalent-radii sum (E_rep above); 0: none

    def __post_init__(self):
        if self.family not in LAYERS:
            raise ValueError(f"unknown student family {self.family!r}; known: {sorted(LAYERS)}")
        if not 0 <= self.repulsion <= 1:
            raise ValueError(f"repulsion {self.repulsion}: a fraction of the covalent-radii sum in [0, 1]")
        # the repulsion's pairs come from the layers' neighbour list, so its reach must lie within the cutoff
        reach = self.repulsion * 2 * max(covalent_radii[z] for z in self.elements)
        if reach > self.cutoff:
            raise ValueError(f"repulsion {self.repulsion} reaches {reach:.2f} A for these elements, beyond the cutoff {self.cutoff} A")


# ZBL's universal screening function (Ziegler, Biersack and Littmark 1985): phi(x) = sum_k c_k exp(-d_k x), x = r / a,
# a = 0.46850 A / (Z_i^0.23 + Z_j^0.23); E = Z_i Z_j e^2 / (4 pi eps0 r) phi(r / a)
ZBL_C = (0.18175, 0.50986, 0.28022, 0.02817)
ZBL_D = (3.19980, 0.94229, 0.40290, 0.20162)
COULOMB = 14.399645  # e^2 / (4 pi eps0), eV A


def zbl_repulsion(z_i: torch.Tensor, z_j: torch.Tensor, d: torch.Tensor, r_off: torch.Tensor) -> torch.Tensor:
    """Energies [E] (eV) of pairs at distances d [E] (A) with atomic numbers z_i, z_j [E]: ZBL times a cosine
    switch, 1 at d = 0 and 0 with zero slope at d >= r_off [E], so forces stay continuous."""
    zi, zj = z_i.to(d.dtype), z_j.to(d.dtype)
    x = d * (zi ** 0.23 + zj ** 0.23) / 0.46850
    phi = sum(c * torch.exp(-k * x) for c, k in zip(ZBL_C, ZBL_D))
    switch = torch.where(d < r_off, 0.5 * (1 + torch.cos(torch.pi * d / r_off)), torch.zeros_like(d))
    return COULOMB * zi * zj / d.clamp(min=1e-6) * phi * switch


def edge_vectors(pos, batch, cell, i, j, shift) -> torch.Tensor:
    """The vectors [E, 3] of neighbour_edges' pairs, pos[j] - pos[i] + shift @ cell, differentiable in pos and cell."""
    return pos[j] - pos[i] + torch.einsum("ea,eab->eb", shift, cell[batch[i]]) if len(i) else pos[:0]


def neighbour_edges(pos: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float):
    """Every pair (i, j, image) closer than cutoff, as (i [E], j [E], shift [E, 3] integer lattice offsets).
    The vector of an edge is pos[j] - pos[i] + shift @ cell[batch[i]]. Found without gradients; the caller
    recomputes the vectors from pos and cell, so forces and stress flow through them. `batch` is sorted.
    Crystals get every image within the cutoff, which small cells need (the fused kernel's minimum image covers
    only cutoffs up to half the cell's width); atoms need not lie inside the cell."""
    with torch.no_grad():
        counts = torch.bincount(batch, minlength=len(pbc))
        first = torch.cumsum(counts, 0) - counts
        # Molecules, all at once: every ordered pair of atoms of the same molecule, then the cutoff.
        atoms = torch.nonzero(~pbc[batch]).flatten()
        n = counts[batch[atoms]]
        i = torch.repeat_interleave(atoms, n)
        start = torch.cumsum(n, 0) - n
        j = first[batch[i]] + torch.arange(len(i), device=pos.device) - torch.repeat_interleave(start, n)
        keep = (i != j) & ((pos[j] - pos[i]).norm(dim=-1) < cutoff)
        edges_i, edges_j = [i[keep]], [j[keep]]
        shifts = [torch.zeros(int(keep.sum()), 3, dtype=torch.float64, device=pos.device)]
        for s in torch.nonzero(pbc).flatten().tolist():  # crystals one at a time, with their periodic images
            idx = torch.arange(int(first[s]), int(first[s] + counts[s]), device=pos.device)
            c, p = cell[s].double(), pos[idx].double()
            # Each pair starts from its nearest image in fractional coordinates (a difference within [-1/2, 1/2]
            # along every lattice vector). A vector shorter than the cutoff spans at most cutoff / width of the cell
            # along each lattice vector, where the width along a is the cell's thickness perpendicular to the b-c
            # face (volume / |b x c|); so images up to floor(cutoff / width + 1/2) cells beyond the nearest suffice.
            nearest = -torch.round((p[None, :] - p[:, None]) @ torch.linalg.inv(c))  # [n, n, 3]
            widths = torch.linalg.det(c).abs() / torch.linalg.norm(torch.cross(c[[1, 2, 0]], c[[2, 0, 1]], dim=-1), dim=-1)
            reach = [int(cutoff / float(w) + 0.5) for w in widths]
            grid = torch.meshgrid(*[torch.arange(-r, r + 1, dtype=torch.float64, device=pos.device) for r in reach], indexing="ij")
            image = torch.stack([g.flatten() for g in grid], dim=-1)  # [K, 3]
            shift = nearest[:, :, None, :] + image[None, None]  # [n, n, K, 3]
            r = p[None, :, None, :] - p[:, None, None, :] + shift @ c
            self_pair = torch.eye(len(idx), dtype=torch.bool, device=pos.device)[:, :, None] & (shift == 0).all(-1)
            a, b, k = torch.nonzero((r.norm(dim=-1) < cutoff) & ~self_pair, as_tuple=True)
            edges_i.append(idx[a])
            edges_j.append(idx[b])
            shifts.append(shift[a, b, k])
    return torch.cat(edges_i), torch.cat(edges_j), torch.cat(shifts).to(pos.dtype)


def fit_reference_energies(numbers: list[np.ndarray], energies: np.ndarray, elements: list[int]) -> np.ndarray:
    """Per-element energies e0 [len(elements)] minimising sum_s (E_s - sum_i e0(Z_i))^2 (least squares on the
    composition counts); what remains for the network is the interaction energy. An element absent from the
    labels gets 0."""
    index = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(numbers), len(elements)))
    for s, z in enumerate(numbers):
        for zi, n in zip(*np.unique(np.asarray(z), return_counts=True)):
            counts[s, index[int(zi)]] = n
    e0, *_ = np.linalg.lstsq(counts, np.asarray(energies, dtype=np.float64), rcond=None)
    return e0


class Interaction(nn.Module):
    """SchNet's layer. A layer maps the atoms' state (a tuple whose first item is h [A, F]) over the edges i <- j."""
    USES_DIRECTIONS = False  # distances only: the edges' unit vectors are not computed for it

    def __init__(self, hidden: int, n_rbf: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.project = nn.Linear(hidden, hidden, bias=False)
        self.filter_weight = nn.Parameter(torch.randn(n_rbf, hidden) / n_rbf ** 0.5)
        self.update = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    @staticmethod
    def start(h):
        return (h,)

    def forward(self, state, i, j, basis, unit):
        """state (h [A, F],); edges i <- j with basis [E, n_rbf] = cosine_envelope(d) * gaussian_rbf(d), shared by the
        layers: basis @ filter_weight is kernels.radius_graph.edge_filter(d), computed once per call instead of per
        layer. unit: the edges' directions, unused (SchNet sees distances only)."""
        h, = state
        messages = self.project(h)[j] * (basis @ self.filter_weight)  # [E, F]
        return (h + self.update(torch.zeros_like(h).index_add(0, i, messages)),)

    def fused(self, h, pos, batch, cell):
        """The same layer through the fused Triton kernel, which finds the neighbours itself (minimum image)."""
        return h + self.update(radius_message_passing(pos, self.project(h), batch, self.cutoff, self.filter_weight, cell))


class PaiNNInteraction(nn.Module):
    """PaiNN's message and update blocks: state (h [A, F], v [A, 3, F]), rotation-equivariant in v, invariant in h."""
    USES_DIRECTIONS = True

    def __init__(self, hidden: int, n_rbf: int, cutoff: float):
        super().__init__()
        self.hidden = hidden
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.filter_weight = nn.Parameter(torch.randn(n_rbf, 3 * hidden) / n_rbf ** 0.5)
        self.mix_u = nn.Linear(hidden, hidden, bias=False)  # acts on v's feature axis: equivariant
        self.mix_v = nn.Linear(hidden, hidden, bias=False)
        self.update = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    @staticmethod
    def start(h):
        return h, h.new_zeros(len(h), 3, h.shape[1])

    def forward(self, state, i, j, basis, unit):
        """unit [E, 3]: the direction of each edge i <- j (r_ij / d_ij)."""
        h, v = state
        ss, vv, vs = (self.phi(h)[j] * (basis @ self.filter_weight)).split(self.hidden, dim=-1)  # [E, F] each
        h = h + torch.zeros_like(h).index_add(0, i, ss)
        v = v + torch.zeros_like(v).index_add(0, i, v[j] * vv[:, None, :] + unit[:, :, None] * vs[:, None, :])
        u, w = self.mix_u(v), self.mix_v(v)  # [A, 3, F]
        norm = (w.pow(2).sum(1) + 1e-8).sqrt()  # the floor keeps the gradient, and the force's own gradient, finite at 0
        a_vv, a_sv, a_ss = self.update(torch.cat([h, norm], dim=-1)).split(self.hidden, dim=-1)
        return h + a_sv * (u * w).sum(1) + a_ss, v + a_vv[:, None, :] * u


LAYERS = {"schnet": Interaction, "painn": PaiNNInteraction}


class ForceField(nn.Module):
    Config = ForceFieldConfig

    def __init__(self, config: ForceFieldConfig):
        super().__init__()
        self.config = config
        lut = torch.full((119,), -1, dtype=torch.long)
        lut[torch.tensor(config.elements)] = torch.arange(len(config.elements))
        self.register_buffer("type_of", lut, persistent=False)
        self.embed = nn.Embedding(len(config.elements), config.hidden)
        self.layers = nn.ModuleList(LAYERS[config.family](config.hidden, config.n_rbf, config.cutoff) for _ in range(config.n_layers))
        self.readout = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1))
        # e0 per element and the scale of the learned part: fitted from the labels, saved with the weights
        self.register_buffer("reference_energy", torch.zeros(len(config.elements), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))
        self.register_buffer("covalent_radius", torch.tensor(covalent_radii, dtype=torch.float64), persistent=False)
        self._compiled = None  # compile_inference's layers

    def types(self, numbers: torch.Tensor) -> torch.Tensor:
        t = self.type_of[numbers]
        if (t < 0).any():
            unknown = sorted(set(numbers[t < 0].tolist()))
            raise ValueError(f"elements {unknown} are not in the force field's elements {self.config.elements}")
        return t

    def fused_kernel_applies(self, pos, cell, pbc) -> bool:
        """Whether the fused kernel can run the layers: a CUDA float32 batch (or Triton's interpreter) of molecules
        only, or of crystals only whose every cell is at least twice the cutoff wide (the minimum image then
        finds each neighbour once)."""
        if self.config.family != "schnet" or pos.dtype != torch.float32 or not len(pbc) or backend(pos) != "triton":
            return False
        if not pbc.any():
            return True
        if not pbc.all():
            return False
        try:
            check_cutoff(cell, self.config.cutoff)
        except ValueError:
            return False
        return True

    def energy(self, numbers, pos, batch, cell, pbc, edges=None, fused: bool = False,
               compiled: bool = False) -> torch.Tensor:
        """Energies [S] (eV, float64) of the structures of a flat batch (see the module docstring). fused: run the
        layers through kernels/radius_graph.py (see fused_kernel_applies; its backward gives forces but has no
        double backward, so training, which differentiates the forces, takes the edge-list path). compiled: through
        the layers compile_inference compiled, if it was called (no double backward either)."""
        n_struct = int(batch.max()) + 1 if len(batch) else 0
        t = self.types(numbers)
        h = self.embed(t)
        if fused:
            for layer in self.layers:
                h = layer.fused(h, pos, batch, cell if bool(pbc.any()) else None)
            energy = self._readout(h, t, batch, n_struct)
            if not self.config.repulsion:
                return energy
            return energy + self._repulsion(numbers, pos, batch, cell, *neighbour_edges(pos, batch, cell, pbc, self.config.cutoff), n_struct)
        i, j, shift = neighbour_edges(pos, batch, cell, pbc, self.config.cutoff) if edges is None else edges
        # no pair within the cutoff (isolated atoms): the eager layers, so the compiled graph never sees no edges
        layers = self._compiled if compiled and self._compiled is not None and len(i) else self._edge_energy
        energy = layers(h, t, pos, batch, cell, i, j, shift, n_struct)
        if not self.config.repulsion:
            return energy
        return energy + self._repulsion(numbers, pos, batch, cell, i, j, shift, n_struct)

    def _repulsion(self, numbers, pos, batch, cell, i, j, shift, n_struct: int) -> torch.Tensor:
        """E_rep [S] (eV, float64) over the edge list, which holds each pair twice (i -> j and j -> i)."""
        d = edge_vectors(pos, batch, cell, i, j, shift).norm(dim=-1).double()
        r_off = self.config.repulsion * (self.covalent_radius[numbers[i]] + self.covalent_radius[numbers[j]])
        pair = 0.5 * zbl_repulsion(numbers[i], numbers[j], d, r_off)
        return torch.zeros(n_struct, dtype=torch.float64, device=pos.device).index_add(0, batch[i], pair)

    def _edge_energy(self, h, t, pos, batch, cell, i, j, shift, n_struct: int) -> torch.Tensor:
        """The layers over the edge list and the readout: what compile_inference compiles."""
        vec = edge_vectors(pos, batch, cell, i, j, shift)
        d = vec.norm(dim=-1)
        basis = cosine_envelope(d, self.config.cutoff)[:, None] * gaussian_rbf(d, self.config.cutoff, self.config.n_rbf)
        layer_class = LAYERS[self.config.family]
        state = layer_class.start(h)
        unit = vec / d[:, None] if layer_class.USES_DIRECTIONS else None  # SchNet's hot path does without them
        for layer in self.layers:
            state = layer(state, i, j, basis, unit)
        return self._readout(state[0], t, batch, n_struct)

    def _readout(self, h, t, batch, n_struct: int) -> torch.Tensor:
        atomic = self.readout(h).squeeze(-1).double() * self.energy_scale + self.reference_energy[t]
        return torch.zeros(n_struct, dtype=torch.float64, device=h.device).index_add(0, batch, atomic)

    def compile_inference(self) -> "ForceField":
        """Run the layers through torch.compile (inductor, dynamic shapes) wherever the forces are not themselves
        differentiated: energies, forces and stress for MD, relaxation and scoring. The ~150 small operations of a
        call become a few fused kernels: on this project's CPU 1.2-1.3 x faster one structure at a time and 1.4-2.5 x
        for a batch (kernels/README.md). Training keeps the eager layers (a compiled backward has no double
        backward). The first call compiles (tens of seconds); later atom and edge counts reuse it. Returns self."""
        # cpp_wrapper: the compiled graph is called from C++, which cuts the per-call overhead of a small molecule
        # (benzene's forces: 1.0 against 0.7 ms in one interleaved measurement under load)
        self._compiled = torch.compile(self._edge_energy, dynamic=True, options={"cpp_wrapper": True})
        return self

    def forward(self, numbers, pos, batch, cell, pbc, stress: bool = False, create_graph: bool = False, edges=None):
        """(energy [S], forces [A, 3], stress [S, 3, 3] or None). create_graph keeps the graph of the forces,
        for a loss on them. Stress is computed for periodic structures (zeros for molecules). edges: the
        neighbour_edges of these positions, when the caller found them already (a data loader). Without
        edges, create_graph or stress, the fused kernel runs the layers where it applies (CUDA)."""
        # Differentiate with respect to a view of the positions, never the caller's tensor: autograd.grad refuses a
        # leaf while module backward hooks run (torch.utils.flop_counter's, in train.py), and the caller's tensor
        # keeps its requires_grad.
        pos = (pos if pos.requires_grad else pos.detach().requires_grad_(True)).view_as(pos)
        n_struct = int(batch.max()) + 1 if len(batch) else 0
        strain = torch.zeros(n_struct, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=stress)
        if stress:  # E(pos (1 + eps), cell (1 + eps)): dE/deps at 0 is the virial
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("ab,abc->ac", pos, sym[batch])
            cell = cell + torch.einsum("sab,sbc->sac", cell, sym)
        fused = edges is None and not create_graph and not stress and self.fused_kernel_applies(pos, cell, pbc)
        energy = self.energy(numbers, pos, batch, cell, pbc, edges, fused=fused, compiled=not create_graph)
        inputs = [pos, strain] if stress else [pos]
        grads = torch.autograd.grad(energy.sum(), inputs, create_graph=create_graph, allow_unused=True)
        forces = -grads[0]
        if not stress:
            return energy, forces, None
        volume = torch.linalg.det(cell).abs().clamp(min=1e-12)
        virial = grads[1] if grads[1] is not None else torch.zeros_like(strain)
        sigma = virial / volume[:, None, None] * pbc.to(virial.dtype)[:, None, None]
        return energy, forces, sigma


def flat_batch(structures, device="cpu", dtype=torch.float64):
    """ase.Atoms list -> (numbers [A], pos [A, 3], batch [A], cell [S, 3, 3], pbc [S]) tensors."""
    for a in structures:
        if a.pbc.any() and not a.pbc.all():
            raise ValueError(f"mixed periodicity {a.pbc.tolist()} is not supported")
    numbers = torch.tensor(np.concatenate([a.numbers for a in structures]), dtype=torch.long, device=device)
    pos = torch.tensor(np.concatenate([a.positions for a in structures]), dtype=dtype, device=device)
    batch = torch.repeat_interleave(torch.arange(len(structures), device=device),
                                    torch.tensor([len(a) for a in structures], device=device))
    cell = torch.tensor(np.stack([a.cell.array for a in structures]), dtype=dtype, device=device)
    pbc = torch.tensor([bool(a.pbc.all()) for a in structures], device=device)
    return numbers, pos, batch, cell, pbc


def load_student_calculator(path, device="cpu", compile: bool = False):
    """The ASE calculator of a student checkpoint (train.py --task ff: ckpt.pt or weights.pt), its EMA weights, in one
    call: atoms.calc = load_student_calculator("out/ff/weights.pt"). compile: through ForceField.compile_inference
    (faster once compiled; the first call takes tens of seconds)."""
    from models.checkpoint import load_student
    model = load_student(path, device)[0]
    return student_calculator(model.compile_inference() if compile else model, device)


def student_calculator(model: ForceField, device="cpu"):
    """An ASE calculator running `model`: energy (eV), forces (eV/A) and, for crystals, stress (eV/A^3, Voigt)."""
    from ase.calculators.calculator import Calculator, all_changes

    class StudentCalculator(Calculator):
        implemented_properties = ["energy", "free_energy", "forces", "stress"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            periodic = bool(self.atoms.pbc.any())
            numbers, pos, batch, cell, pbc = flat_batch([self.atoms], device=device,
                                                        dtype=next(model.parameters()).dtype)
            energy, forces, sigma = model(numbers, pos, batch, cell, pbc, stress=periodic)
            self.results = {"energy": energy.item(), "free_energy": energy.item(), "forces": forces.detach().cpu().double().numpy()}
            if periodic:
                s = sigma[0].detach().cpu().double().numpy()
                self.results["stress"] = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])

    return StudentCalculator()


@dataclass
class ForceFieldObjectiveConfig:
    energy_weight: float = 1.0
    force_weight: float = 10.0
    stress_weight: float = 1.0
    force_scale: float = 1.0  # eV/A: the training labels' force RMS; errors are measured in units of it
    stress_scale: float = 1.0  # eV/A^3: the training labels' stress RMS (crystals)


class ForceFieldObjective:
    """The student's training loss, with the interface of a generative process (draw_noise, loss) so that one
    training loop serves both tasks:

        w_E mean_s ((E_s - E*_s) / n_s / f)^2 + w_F mean_(i,x) ((F_ix - F*_ix) / f)^2 + w_S mean_(s periodic, ab) ((S - S*) / g)^2

    with f the force RMS and g the stress RMS of the training labels, so the weights compare like with like."""

    Config = ForceFieldObjectiveConfig

    def __init__(self, config: ForceFieldObjectiveConfig):
        self.config = config

    def draw_noise(self, n: int, n_max: int, generator: torch.Generator) -> dict:
        return {}  # regression: nothing random in a step

    def predict(self, model, batch: dict, create_graph: bool):
        periodic = bool(batch["pbc"].any())
        pos = batch["pos"].detach().requires_grad_(True)
        return model(batch["numbers"], pos, batch["batch"], batch["cell"], batch["pbc"], stress=periodic,
                     create_graph=create_graph, edges=batch["edges"])

    def loss(self, model, batch: dict, noise: dict | None = None, create_graph: bool = True) -> torch.Tensor:
        """Sums of squared errors over the batch divided by batch["counts"] (see LabelledStructures.batch): the
        means above, of the global batch when the batch is one rank's part of it."""
        c = self.config
        n_structures, n_forces, n_stresses = batch["counts"].tolist()
        energy, forces, stress = self.predict(model, batch, create_graph)
        e = ((energy - batch["energy"]) / batch["n_atoms"] / c.force_scale).pow(2).sum() / n_structures
        f = ((forces - batch["forces"]) / c.force_scale).pow(2).sum() / n_forces
        total = c.energy_weight * e.to(f.dtype) + c.force_weight * f
        if stress is not None and c.stress_weight and n_stresses:
            periodic = batch["pbc"]
            total = total + c.stress_weight * ((stress[periodic] - batch["stress"][periodic]) / c.stress_scale).pow(2).sum() / n_stresses
        return total

    def absolute_errors(self, model, batch: dict) -> dict:
        """Sums of absolute errors and their counts: energy per atom (eV), force components (eV/A), stress components
        of crystals (eV/A^3). Divide sum by count over a data set for the MAE."""
        energy, forces, stress = self.predict(model, batch, create_graph=False)
        out = {"energy": ((energy.detach() - batch["energy"]).abs() / batch["n_atoms"]).sum().item(), "energy_n": len(energy),
               "forces": (forces.detach() - batch["forces"]).abs().sum().item(), "forces_n": forces.numel(),
               "stress": 0.0, "stress_n": 0}
        if stress is not None:
            err = (stress.detach() - batch["stress"])[batch["pbc"]]
            out.update(stress=err.abs().sum().item(), stress_n=err.numel())
        return out
