"""Geometry of the two domains: Euclidean molecules and periodic crystals.

Molecules live in R^3 up to a translation: coordinates are kept with zero centre of geometry
(`remove_mean`), the subspace where a translation-invariant density can be normalised.

Crystals are a lattice L (rows are the cell vectors a, b, c, in A) and fractional coordinates f in
the unit torus [0, 1)^3; Cartesian positions are f @ L. The symmetries a crystal model must respect:
  - rotations of the cell: everything here uses the lattice only through its lengths and angles
    (equivalently the Gram matrix L L^T), which a rotation leaves unchanged;
  - periodic translations f -> f + tau (mod 1): only differences f_j - f_i enter, through functions of
    period 1 (`torus_difference` picks the shortest representative, Fourier features are periodic);
  - permutations of the atoms: sums over atoms, no ordering.

The lattice is generated in an unconstrained representation of its six parameters,
    u = (ln a, ln b, ln c, atanh((alpha - 90) / 31), atanh((beta - 90) / 31), atanh((gamma - 90) / 31)),
angles in degrees: every real u is a valid cell (positive lengths, angles within 59-121 degrees, which
contains the 60-120 degree range of every Niggli-reduced cell), so a sampler can never leave the space of
cells, and the parameters are rotation invariant by construction. Models see u standardised by the
training set's mean and standard deviation (`LatticeScaler`).
"""
from __future__ import annotations

import math

import torch

ANGLE_HALF_RANGE = 31.0  # degrees around 90 that the angle transform maps onto the real line


def remove_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract the masked mean over atoms: x [B, N, D], mask [B, N] -> x with zero centre, 0 at padding."""
    m = mask.unsqueeze(-1).to(x.dtype)
    mean = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    return (x - mean) * m


# ----------------------------------------------------------------------------------------------
# The torus of fractional coordinates


def wrap(f: torch.Tensor) -> torch.Tensor:
    """Fractional coordinates into [0, 1). f - floor(f) rounds to exactly 1 for a tiny negative f in float32,
    which is folded back to 0."""
    w = f - torch.floor(f)
    return torch.where(w >= 1, w - 1, w)


def torus_difference(f_to: torch.Tensor, f_from: torch.Tensor) -> torch.Tensor:
    """The shortest displacement on the torus from f_from to f_to, each component in [-0.5, 0.5): the
    logarithmic map, so f_from + torus_difference(f_to, f_from) = f_to (mod 1)."""
    d = f_to - f_from
    return d - torch.floor(d + 0.5)


def pair_differences(frac: torch.Tensor) -> torch.Tensor:
    """Shortest fractional displacements d_ij from atom i to atom j: frac [B, N, 3] -> [B, N, N, 3]."""
    return torus_difference(frac.unsqueeze(1), frac.unsqueeze(2))


def fourier_features(d: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """Periodic features of fractional differences, [..., 3] -> [..., 6 K]: sin and cos of 2 pi k d for
    k = 1..K. Invariant to adding an integer to any component, so to the image picked for a pair."""
    k = torch.arange(1, n_frequencies + 1, device=d.device, dtype=d.dtype)
    phase = 2 * math.pi * d.unsqueeze(-1) * k  # [..., 3, K]
    return torch.cat([phase.sin(), phase.cos()], dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------------------
# Lattices


def lattice_matrix(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Cell vectors as rows from lengths [..., 3] (A) and angles [..., 3] (alpha, beta, gamma in degrees):
    a along x, b in the xy plane. [..., 3, 3]. Any orientation would do: models only use L L^T."""
    a, b, c = lengths.unbind(-1)
    alpha, beta, gamma = torch.deg2rad(angles).unbind(-1)
    cos_a, cos_b, cos_g, sin_g = alpha.cos(), beta.cos(), gamma.cos(), gamma.sin()
    cx = c * cos_b
    cy = c * (cos_a - cos_b * cos_g) / sin_g
    cz = (c ** 2 - cx ** 2 - cy ** 2).clamp(min=1e-12).sqrt()
    zero = torch.zeros_like(a)
    return torch.stack([torch.stack([a, zero, zero], -1),
                        torch.stack([b * cos_g, b * sin_g, zero], -1),
                        torch.stack([cx, cy, cz], -1)], dim=-2)


def lattice_to_unconstrained(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """(lengths [..., 3] A, angles [..., 3] degrees) -> u [..., 6]. Angles must lie strictly within
    90 +- ANGLE_HALF_RANGE degrees (Niggli-reduced cells do)."""
    x = ((angles - 90.0) / ANGLE_HALF_RANGE).clamp(-1 + 1e-6, 1 - 1e-6)
    return torch.cat([lengths.log(), torch.atanh(x)], dim=-1)


def unconstrained_to_lattice(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u [..., 6] -> (lengths [..., 3] A, angles [..., 3] degrees); defined for every real u."""
    return u[..., :3].exp(), 90.0 + ANGLE_HALF_RANGE * torch.tanh(u[..., 3:])


def cell_volume(lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Volume of cells [...] in A^3, from lengths [..., 3] and angles [..., 3] (degrees)."""
    cos = torch.deg2rad(angles).cos()
    ca, cb, cg = cos.unbind(-1)
    return lengths.prod(-1) * (1 - ca ** 2 - cb ** 2 - cg ** 2 + 2 * ca * cb * cg).clamp(min=0).sqrt()


class LatticeScaler:
    """Standardises the unconstrained lattice representation with the training set's statistics, so the
    lattice prior N(0, I) sits on the data. A component with (almost) no spread, like the angles of the
    all-cubic perov-5 cells, keeps a floor of `min_std` rather than dividing by zero."""

    def __init__(self, mean: list[float], std: list[float]):
        self.mean, self.std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)

    @classmethod
    def fit(cls, lengths: torch.Tensor, angles: torch.Tensor, min_std: float = 0.02) -> "LatticeScaler":
        u = lattice_to_unconstrained(lengths.double(), angles.double())
        return cls(u.mean(0).tolist(), u.std(0).clamp(min=min_std).tolist())

    def state(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    def normalise(self, lengths: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
        u = lattice_to_unconstrained(lengths.double(), angles.double())
        return ((u - self.mean.to(u.device)) / self.std.to(u.device)).to(lengths.dtype)

    def lattice(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised y [..., 6] -> (lengths, angles), in y's dtype."""
        u = y.double() * self.std.to(y.device) + self.mean.to(y.device)
        lengths, angles = unconstrained_to_lattice(u)
        return lengths.to(y.dtype), angles.to(y.dtype)
