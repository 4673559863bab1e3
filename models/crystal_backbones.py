"""Backbones for crystals: the GNN, Transformer and Pairformer trunks on a periodic cell.

Every crystal backbone is one embedding, a trunk and one head; the three differ only in the trunk, which is
exactly the molecule backbones' trunk where one exists (TransformerBlock, PairformerBlock), so the ablation
is about the same thing in both domains.

Embedding (invariant to rotations of the cell, periodic translations and permutations; models/geometry.py):
  - atoms: s_i from the (noised) type vector, the time and the cell's ln lengths and cos angles;
  - pairs: z_ij from s_i, s_j, Fourier features of the shortest fractional difference d_ij = f_j - f_i
    (sin, cos of 2 pi k d_ij: periodic, so blind to which image is taken) and a radial basis of the
    minimum-image distance |d_ij L| (geometry in A, through the Gram matrix only).
Trunks, [B, N, C] atoms and [B, N, N, C_z] pairs in and out:
  - gnn: message passing on the fully connected periodic graph (CSPNet-style, as in DiffCSP):
    m_ij = MLP(s_i, s_j, z_ij), s_i += MLP(s_i, mean_j m_ij);
  - transformer: attention over atoms with a per-head bias from z;
  - pairformer: triangle multiplications and triangle attention on z, then the transformer's layer.
Head:
  - fractional displacement dx_i = sum_j d_ij w_ij / (n - 1) + W s_i with w_ij = MLP(z_ij + a(s_i) + b(s_j)),
    centred over the atoms (a common shift of every atom is a symmetry, not a prediction);
  - lattice: an MLP of the mean atom feature, 6 numbers in the process's lattice representation;
  - type logits per atom.

Backbone contract for crystals (every arch; the processes in models/crystal_*.py use nothing else):
    forward(h [B, N, T] float, frac [B, N, 3], lengths [B, 3] A, angles [B, 3] degrees, t [B], mask [B, N] bool,
            condition=None)
        -> frac_out [B, N, 3]   a tangent vector on the torus, fractional units, centred, 0 at padding
           lattice_out [B, 6]   a vector in the standardised lattice representation
           logits [B, N, T]     atom-type outputs
The process decides what the vectors mean (a displacement, a velocity, a scaled score or noise). condition: with
config.n_conditions = C > 0, normalised properties [B, C] (NaN: dropped) or None (all dropped), seen beside the time
(models/condition.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.geometry import fourier_features, lattice_matrix, pair_differences, remove_mean
from models.pairformer import PairformerBlock, PairformerConfig
from models.precision import full, no_autocast
from models.condition import time_and_condition
from models.transformer import TransformerBlock, TransformerConfig


CELL_FEATURES = 6  # the last inputs of an atom's embedding: the cell's ln lengths and cos angles


@dataclass
class PeriodicConfig(TransformerConfig):
    """The Transformer's fields (rbf_max now bounds minimum-image distances), plus the Fourier frequencies."""
    n_frequencies: int = 8  # k = 1..K of the fractional-difference features
    rbf_max: float = 8.0


@dataclass
class PeriodicPairformerConfig(PairformerConfig):
    n_frequencies: int = 8
    rbf_max: float = 8.0


