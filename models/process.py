"""What the generative processes (models/flow.py, diffusion.py, interpolant.py) share: the loss
reduction over atoms and molecules, and the sampler's starting state.

All three corrupt data the same way, x_t = alpha_t x1 + sigma_t x0 (x0 Gaussian, coordinates with
zero centre of mass), with t = 0 pure noise and t = 1 data, so a backbone's time input means the same
under every process. They differ in the schedule (alpha_t, sigma_t), in what the backbone predicts,
in the loss weight over t, and in their samplers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.data import remove_mean


def per_molecule_loss(coord_sq_err: torch.Tensor, logits: torch.Tensor, types: torch.Tensor, mask: torch.Tensor,
                      type_loss_weight: float) -> torch.Tensor:
    """coord_sq_err [B, N] (already weighted), type logits [B, N, T], types [B, N] -> scalar.

    Means over each molecule's real atoms, then the mean over molecules: equal-sized DDP shards then
    average to exactly the loss of the whole global batch."""
    n_real = mask.sum(1).clamp(min=1)
    coord_loss = (coord_sq_err * mask).sum(1) / n_real
    ce = F.cross_entropy(logits.float().transpose(1, 2), types, reduction="none")  # [B, N]
    type_loss = (ce * mask).sum(1) / n_real
    return (coord_loss + type_loss_weight * type_loss).mean()


def sampling_start(process, model, n_atoms: torch.Tensor, generator: torch.Generator | None):
    """The state at t = 0 for molecules of n_atoms [B] atoms: (mask [B, N], node [B, N, 1] float,
    x [B, N, 3] centred prior coordinates, h [B, N, T] prior types), on the model's device."""
    device = next(model.parameters()).device
    n_atoms = n_atoms.to(device)
    B, N = len(n_atoms), int(n_atoms.max())
    mask = torch.arange(N, device=device)[None, :] < n_atoms[:, None]
    node = mask.unsqueeze(-1).float()
    noise = process.draw_noise(B, N, generator, device=device)
    return mask, node, remove_mean(noise["x0"].to(device), mask), noise["h0"].to(device) * node
