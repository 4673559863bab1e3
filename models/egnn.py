"""E(3)-equivariant graph network (EGNN, Satorras et al. 2021) on dense, fully connected molecules.

QM9 molecules have at most 29 atoms, so every atom talks to every other atom of its molecule and the
graph is a dense [B, N, N] block with a mask: no edge lists, one shape per batch.

With `cfconv_cutoff > 0` every layer also runs a continuous-filter convolution (SchNet-style) over the
radius graph, through kernels.radius_graph.radius_message_passing: the fused Triton kernel on CUDA,
its PyTorch reference elsewhere. It is an invariant feature update (it sees only distances), so the
layer stays E(3)-equivariant; it is the path larger, periodic systems and the force-field student use.

Backbone contract (shared by every arch):
    forward(h [B, N, T] float, pos [B, N, 3], t [B], mask [B, N] bool, estimate=None, condition=None)
        -> pos_out [B, N, 3]   equivariant displacement with zero centre of mass, 0 at padding
           logits  [B, N, T]   invariant atom-type outputs
    estimate: with config.self_condition, the previous estimate of the clean molecule {"pos" [B, N, 3], "h"
    [B, N, T]} or None (zeros); models/self_conditioning.py says what the backbone sees of it.
    condition: with config.n_conditions = C > 0, the normalised properties [B, C] (NaN: dropped) or None (all
    dropped); models/condition.py says what the backbone sees of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.radius_graph import radius_message_passing
from models.geometry import remove_mean
from models.precision import full, no_autocast
from models.self_conditioning import estimate_features
from models.condition import time_and_condition


@dataclass
class EGNNConfig:
    n_types: int = 5
    hidden: int = 128
    n_layers: int = 6
    coords_range: float = 15.0  # bound on one layer's coordinate step (tanh * range), as in EDM
    aggregation_norm: float = 1.0  # messages are summed over neighbours and divided by this
    cfconv_cutoff: float = 0.0  # > 0: add a radius-graph continuous-filter convolution with this cutoff (A)
    cfconv_rbf: int = 16  # radial basis functions of that filter
    time_frequencies: int = 0  # Fourier features of t besides t itself (models/time.py; 0: t alone)
    self_condition: bool = False  # also see an estimate of the clean molecule (models/self_conditioning.py)
    n_conditions: int = 0  # properties it is conditioned on, seen beside the time (models/condition.py)


def pairwise(pos):
    """x_i - x_j [B,N,N,3] and |x_i - x_j|^2 [B,N,N] for pos [B,N,3], in pos's dtype under autocast too."""
    with no_autocast(pos):
        diff = pos.unsqueeze(2) - pos.unsqueeze(1)
        return diff, (diff ** 2).sum(-1)


