"""Stochastic interpolants for 3D molecules (Albergo, Boffi & Vanden-Eijnden 2023), with an SDE sampler.

The interpolant between a Gaussian sample x0 and data x1, with a latent noise z ~ N(0, I),

    x_t = (1 - t) x0 + t x1 + gamma_t z,   gamma_t = sqrt(a t (1 - t)),

is, because x0 and z are independent Gaussians, the same in law as x_t = alpha_t x1 + sigma_t eps with
alpha_t = t and sigma_t^2 = (1 - t)^2 + a t (1 - t), which is how it is drawn here (eps in the
`x0` slot of the shared noise; coordinates with zero centre of mass). a = 0 is flow matching's path;
a > 0 keeps noise in the path until t = 1, which smooths the intermediate densities and makes the
score s(x, t) = -eps_hat / sigma_t finite along the whole path.

The backbone predicts x1 (coordinates as a displacement from x_t, types as logits), and
    eps_hat = (x_t - alpha_t x1_hat) / sigma_t,   b(x, t) = alpha'_t x1_hat + sigma'_t eps_hat
give the drift and the score. The coordinate loss is the regression of b onto its target, i.e. the
x1 error weighted by (alpha'_t - sigma'_t alpha_t / sigma_t)^2 (capped near t = 1 as in flow matching).

Samplers, from t = 0 to 1 in n_steps steps (equal ones by default), both ending on the predicted clean sample:
  - "sde": dX = [b + eps_t s] dt + sqrt(2 eps_t) dW, whose densities are the interpolant's for any
    eps_t >= 0; here eps_t = noise * sigma_t^2, so that eps_t s = -noise sigma_t eps_hat stays finite
    and the noise vanishes at the data end. With x1_hat held over a step, the SDE is linear in
    y = x - alpha_t x1_hat (dy = (sigma'/sigma - noise) y dt + sigma sqrt(2 noise) dW) and is integrated
    exactly, an exponential integrator instead of Euler-Maruyama:
        x_{t+dt} = alpha_{t+dt} x1_hat + sigma_{t+dt} (e^{-noise dt} eps_hat + sqrt(1 - e^{-2 noise dt}) xi).
    Euler-Maruyama errs by O(dt) near t = 1, where sigma'/sigma diverges (measured with the exact
    denoiser: 7 % too much variance at t = 0.95 with 100 steps); this update has no step-size error
    for the exact denoiser, whatever the number of steps.
  - "ode": eps_t = 0, the probability-flow ODE, the same update with noise = 0 (DDIM's update on this
    schedule): x_{t+dt} = alpha_{t+dt} x1_hat + sigma_{t+dt} eps_hat.

The contract every process keeps is in models/process.py; what the molecule processes share (the endpoint
regression loss among it) in models/molecule_process.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.geometry import remove_mean
from models.molecule_process import MoleculeProcess


@dataclass
class InterpolantConfig:
    n_types: int = 5
    type_scale: float = 0.25  # one-hot types are scaled by this before noising
    type_loss_weight: float = 0.5  # weight of the atom-type cross-entropy against the coordinate loss
    gamma_scale: float = 1.0  # a in gamma_t^2 = a t (1 - t); 0 gives flow matching's path
    noise: float = 1.0  # the SDE sampler's diffusion eps_t = noise * sigma_t^2
    min_one_minus_t: float = 0.05  # the loss weight is taken at t <= 1 - this
    time_tilt: float = 0.0  # training times drawn with density proportional to that weight^tilt (models/time.py)
    self_condition: bool = False  # the backbone also sees its last estimate (models/self_conditioning.py)
    condition_dropout: float = 0.0  # of a conditional model's training structures, the share seen without their condition
    distance_loss: float = 0.0  # weight of the predicted molecule's short-distance error (molecule_process.py)


class StochasticInterpolant(MoleculeProcess):
    Config = InterpolantConfig
    SAMPLERS = ("sde", "ode")  # the first is sample.py's default
    CHECK_SAMPLER = "sde"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = t, sigma_t = sqrt((1 - t)^2 + a t (1 - t)) at times t (any shape)."""
        return t, ((1 - t) ** 2 + self.config.gamma_scale * t * (1 - t)).sqrt()

    def time_weight(self, t: torch.Tensor) -> torch.Tensor:
        """(alpha'_t - sigma'_t alpha_t / sigma_t)^2, the velocity error per unit x1 error, with
        sigma'_t = (-2 (1 - t) + a (1 - 2 t)) / (2 sigma_t) and alpha'_t = 1; capped near t = 1."""
        t = t.clamp(max=1 - self.config.min_one_minus_t)
        alpha, sigma = self.alpha_sigma(t)
        sigma_dot = (-2 * (1 - t) + self.config.gamma_scale * (1 - 2 * t)) / (2 * sigma)
        return (1 - sigma_dot * alpha / sigma) ** 2

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0) -> dict[str, torch.Tensor]:
        """Integrate from t = 0 (noise) to t = 1 (data) on the time grid of `time_power` (models/time.py) for
        molecules of request["n_atoms"] [B] atoms."""
        self.check_sampling(method)
        mask, node, x, h, guidance = self.sampling_start(model, request, generator)
        B, device = len(mask), mask.device
        ts, alphas, sigmas = self.time_grid(n_steps, time_power)
        noise, estimate = (self.config.noise if method == "sde" else 0.0), None
        for step in range(n_steps):
            a_t, s_t, a_next, s_next = (float(v) for v in (alphas[step], sigmas[step], alphas[step + 1], sigmas[step + 1]))
            pos_out, logits = self.backbone(model, h, x, torch.full((B,), float(ts[step]), device=device), mask, estimate, **guidance)
            x1_hat = x + remove_mean(pos_out.float(), mask)
            h1_hat = logits.float().softmax(-1) * self.config.type_scale * node
            estimate = {"pos": x1_hat, "h": h1_hat}
            if step == n_steps - 1:  # t = 1: the prediction of the clean sample
                x, h = x1_hat, h1_hat
                break
            x0_hat, h0_hat = (x - a_t * x1_hat) / s_t, (h - a_t * h1_hat) / s_t
            keep = math.exp(-noise * float(ts[step + 1] - ts[step]))  # e^{-noise dt}: the share of eps_hat a step keeps
            fresh = math.sqrt(1 - keep ** 2)  # and the share of new noise, so the variance stays sigma^2
            x0_next, h0_next = keep * x0_hat, keep * h0_hat
            if fresh > 0:
                noise_x, noise_h = self.fresh_noise(mask, generator)
                x0_next, h0_next = x0_next + fresh * noise_x, h0_next + fresh * noise_h
            x, h = a_next * x1_hat + s_next * x0_next, a_next * h1_hat + s_next * h0_next
        return {"types": logits.argmax(-1) * mask, "pos": x * node, "mask": mask}
