"""The time variable of every generative process: how training draws it, how the backbone sees it, and the grid a
sampler walks. t = 0 is noise and t = 1 data, under every process (models/process.py).

Training times. A process's loss is an expectation over t of a weighted error, E_t[w(t) err(t)]. Drawing t
uniformly and multiplying by w(t) is one unbiased estimate of it; drawing t from a density p(t) and multiplying
by w(t) / p(t) is another, with the same expected gradient and a different variance. TimeDistribution draws from
p(t) proportional to w(t)^tilt: tilt 0 is the uniform draw with the full weight (the processes' original recipe),
tilt 1 draws where the weight is and leaves every sample the same weight (importance sampling: for flow matching's
w = 1 / (1 - t)^2, capped at t = 0.95, half the draws land above t = 0.95, where 77 % of the weight was); values
between split the difference. Processes whose loss is unweighted (diffusion's epsilon loss) have w = 1, where
every tilt is the uniform draw.

Time features. A backbone sees t as one number next to its atom features, or with `time_frequencies` K > 0 also as
sin and cos of 2^k pi t for k < K (Fourier features, as positional encodings do), which lets the first layer
resolve the late times (t near 1) where the fine geometry forms.

Sampler grids. n_steps + 1 times from 0 to 1, t_i = 1 - (1 - i / n)^power: power 1 is the equal-spaced grid, and
a larger power packs the steps towards the data end (EDM's sigma grid does the same with its rho = 7).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


class TimeDistribution:
    """Training times with density p(t) proportional to weight(t)^tilt on [0, 1], drawn by inverting its CDF
    tabulated on `n_grid` intervals (piecewise-linear density), and the loss weight weight(t) / p(t) that keeps the
    objective the same. weight: t [B] -> w [B] > 0, the process's loss weight."""

    def __init__(self, weight: Callable[[torch.Tensor], torch.Tensor], tilt: float = 0.0, n_grid: int = 4096):
        if not 0.0 <= tilt <= 1.0:
            raise ValueError(f"time tilt {tilt} is outside [0, 1]")
        self.weight, self.tilt = weight, tilt
        grid = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)
        density = weight(grid).double() ** tilt
        cdf = torch.cat([grid.new_zeros(1), torch.cumsum((density[1:] + density[:-1]) / 2 / n_grid, 0)])
        self.norm = float(cdf[-1])  # the integral of weight^tilt: p = weight^tilt / norm
        self.grid, self.cdf = grid, cdf / cdf[-1]

    def draw(self, u: torch.Tensor) -> torch.Tensor:
        """Times from uniform draws u (any shape) in u's dtype and device: the inverse CDF, exact at tilt 0."""
        if self.tilt == 0:
            return u
        cdf, grid = self.cdf.to(u.device), self.grid.to(u.device)
        i = torch.searchsorted(cdf, u.double().contiguous(), right=True).clamp(1, len(grid) - 1)
        lo, hi = cdf[i - 1], cdf[i]
        return (grid[i - 1] + (u.double() - lo) / (hi - lo).clamp(min=1e-300) * (grid[i] - grid[i - 1])).to(u.dtype)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """weight(t) / p(t) = weight(t)^(1 - tilt) * norm: the weight that keeps E_p[w / p err] = E_uniform[w err]."""
        w = self.weight(t)
        return w if self.tilt == 0 else w ** (1 - self.tilt) * self.norm


def time_features(t: torch.Tensor, n_frequencies: int) -> torch.Tensor:
    """t [B] -> [B, 1 + 2 K]: t, then sin and cos of 2^k pi t for k < K (K = n_frequencies; just t for K = 0)."""
    t = t.unsqueeze(-1)
    if n_frequencies == 0:
        return t
    angles = t * (math.pi * 2.0 ** torch.arange(n_frequencies, device=t.device, dtype=t.dtype))
    return torch.cat([t, angles.sin(), angles.cos()], dim=-1)


def time_grid(n_steps: int, power: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    """n_steps + 1 times from 0 to 1, t_i = 1 - (1 - i / n)^power (power 1: equal steps; > 1: finer near t = 1)."""
    if power <= 0:
        raise ValueError(f"time-grid power {power} must be > 0")
    equal = torch.linspace(0, 1, n_steps + 1, dtype=dtype)
    return equal if power == 1 else 1 - (1 - equal) ** power  # power 1: exactly the equal steps, not 1 - (1 - t)