class EquivariantLayer(nn.Module):
    """One EGNN layer: invariant edge messages, a feature update, an equivariant coordinate update.

    Under autocast the messages and the feature update run in bf16; the geometry, the distance input and
    the coordinate update (coord_mlp included) run in pos's dtype (models/precision.py)."""

    def __init__(self, hidden: int, coords_range: float, aggregation_norm: float, cfconv_cutoff: float = 0.0,
                 cfconv_rbf: int = 16, n_fixed_edge: int = 1):
        super().__init__()
        self.cfconv_cutoff = cfconv_cutoff
        if cfconv_cutoff > 0:
            self.cf_in = nn.Linear(hidden, hidden, bias=False)
            self.cf_filter = nn.Parameter(torch.randn(cfconv_rbf, hidden) / cfconv_rbf ** 0.5)
            self.cf_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden))
        # The first edge-MLP layer acts on [h_i, h_j, d_ij^2, fixed_ij] (fixed: the input's d0_ij^2, and the
        # estimate's distance squared under self-conditioning); splitting its weight lets us project nodes once
        # ([B, N, F]) and broadcast, instead of materialising [B, N, N, 2F+3].
        self.edge_src = nn.Linear(hidden, hidden)
        self.edge_dst = nn.Linear(hidden, hidden, bias=False)
        self.edge_dist = nn.Linear(1 + n_fixed_edge, hidden, bias=False)
        self.edge_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.edge_gate = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid())
        self.node_mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=0.001)  # start near the identity map on coordinates
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.coords_range = coords_range
        self.aggregation_norm = aggregation_norm

    def continuous_filter(self, h, pos, mask):
        """Radius-graph convolution on the real atoms, flattened to a graph: [B,N,F] -> [B,N,F]."""
        b, n = mask.nonzero(as_tuple=True)  # real atoms in batch order, so `b` is sorted as the kernel needs
        y = radius_message_passing(pos[b, n], self.cf_in(h)[b, n], b, self.cfconv_cutoff, self.cf_filter)
        return torch.zeros_like(h).index_put((b, n), self.cf_out(y).to(h.dtype))

    def forward(self, h, pos, fixed, edge_mask, mask):
        # h [B,N,F], pos [B,N,3], fixed [B,N,N,k] (the input's squared distances, ...), edge_mask [B,N,N] float,
        # mask [B,N]
        if self.cfconv_cutoff > 0:
            h = h + self.continuous_filter(h, pos, mask)
        diff, d_sq = pairwise(pos)  # [B,N,N,3] x_i - x_j, [B,N,N]
        with no_autocast(pos):  # bf16 would round a 1.5 A bond's d^2 = 2.25 by up to 0.008 A^2 (0.003 A)
            m_dist = self.edge_dist(torch.cat([d_sq.unsqueeze(-1), fixed], dim=-1))
        m = self.edge_src(h).unsqueeze(2) + self.edge_dst(h).unsqueeze(1)
        m = self.edge_mlp(m + m_dist)  # [B,N,N,F]
        m = m * self.edge_gate(m) * edge_mask.unsqueeze(-1)
        h = h + self.node_mlp(torch.cat([h, m.sum(2) / self.aggregation_norm], dim=-1))
        with no_autocast(pos):  # per-edge steps reach 15 A and can nearly cancel; bf16 rounding would stay
            # Unit-ish direction (x_i - x_j) / (|x_i - x_j| + 1) times an invariant scalar keeps the update
            # equivariant and bounded for far-apart atoms.
            direction = diff / (d_sq.unsqueeze(-1) + 1e-8).sqrt().add(1.0)
            gate = torch.tanh(self.coord_mlp(m.to(pos.dtype)))  # [B,N,N,1]
            step = gate * self.coords_range * edge_mask.unsqueeze(-1)
            pos = pos + (direction * step).sum(2) / self.aggregation_norm
        return h, pos


class EGNN(nn.Module):
    Config = EGNNConfig
    # --precision auto on a CPU: fp32 (models/precision.py). On this AMX CPU bf16 speeds its training steps 1.0-1.19 x at
    # 6 x 128 (half the step is elementwise work over B x N x N x F edges, and the coordinate MLP is a float32 island),
    # 1.25 x at 9 x 256; and 800 steps at 6 x 128 in bf16 sampled at lower atom stability than in fp32 (one seed). Wide
    # EGNNs may take --precision bf16 (kernels/README.md, "A step on this CPU").
    CPU_BF16 = False

    def __init__(self, config: EGNNConfig):
        super().__init__()
        self.config = config
        n_estimate = config.n_types if config.self_condition else 0  # the estimate's types, beside the input's
        self.embed = nn.Linear(config.n_types + n_estimate + 1 + 2 * config.time_frequencies + 2 * config.n_conditions, config.hidden)
        self.layers = nn.ModuleList(
            EquivariantLayer(config.hidden, config.coords_range, config.aggregation_norm, config.cfconv_cutoff,
                             config.cfconv_rbf, 2 if config.self_condition else 1) for _ in range(config.n_layers)
        )
        self.out = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.n_types))

    def forward(self, h, pos, t, mask, estimate=None, condition=None):
        if estimate is not None and not self.config.self_condition:
            raise ValueError("an estimate was passed to a backbone built without self_condition")
        pos = full(pos)  # the coordinate path is never bf16 (models/precision.py)
        node_mask = mask.unsqueeze(-1).to(pos.dtype)  # [B,N,1]
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        edge_mask = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).to(pos.dtype)  # [B,N,N]
        t_feat = time_and_condition(t.to(pos.dtype), self.config.time_frequencies, condition, self.config.n_conditions)
        t_feat = t_feat[:, None, :].expand(-1, h.shape[1], -1)
        fixed = pairwise(pos)[1].unsqueeze(-1)  # [B,N,N,1]: the input's squared distances
        if self.config.self_condition:
            h_hat, d_hat = estimate_features(estimate, mask, self.config.n_types, pos)
            h, fixed = torch.cat([h, h_hat.to(h.dtype)], dim=-1), torch.cat([fixed, d_hat.pow(2).unsqueeze(-1)], dim=-1)
        x = self.embed(torch.cat([h, t_feat], dim=-1)) * node_mask
        pos_in = pos
        for layer in self.layers:
            x, pos = layer(x, pos, fixed, edge_mask, mask)
            x = x * node_mask
        with no_autocast(pos):  # the type head in float32
            return remove_mean(pos - pos_in, mask), self.out(x.to(pos.dtype)) * node_mask