class PeriodicEmbedding(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.self_condition:
            raise ValueError("self-conditioning is built for molecules only (models/self_conditioning.py)")
        self.n_frequencies, self.rbf_max, self.width = c.n_frequencies, c.rbf_max, c.rbf_max / (c.n_rbf - 1)
        self.time_frequencies, self.n_conditions = c.time_frequencies, c.n_conditions
        self.register_buffer("centres", torch.linspace(0.0, c.rbf_max, c.n_rbf), persistent=False)
        # types, time (+ the condition's features), then the CELL_FEATURES: ln lengths, cos angles
        self.atom = nn.Linear(c.n_types + 1 + 2 * c.time_frequencies + 2 * c.n_conditions + CELL_FEATURES, c.hidden)
        self.pair_from_atoms = nn.Linear(c.hidden, 2 * c.pair_dim, bias=False)
        self.pair_from_geometry = nn.Linear(6 * c.n_frequencies + c.n_rbf + 1, c.pair_dim)

    def forward(self, h, frac, lengths, angles, t, mask, condition=None):
        frac, lengths, angles = full(frac), full(lengths), full(angles)
        B, N = mask.shape
        with no_autocast(frac):  # geometry in float32; the embeddings below may run in bf16
            d = pair_differences(frac)  # [B, N, N, 3], shortest f_j - f_i
            cart = d @ lattice_matrix(lengths, angles).unsqueeze(1)  # [B, N, N, 3], via L's Gram matrix only in |.|
            dist = (cart.pow(2).sum(-1) + 1e-12).sqrt()
            rbf = torch.exp(-(((dist.unsqueeze(-1) - self.centres) / self.width) ** 2))
            geometry = torch.cat([fourier_features(d, self.n_frequencies), rbf, (dist / self.rbf_max).unsqueeze(-1)], -1)
            cell = torch.cat([lengths.log(), torch.deg2rad(angles).cos()], dim=-1)  # [B, 6]
        node = mask.unsqueeze(-1).to(frac.dtype)
        t_feat = time_and_condition(t.to(frac.dtype), self.time_frequencies, condition, self.n_conditions)[:, None, :].expand(B, N, -1)
        s = self.atom(torch.cat([h, t_feat, cell.unsqueeze(1).expand(B, N, CELL_FEATURES)], -1))
        s = s * node
        a, b = self.pair_from_atoms(s).chunk(2, dim=-1)
        z = a.unsqueeze(2) + b.unsqueeze(1) + self.pair_from_geometry(geometry)
        pair_mask = (mask.unsqueeze(2) & mask.unsqueeze(1)).unsqueeze(-1)
        return s, z * pair_mask.to(z.dtype), d


class MessagePassingBlock(nn.Module):
    """CSPNet-style layer on the fully connected periodic graph: m_ij = MLP(s_i, s_j, z_ij) over real pairs
    j != i, averaged, then s_i += MLP(s_i, mean_j m_ij); z passes through unchanged."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c.hidden)
        self.src, self.dst = nn.Linear(c.hidden, c.hidden), nn.Linear(c.hidden, c.hidden, bias=False)
        self.pair = nn.Linear(c.pair_dim, c.hidden, bias=False)
        self.edge = nn.Sequential(nn.SiLU(), nn.Linear(c.hidden, c.hidden), nn.SiLU())
        self.node = nn.Sequential(nn.Linear(2 * c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, c.hidden))

    def forward(self, s, z, mask):
        x = self.norm(s)
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        neighbour = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).unsqueeze(-1).to(x.dtype)  # [B, N, N, 1]
        m = self.edge(self.src(x).unsqueeze(2) + self.dst(x).unsqueeze(1) + self.pair(z)) * neighbour
        m = m.sum(2) / neighbour.sum(2).clamp(min=1)
        return (s + self.node(torch.cat([x, m], dim=-1))) * mask.unsqueeze(-1).to(s.dtype), z


class PeriodicHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.types = nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.n_types))
        self.pair_from_atoms = nn.Linear(c.hidden, 2 * c.pair_dim, bias=False)
        last = nn.Linear(c.pair_dim, 1, bias=False)
        nn.init.zeros_(last.weight)  # start at no displacement
        self.weight = nn.Sequential(nn.LayerNorm(c.pair_dim), nn.Linear(c.pair_dim, c.pair_dim), nn.SiLU(), last)
        self.own = nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, 3))
        nn.init.zeros_(self.own[1].weight)
        nn.init.zeros_(self.own[1].bias)
        self.lattice = nn.Sequential(nn.LayerNorm(c.hidden), nn.Linear(c.hidden, c.hidden), nn.SiLU(), nn.Linear(c.hidden, 6))
        nn.init.zeros_(self.lattice[-1].weight)
        nn.init.zeros_(self.lattice[-1].bias)

    def forward(self, s, z, d, mask):
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        neighbour = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).unsqueeze(-1).to(d.dtype)
        node = mask.unsqueeze(-1).to(d.dtype)
        with no_autocast(d):  # the outputs feed the sampler's state: float32 (models/precision.py)
            s, z = s.to(d.dtype), z.to(d.dtype)
            a, b = self.pair_from_atoms(s).chunk(2, dim=-1)
            w = self.weight(z + a.unsqueeze(2) + b.unsqueeze(1)) * neighbour
            n_neighbours = (mask.sum(1) - 1).clamp(min=1).to(d.dtype)[:, None, None]
            dx = (d * w).sum(2) / n_neighbours + self.own(s)
            pooled = (s * node).sum(1) / node.sum(1).clamp(min=1)
            return remove_mean(dx, mask), self.lattice(pooled), self.types(s) * node


class PeriodicBackbone(nn.Module):
    """Embedding, a stack of `Block`s, head; a subclass sets Config and Block."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.embed = PeriodicEmbedding(c)
        self.blocks = nn.ModuleList(self.Block(c) for _ in range(c.n_layers))
        self.head = PeriodicHead(c)

    def forward(self, h, frac, lengths, angles, t, mask, condition=None):
        s, z, d = self.embed(h, frac, lengths, angles, t, mask, condition)
        for block in self.blocks:
            s, z = block(s, z, mask)
        return self.head(s, z, d, mask)


class PeriodicGNN(PeriodicBackbone):
    Config, Block = PeriodicConfig, MessagePassingBlock


class PeriodicTransformer(PeriodicBackbone):
    Config, Block = PeriodicConfig, TransformerBlock


class PeriodicPairformer(PeriodicBackbone):
    Config, Block = PeriodicPairformerConfig, PairformerBlock

