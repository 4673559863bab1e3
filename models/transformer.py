"""Transformer backbone for 3D molecules: self-attention over atoms, biased by interatomic distances.

Geometry enters only through distances: a radial basis of |x_i - x_j| is embedded once into pair
features z [B, N, N, C_z], and every layer projects z to a per-head attention bias (Graphormer's
spatial encoding). The atom features are thus E(3)-invariant; coordinates come out of an
EGNN-style head on pair features,

    dx_i = sum_j (x_i - x_j) / (|x_ij| + 1) * w_ij / (n_i - 1),   w_ij = MLP(z_ij + a(s_i) + b(s_j)),

equivariant under rotations, reflections and translations by construction.

The Pairformer (models/pairformer.py) is this model plus a pair track that is updated by triangle
multiplications and triangle attention in every block; it shares this file's layers, embedding and
head, so the two differ only in what the ablation is about.

Backbone contract (shared by every arch, see models/egnn.py):
    forward(h [B, N, T] float, pos [B, N, 3], t [B], mask [B, N] bool, estimate=None, condition=None)
        -> pos_out [B, N, 3]   equivariant displacement with zero centre of mass, 0 at padding
           logits  [B, N, T]   invariant atom-type outputs
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.geometry import remove_mean
from models.precision import full, no_autocast
from models.self_conditioning import estimate_features
from models.condition import time_and_condition


@dataclass
class TransformerConfig:
    n_types: int = 5
    hidden: int = 128  # width of the atom features
    n_layers: int = 6
    heads: int = 4
    pair_dim: int = 0  # width of the distance embedding the biases are projected from; 0: hidden // 2 (at least 16)
    n_rbf: int = 32  # Gaussian radial basis of interatomic distances
    rbf_max: float = 10.0  # last basis centre in A (QM9 molecules span up to ~10 A)
    time_frequencies: int = 0  # Fourier features of t besides t itself (models/time.py; 0: t alone)
    self_condition: bool = False  # also see an estimate of the clean molecule (models/self_conditioning.py)
    n_conditions: int = 0  # properties it is conditioned on, seen beside the time (models/condition.py)

    def __post_init__(self):
        if self.pair_dim == 0:
            self.pair_dim = max(16, self.hidden // 2)
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class Transition(nn.Module):
    """Pre-norm two-layer MLP with a SwiGLU, applied per atom or per pair: [..., C] -> [..., C]."""

    def __init__(self, dim: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * expansion * dim, bias=False)
        self.down = nn.Linear(expansion * dim, dim, bias=False)

    def forward(self, x):
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(F.silu(a) * b)


class AttentionWithPairBias(nn.Module):
    """Gated multi-head self-attention over atoms, biased per head by a projection of z: [B, N, C] -> same."""

    def __init__(self, dim: int, pair_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.pair_norm = nn.LayerNorm(pair_dim)
        self.bias = nn.Linear(pair_dim, heads, bias=False)
        self.gate = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, s, z, mask):
        # s [B, N, C], z [B, N, N, C_z], mask [B, N] bool
        B, N, C = s.shape
        x = self.norm(s)
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.bias(self.pair_norm(z)).permute(0, 3, 1, 2)  # [B, H, N(query), N(key)]
        bias = bias.masked_fill(~mask[:, None, None, :], float("-inf"))  # padded keys; a real atom keeps itself
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [B, H, N, C/H]
        o = o.transpose(1, 2).reshape(B, N, C)
        return self.out(torch.sigmoid(self.gate(x)) * o)


class GeometryEmbedding(nn.Module):
    """Invariant inputs: atom features s [B, N, C] from types and time, pair features z [B, N, N, C_z]
    from s_i, s_j and a Gaussian basis of |x_i - x_j| (plus d / rbf_max, so that pairs beyond the last
    centre stay distinguishable). Also returns x_i - x_j and |x_i - x_j| for the coordinate head."""

    def __init__(self, n_types: int, hidden: int, pair_dim: int, n_rbf: int, rbf_max: float, time_frequencies: int = 0,
                 self_condition: bool = False, n_conditions: int = 0):
        super().__init__()
        self.rbf_max, self.width, self.time_frequencies = rbf_max, rbf_max / (n_rbf - 1), time_frequencies
        self.n_types, self.self_condition, self.n_conditions = n_types, self_condition, n_conditions
        self.register_buffer("centres", torch.linspace(0.0, rbf_max, n_rbf), persistent=False)
        # atom-type features (and the estimate's, with self-conditioning) + time features (+ the condition's)
        self.atom = nn.Linear(n_types * (2 if self_condition else 1) + 1 + 2 * time_frequencies + 2 * n_conditions, hidden)
        self.pair_from_atoms = nn.Linear(hidden, 2 * pair_dim, bias=False)
        self.pair_from_distance = nn.Linear(n_rbf + 1, pair_dim)
        if self_condition:  # the estimate's distances, embedded as the input's are
            self.pair_from_estimate = nn.Linear(n_rbf + 1, pair_dim)

    def distance_basis(self, dist):
        """[B, N, N] -> [B, N, N, n_rbf + 1]: the Gaussian basis and d / rbf_max."""
        rbf = torch.exp(-(((dist.unsqueeze(-1) - self.centres) / self.width) ** 2))
        return torch.cat([rbf, (dist / self.rbf_max).unsqueeze(-1)], dim=-1)

    def forward(self, h, pos, t, mask, estimate=None, condition=None):
        if estimate is not None and not self.self_condition:
            raise ValueError("an estimate was passed to a backbone built without self_condition")
        N = mask.shape[1]
        pos = full(pos)  # the coordinate path is never bf16 (models/precision.py)
        with no_autocast(pos):  # the geometry in pos's dtype; the embeddings below may run in bf16
            diff = pos.unsqueeze(2) - pos.unsqueeze(1)  # [B, N, N, 3], x_i - x_j
            dist = (diff.pow(2).sum(-1) + 1e-12).sqrt()  # [B, N, N]; the epsilon keeps the gradient finite at i = j
            distance = self.distance_basis(dist)
            if self.self_condition:
                h_hat, d_hat = estimate_features(estimate, mask, self.n_types, pos)
                h, estimate_distance = torch.cat([h, h_hat.to(h.dtype)], dim=-1), self.distance_basis(d_hat)
        t_feat = time_and_condition(t.to(pos.dtype), self.time_frequencies, condition, self.n_conditions)[:, None, :].expand(-1, N, -1)
        s = self.atom(torch.cat([h, t_feat], dim=-1)) * mask.unsqueeze(-1).to(pos.dtype)
        a, b = self.pair_from_atoms(s).chunk(2, dim=-1)
        z = a.unsqueeze(2) + b.unsqueeze(1) + self.pair_from_distance(distance)
        if self.self_condition:
            z = z + self.pair_from_estimate(estimate_distance)
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)  # [B, N, N]; the diagonal is a real pair (i, i)
        return s, z * pair_mask.unsqueeze(-1).to(z.dtype), diff, dist


class EquivariantHead(nn.Module):
    """Atom-type logits from s, and dx_i = sum_j (x_i - x_j) / (|x_ij| + 1) * w_ij / (n_i - 1) with
    invariant weights w_ij = MLP(z_ij + a(s_i) + b(s_j)); zero centre of mass, 0 at padding.

    The head runs in diff's dtype under autocast too (models/precision.py): in bf16, its rounding of the
    w_ij put 0.009 A of error into a 4.7 A displacement. It is one pair MLP, small next to the trunk."""

    def __init__(self, n_types: int, hidden: int, pair_dim: int):
        super().__init__()
        self.types = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, n_types))
        self.pair_from_atoms = nn.Linear(hidden, 2 * pair_dim, bias=False)
        last = nn.Linear(pair_dim, 1, bias=False)
        nn.init.zeros_(last.weight)  # start at dx = 0, i.e. predicting x1 = x_t
        self.weight = nn.Sequential(nn.LayerNorm(pair_dim), nn.Linear(pair_dim, pair_dim), nn.SiLU(), last)

    def forward(self, s, z, diff, dist, mask):
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        neighbour = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).unsqueeze(-1).to(diff.dtype)  # [B, N, N, 1]
        with no_autocast(diff):
            s, z = s.to(diff.dtype), z.to(diff.dtype)
            a, b = self.pair_from_atoms(s).chunk(2, dim=-1)
            w = self.weight(z + a.unsqueeze(2) + b.unsqueeze(1)) * neighbour
            n_neighbours = (mask.sum(1) - 1).clamp(min=1).to(diff.dtype)[:, None, None]
            dx = (diff / (dist.unsqueeze(-1) + 1.0) * w).sum(2) / n_neighbours
            return remove_mean(dx, mask), self.types(s) * mask.unsqueeze(-1).to(s.dtype)


class TransformerBlock(nn.Module):
    """Attention with the distance bias, then a transition; z passes through unchanged."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.attention = AttentionWithPairBias(c.hidden, c.pair_dim, c.heads)
        self.transition = Transition(c.hidden)

    def forward(self, s, z, mask):
        s = s + self.attention(s, z, mask)
        return (s + self.transition(s)) * mask.unsqueeze(-1).to(s.dtype), z


class Transformer(nn.Module):
    Config = TransformerConfig
    Block = TransformerBlock  # the Pairformer swaps in its own block, which also updates z
    # --precision auto on a CPU: bf16 (models/precision.py). kernels/step_bench.py on this AMX CPU: training steps 1.8 x
    # (1 thread) and 1.55 x (2) faster at 6 x 128, the Pairformer's 1.5 x and 1.25 x; 800 steps of each precision on QM9
    # reached the same validation loss (kernels/README.md, "A step on this CPU").
    CPU_BF16 = True

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.embed = GeometryEmbedding(c.n_types, c.hidden, c.pair_dim, c.n_rbf, c.rbf_max, c.time_frequencies, c.self_condition,
                                       c.n_conditions)
        self.blocks = nn.ModuleList(self.Block(c) for _ in range(c.n_layers))
        self.head = EquivariantHead(c.n_types, c.hidden, c.pair_dim)

    def forward(self, h, pos, t, mask, estimate=None, condition=None):
        s, z, diff, dist = self.embed(h, pos, t, mask, estimate, condition)
        for block in self.blocks:
            s, z = block(s, z, mask)
        return self.head(s, z, diff, dist, mask)
