"""Diffusion for crystals (after DiffCSP, Jiao et al. 2023): a wrapped normal on the torus for the fractional
coordinates, variance-preserving diffusion for the lattice and the types; de novo or structure prediction.

  - fractional coordinates, variance exploding on the torus: f_t = wrap(f1 + sigma_t z), z ~ N(0, I), with
    sigma_t = sigma_max^(1 - t) sigma_min^t (t = 0 noise, t = 1 data, as everywhere here). At sigma_max = 0.5
    the wrapped normal is uniform to within 1 % (its first Fourier coefficient is exp(-2 pi^2 sigma^2)), so
    sampling starts from the uniform distribution. The network predicts sigma_t times the score of the
    wrapped normal, sum over images k of -(d + k) / sigma^2 exp(-(d + k)^2 / 2 sigma^2), normalised, at
    d = torus_difference(f_t, f1): for small sigma that is minus the noise z, as in DDPM's epsilon
    prediction; the target is centred over the atoms like the output;
  - lattice y and types h: x_t = alpha_t x1 + sigma_t x0 with EDM's polynomial schedule (models/molecule_diffusion.py),
    the network predicting the lattice noise y0 and the clean types (cross-entropy), as for molecules.

Samplers, from t = 0 to 1 in n_steps equal steps, ending on the denoised prediction:
  - "ancestral": the reverse SDE. Coordinates: f <- wrap(f + (sigma_t^2 - sigma_s^2) score + sqrt(sigma_t^2 -
    sigma_s^2) xi); lattice and types: DDPM's posterior step;
  - "ode": the probability-flow ODE, half the score step and no noise for the coordinates, DDIM for the rest.
The shared parts and the interface are in models/crystal_process.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.crystal_process import CrystalProcess, CrystalProcessConfig
from models.molecule_diffusion import ddpm_posterior, polynomial_schedule
from models.geometry import remove_mean, torus_difference, wrap
from models.time import time_grid

N_IMAGES = 4  # images k = -4..4 of the wrapped normal: enough for sigma <= 0.5 to float precision
LATTICE_CLIP = 5.0  # standard deviations of the training lattices that a lattice prediction may reach


@dataclass
class CrystalDiffusionConfig(CrystalProcessConfig):
    sigma_min: float = 0.005  # wrapped-normal width at t = 1 (DiffCSP's values)
    sigma_max: float = 0.5  # at t = 0
    schedule_precision: float = 1e-5  # s of the lattice and type schedule


def wrapped_normal_score(d: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """d/dd log of the wrapped normal of width sigma at displacements d (any shape; sigma broadcasts)."""
    k = torch.arange(-N_IMAGES, N_IMAGES + 1, device=d.device, dtype=d.dtype)
    x = d.unsqueeze(-1) + k  # [..., K]
    s = sigma.unsqueeze(-1)
    weights = torch.softmax(-x ** 2 / (2 * s ** 2), dim=-1)
    return -(weights * x).sum(-1) / sigma ** 2


class CrystalDiffusion(CrystalProcess):
    Config = CrystalDiffusionConfig
    SAMPLERS = ("ancestral", "ode")
    CHECK_SAMPLER = "ancestral"

    def frac_sigma(self, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        return c.sigma_max ** (1 - t) * c.sigma_min ** t

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        types, f1, y1, h1, mask, node, noise, condition = self.data(batch, noise)
        t = noise["t"]
        sigma_f = self.frac_sigma(t)[:, None, None]
        f_t = wrap(f1 + sigma_f * noise["z"]) * node
        target = remove_mean(sigma_f * wrapped_normal_score(torus_difference(f_t, f1), sigma_f), mask)
        alpha, sigma = (a.float() for a in polynomial_schedule(t, self.config.schedule_precision))
        y_t = alpha[:, None] * y1 + sigma[:, None] * noise["y0"]
        h_t = h1 if self.config.csp else (alpha[:, None, None] * h1 + sigma[:, None, None] * noise["h0"]) * node
        frac_out, lattice_out, logits = self.forward(model, h_t, f_t, y_t, t, mask, condition)
        frac_err = ((frac_out.float() - target) ** 2).sum(-1).mul(mask).sum(1) / (3 * mask.sum(1).clamp(min=1))
        lattice_err = ((lattice_out.float() - noise["y0"]) ** 2).mean(-1)
        return (frac_err + self.config.lattice_loss_weight * lattice_err + self.type_loss(logits, types, mask)).mean()

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0) -> dict[str, torch.Tensor]:
        """De novo: request {"n_atoms": [B]}; structure prediction: {"types": [B, N], "mask": [B, N]} (the
        compositions); the time grid of time_power (models/time.py)."""
        self.check_sampling(method)
        types, mask, node, noise, h, guidance = self.sampling_start(model, request, generator)
        f, y, given = noise["f0"] * node, noise["y0"], h
        B, device = len(mask), mask.device
        ts = time_grid(n_steps, time_power)
        alphas, sigmas = polynomial_schedule(ts, self.config.schedule_precision)
        kw = dict(generator=generator, device=generator.device if generator is not None else device)
        for step in range(n_steps):
            t, s = float(ts[step]), float(ts[step + 1])
            a_t, s_t, a_s, s_s = (float(v) for v in (alphas[step], sigmas[step], alphas[step + 1], sigmas[step + 1]))
            sig_t, sig_s = self.frac_sigma(torch.tensor(t)).item(), self.frac_sigma(torch.tensor(s)).item()
            frac_out, y0_hat, logits = self.forward(model, h, f, y, torch.full((B,), t, device=device), mask, **guidance)
            score = remove_mean(frac_out.float(), mask) / sig_t
            y0_hat = y0_hat.float()
            # (y - sigma y0_hat) / alpha divides by alpha = 0.003 at t = 0: clipped to LATTICE_CLIP standard deviations
            # of the training lattices (DDPM's clipping of its x0 prediction), or a few steps blow the cell up
            y1_hat = ((y - s_t * y0_hat) / a_t).clamp(-LATTICE_CLIP, LATTICE_CLIP)
            y0_hat = (y - a_t * y1_hat) / s_t
            h1_hat = logits.float().softmax(-1) * self.config.type_scale * node
            if step == n_steps - 1:  # t = 1: the denoised prediction (Tweedie's formula for the coordinates)
                f, y, h = wrap(f + sig_t ** 2 * score) * node, y1_hat, h1_hat
                break
            step_var = sig_t ** 2 - sig_s ** 2
            if method == "ode":
                f = wrap(f + 0.5 * step_var * score) * node
                h0_hat = (h - a_t * h1_hat) / s_t
                y, h = a_s * y1_hat + s_s * y0_hat, a_s * h1_hat + s_s * h0_hat
            else:
                xi = remove_mean(torch.randn(f.shape, **kw).to(device), mask)
                f = wrap(f + step_var * score + math.sqrt(step_var) * xi) * node
                c_t, c_x, std = ddpm_posterior(a_t, s_t, a_s, s_s)  # with x1_hat for x1
                y = c_t * y + c_x * y1_hat + std * torch.randn(y.shape, **kw).to(device)
                h = (c_t * h + c_x * h1_hat + std * torch.randn(h.shape, **kw).to(device)) * node
            if self.config.csp:  # the composition is given: the clean types stay the input
                h = given
        return self.result(types, logits, f, y, mask)
