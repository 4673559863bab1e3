"""A compact student force field (SchNet-style) and its ASE calculator.

Energy is a sum of atomic energies on top of per-element reference energies, forces are minus its gradient
(so the field is conservative), and the stress of a periodic structure is the derivative of the energy with
respect to a strain of the cell, divided by the volume (ASE's sign: stress = (1/V) dE/d(strain), so a
compressed crystal has negative stress).

    E = sum_i [ e0(Z_i) + scale * MLP(h_i) ],   h_i after n_layers continuous-filter interactions
    interaction: h_i += MLP( sum_{j in cutoff} (W1 h_j) * filter(d_ij) )

The filter is kernels.radius_graph.edge_filter (Gaussian basis times learned weights times a cosine cutoff
envelope), the form the fused Triton kernel computes; here the sum runs over an explicit edge list that
includes every periodic image within the cutoff, which small crystal cells need (the kernel's minimum image
covers only cutoffs up to half the cell's width). Why SchNet: the smallest model whose layers have the
kernel's form, invariant by construction, and cheap per atom, which is what a student is for.

Batches are flat: numbers [A] atomic numbers, pos [A, 3], batch [A] structure index (sorted), cell [S, 3, 3]
(rows are lattice vectors; ignored for molecules), pbc [S] bool (a structure is periodic in all three
directions or in none).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from kernels.radius_graph import edge_filter


@dataclass
class ForceFieldConfig:
    elements: list[int] = field(default_factory=lambda: [1, 6, 7, 8, 9])  # atomic numbers the model knows
    hidden: int = 64
    n_layers: int = 3
    cutoff: float = 5.0  # A
    n_rbf: int = 20


def neighbour_edges(pos: torch.Tensor, batch: torch.Tensor, cell: torch.Tensor, pbc: torch.Tensor, cutoff: float):
    """Every pair (i, j, image) closer than cutoff, as (i [E], j [E], shift [E, 3] integer lattice offsets).
    The vector of an edge is pos[j] - pos[i] + shift @ cell[batch[i]]. Found without gradients; the caller
    recomputes the vectors from pos and cell, so forces and stress flow through them."""
    edges_i, edges_j, shifts = [], [], []
    with torch.no_grad():
        for s in range(int(batch.max()) + 1 if len(batch) else 0):
            idx = torch.nonzero(batch == s).flatten()
            p = pos[idx].double()
            wrap = torch.zeros_like(p)  # [n, 3] whole cells each atom is moved by to lie inside the cell
            if bool(pbc[s]):
                c = cell[s].double()
                wrap = torch.floor(p @ torch.linalg.inv(c))
                p = p - wrap @ c
                volume = torch.linalg.det(c).abs()
                # Two atoms inside the cell differ by less than one cell along each lattice vector, so the images
                # within the cutoff are at most ceil(cutoff / width) + 1 cells away, where the width along a is
                # the cell's thickness perpendicular to the b-c face (volume / |b x c|), and so on.
                widths = volume / torch.linalg.norm(torch.cross(c[[1, 2, 0]], c[[2, 0, 1]], dim=-1), dim=-1)
                reach = [int(math.ceil(cutoff / float(w))) + 1 for w in widths]
                image = torch.tensor(list(itertools.product(*[range(-r, r + 1) for r in reach])), dtype=torch.float64)
            else:
                image = torch.zeros(1, 3, dtype=torch.float64)
                c = torch.zeros(3, 3, dtype=torch.float64)
            r = p[None, :, None, :] - p[:, None, None, :] + (image @ c)[None, None]  # [n, n, K, 3]
            d = r.norm(dim=-1)
            self_pair = torch.eye(len(idx), dtype=torch.bool)[:, :, None] & (image == 0).all(-1)[None, None]
            i, j, k = torch.nonzero((d < cutoff) & ~self_pair, as_tuple=True)
            edges_i.append(idx[i])
            edges_j.append(idx[j])
            shifts.append(image[k] - wrap[j] + wrap[i])  # the same vector from the unwrapped positions
    if not edges_i:
        empty = torch.zeros(0, dtype=torch.long, device=pos.device)
        return empty, empty, torch.zeros(0, 3, dtype=pos.dtype, device=pos.device)
    return (torch.cat(edges_i).to(pos.device), torch.cat(edges_j).to(pos.device),
            torch.cat(shifts).to(device=pos.device, dtype=pos.dtype))


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
    def __init__(self, hidden: int, n_rbf: int, cutoff: float):
        super().__init__()
        self.cutoff = cutoff
        self.project = nn.Linear(hidden, hidden, bias=False)
        self.filter_weight = nn.Parameter(torch.randn(n_rbf, hidden) / n_rbf ** 0.5)
        self.update = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, h, i, j, d):
        # h [A, F]; edges i <- j with distances d [E]
        messages = self.project(h)[j] * edge_filter(d, self.cutoff, self.filter_weight)  # [E, F]
        return h + self.update(torch.zeros_like(h).index_add(0, i, messages))


class ForceField(nn.Module):
    Config = ForceFieldConfig

    def __init__(self, config: ForceFieldConfig):
        super().__init__()
        self.config = config
        lut = torch.full((119,), -1, dtype=torch.long)
        lut[torch.tensor(config.elements)] = torch.arange(len(config.elements))
        self.register_buffer("type_of", lut, persistent=False)
        self.embed = nn.Embedding(len(config.elements), config.hidden)
        self.layers = nn.ModuleList(Interaction(config.hidden, config.n_rbf, config.cutoff) for _ in range(config.n_layers))
        self.readout = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, 1))
        # e0 per element and the scale of the learned part: fitted from the labels, saved with the weights
        self.register_buffer("reference_energy", torch.zeros(len(config.elements), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.ones((), dtype=torch.float64))

    def types(self, numbers: torch.Tensor) -> torch.Tensor:
        t = self.type_of[numbers]
        if (t < 0).any():
            unknown = sorted(set(numbers[t < 0].tolist()))
            raise ValueError(f"elements {unknown} are not in the force field's elements {self.config.elements}")
        return t

    def energy(self, numbers, pos, batch, cell, pbc, edges=None) -> torch.Tensor:
        """Energies [S] (eV, float64) of the structures of a flat batch (see the module docstring)."""
        n_struct = int(batch.max()) + 1 if len(batch) else 0
        t = self.types(numbers)
        i, j, shift = neighbour_edges(pos, batch, cell, pbc, self.config.cutoff) if edges is None else edges
        vec = pos[j] - pos[i] + torch.einsum("ea,eab->eb", shift, cell[batch[i]]) if len(i) else pos[:0]
        d = vec.norm(dim=-1)
        h = self.embed(t)
        for layer in self.layers:
            h = layer(h, i, j, d)
        atomic = self.readout(h).squeeze(-1).double() * self.energy_scale + self.reference_energy[t]
        return torch.zeros(n_struct, dtype=torch.float64, device=pos.device).index_add(0, batch, atomic)

    def forward(self, numbers, pos, batch, cell, pbc, stress: bool = False, create_graph: bool = False):
        """(energy [S], forces [A, 3], stress [S, 3, 3] or None). create_graph keeps the graph of the forces,
        for a loss on them. Stress is computed for periodic structures (zeros for molecules)."""
        pos = pos.requires_grad_(True) if not pos.requires_grad else pos
        n_struct = int(batch.max()) + 1 if len(batch) else 0
        strain = torch.zeros(n_struct, 3, 3, dtype=pos.dtype, device=pos.device, requires_grad=stress)
        if stress:  # E(pos (1 + eps), cell (1 + eps)): dE/deps at 0 is the virial
            sym = 0.5 * (strain + strain.transpose(1, 2))
            pos = pos + torch.einsum("ab,abc->ac", pos, sym[batch])
            cell = cell + torch.einsum("sab,sbc->sac", cell, sym)
        energy = self.energy(numbers, pos, batch, cell, pbc)
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
