"""Self-conditioning (Chen, Zhang & Hinton 2022, "Analog Bits"): the backbone also sees its own previous estimate of
the clean molecule, so that each evaluation refines the last one instead of starting over.

Training (models/process.py): on half of the batches (one coin per global batch, drawn with the batch's noise so
that resume and DDP stay exact) the backbone first predicts the clean molecule without gradient, and its second,
trained call sees that estimate; on the other half it sees zeros, as at a sampler's first step. The extra call costs
a forward pass on those batches. Sampling: every step passes the previous step's estimate.

What a backbone sees of the estimate (x1_hat [B, N, 3], h1_hat [B, N, T]) must keep its symmetries: the expected
one-hot types h1_hat per atom, and the distances |x1_hat_i - x1_hat_j| per pair, clamped at MAX_DISTANCE (a
diffusion model's first estimates divide by alpha_t ~ 0.003 and can be hundreds of A apart). Only molecules so far.
"""
from __future__ import annotations

import torch

MAX_DISTANCE = 10.0  # A; QM9 molecules span less


def estimate_features(estimate: dict[str, torch.Tensor] | None, mask: torch.Tensor, n_types: int,
                      like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(types [B, N, T], distances [B, N, N]) of an estimate {"pos", "h"}, 0 at padding and on the diagonal; zeros
    for no estimate (None). In like's dtype and device."""
    B, N = mask.shape
    if estimate is None:
        return like.new_zeros(B, N, n_types), like.new_zeros(B, N, N)
    pos = estimate["pos"].to(like.dtype)
    pair = (mask.unsqueeze(2) & mask.unsqueeze(1)).to(like.dtype)
    dist = ((pos.unsqueeze(2) - pos.unsqueeze(1)).pow(2).sum(-1) + 1e-12).sqrt().clamp(max=MAX_DISTANCE) * pair
    return estimate["h"].to(like.dtype) * mask.unsqueeze(-1).to(like.dtype), dist
