"""Pairformer backbone (AlphaFold 3's trunk block) for 3D molecules, with an equivariant coordinate head.

Two tracks: a single representation s [B, N, C_s] per atom and a pair representation z [B, N, N, C_z]
per ordered atom pair. Each block updates them in AlphaFold 3's order (Algorithm 17):

    z += TriangleMultiplication(outgoing)   z_ij <- sum_k a_ik * b_jk
    z += TriangleMultiplication(incoming)   z_ij <- sum_k a_ki * b_kj
    z += TriangleAttention(starting node)   row i: (i, j) attends over (i, k), bias from z_jk
    z += TriangleAttention(ending node)     column j: (i, j) attends over (k, j), bias from z_ki
    z += Transition(z)
    s += AttentionWithPairBias(s, z)
    s += Transition(s)

Both triangle attentions go through kernels.triangle_attention (the fused Triton kernel on CUDA, its
PyTorch reference elsewhere), the O(N^3) part of the block.

Inputs and outputs are the Transformer's (models/transformer.py), so the two backbones differ only
in the pair track: geometry enters through a radial basis of interatomic distances embedded into z,
so the trunk is E(3)-invariant, and the coordinates come out of the same EGNN-style head on the final
pair features, equivariant under rotations, reflections and translations by construction.

Backbone contract (shared by every arch, see models/egnn.py):
    forward(h [B, N, T] float, pos [B, N, 3], t [B], mask [B, N] bool, estimate=None, condition=None)
        -> pos_out [B, N, 3]   equivariant displacement with zero centre of mass, 0 at padding
           logits  [B, N, T]   invariant atom-type outputs
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels.triangle_attention import HEAD_DIMS, triangle_attention, triangle_attention_ending
from models.transformer import Transformer, TransformerBlock, TransformerConfig, Transition


@dataclass
class PairformerConfig(TransformerConfig):
    """The Transformer's fields (hidden: the single track, pair_dim: the pair track), plus the triangle
    attention's heads."""
    n_layers: int = 4  # Pairformer blocks; each costs O(N^3), so fewer than the Transformer's layers
    tri_heads: int = 4  # heads of each triangle attention
    tri_head_dim: int = 32  # their head dim; one of the Triton kernel's (16, 32, 64, 128)

    def __post_init__(self):
        super().__post_init__()
        if self.tri_head_dim not in HEAD_DIMS:
            raise ValueError(f"tri_head_dim must be one of {HEAD_DIMS} (the Triton kernel's head dims); got {self.tri_head_dim}")


class TriangleMultiplication(nn.Module):
    """z_ij <- gate_ij * Linear(LN(sum_k a_ik b_jk)) (outgoing) or sum_k a_ki b_kj (incoming); a and b
    are gated projections of z, zeroed on padded pairs so padding never enters the sum over k."""

    def __init__(self, dim: int, outgoing: bool):
        super().__init__()
        self.equation = "bikc,bjkc->bijc" if outgoing else "bkic,bkjc->bijc"
        self.norm_in = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, 4 * dim)  # a, b and their gates
        self.gate = nn.Linear(dim, dim)
        self.norm_out = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, z, pair_mask):
        # z [B, N, N, C], pair_mask [B, N, N] bool
        x = self.norm_in(z)
        a, b, gate_a, gate_b = self.proj(x).chunk(4, dim=-1)
        keep = pair_mask.unsqueeze(-1).to(x.dtype)
        a, b = a * torch.sigmoid(gate_a) * keep, b * torch.sigmoid(gate_b) * keep
        t = torch.einsum(self.equation, a, b)  # a batched matmul over k; tensor cores accumulate in fp32
        return torch.sigmoid(self.gate(x)) * self.out(self.norm_out(t))


class TriangleAttention(nn.Module):
    """Gated multi-head triangle attention around the starting or the ending node: [B, N, N, C] -> same."""

    def __init__(self, dim: int, heads: int, head_dim: int, ending: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.attend = triangle_attention_ending if ending else triangle_attention
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=False)
        self.bias = nn.Linear(dim, heads, bias=False)
        self.gate = nn.Linear(dim, heads * head_dim)
        self.out = nn.Linear(heads * head_dim, dim)

    def forward(self, z, pair_mask):
        B, N, _, _ = z.shape
        H, D = self.heads, self.head_dim
        x = self.norm(z)
        # [B, N, N, 3*H*D] -> three [B, H, N, N, D], the layout the kernel takes
        q, k, v = self.qkv(x).view(B, N, N, 3, H, D).permute(3, 0, 4, 1, 2, 5).unbind(0)
        bias = self.bias(x).permute(0, 3, 1, 2)  # [B, H, N, N], indexed like z
        o = self.attend(q, k, v, bias.to(q.dtype), pair_mask)  # [B, H, N, N, D]
        o = o.permute(0, 2, 3, 1, 4).reshape(B, N, N, H * D)
        return self.out(torch.sigmoid(self.gate(x)) * o)


class PairformerBlock(nn.Module):
    def __init__(self, c: PairformerConfig):
        super().__init__()
        self.tri_mul_out = TriangleMultiplication(c.pair_dim, outgoing=True)
        self.tri_mul_in = TriangleMultiplication(c.pair_dim, outgoing=False)
        self.tri_att_start = TriangleAttention(c.pair_dim, c.tri_heads, c.tri_head_dim, ending=False)
        self.tri_att_end = TriangleAttention(c.pair_dim, c.tri_heads, c.tri_head_dim, ending=True)
        self.pair_transition = Transition(c.pair_dim)
        self.single = TransformerBlock(c)  # attention with pair bias + transition on the single track

    def forward(self, s, z, mask):
        # Padded pairs are zeroed after each update: they never reach real pairs (every sum over k and
        # every key set is masked), but would otherwise grow without bound through the residuals.
        pair_mask = mask.unsqueeze(2) & mask.unsqueeze(1)  # [B, N, N]
        keep = pair_mask.unsqueeze(-1).to(z.dtype)
        for update in (self.tri_mul_out, self.tri_mul_in, self.tri_att_start, self.tri_att_end):
            z = (z + update(z, pair_mask)) * keep
        z = (z + self.pair_transition(z)) * keep
        return self.single(s, z, mask)


class Pairformer(Transformer):
    """The Transformer (same embedding, head and single-track layers) with PairformerBlocks."""
    Config = PairformerConfig
    Block = PairformerBlock
