"""Stochastic interpolants for crystals (after OMatG, Hoellmer et al. 2025): a periodic interpolant with latent
noise on the torus for the fractional coordinates, straight paths for the lattice and the types; de novo or
structure prediction.

  - fractional coordinates: f0 ~ uniform, d = torus_difference(f1, f0) (the shortest way round), z ~ N(0, I),
        f_t = wrap(f0 + t d + gamma_t z),   gamma_t = a t (1 - t),
    a periodic linear interpolant whose latent noise vanishes at both ends (OMatG's periodic interpolant with
    a Brownian-bridge-like gamma). gamma_t = a t (1 - t) rather than sqrt(a t (1 - t)) keeps gamma'_t finite,
    so the velocity b_t = d + gamma'_t z, which the network regresses directly (centred over the atoms, in
    units of the uniform distribution's spread), has a bounded target at every t. a = 0 is flow matching's
    path with a velocity parametrisation;
  - lattice and types: the straight paths of models/crystal_flow.py; the network predicts the lattice
    velocity y1 - y0 and the clean types (cross-entropy).

Sampler "ode": the probability-flow ODE df/dt = E[b_t | f_t], integrated with Heun's method on the torus
(the last step Euler), types moving towards their prediction as in flow matching. The latent noise makes the
intermediate densities smoother than flow matching's, the property the SDE sampler of OMatG also uses; an
SDE sampler would need a second, denoising output (E[z | f_t]) that this backbone contract does not have.
The shared parts and the interface are in models/crystal_process.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.crystal_process import UNIFORM_VARIANCE, CrystalProcess, CrystalProcessConfig
from models.geometry import remove_mean, torus_difference, wrap


@dataclass
class CrystalInterpolantConfig(CrystalProcessConfig):
    gamma_scale: float = 0.2  # a in gamma_t = a t (1 - t), fractional units (0.05 at t = 1/2)


class CrystalInterpolant(CrystalProcess):
    Config = CrystalInterpolantConfig
    SAMPLERS = ("ode",)
    CHECK_SAMPLER = "ode"
    OPTIONS = ("time_power", "anneal_slope")

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        types, f1, y1, h1, mask, node, noise, condition = self.data(batch, noise)
        t, a = noise["t"], self.config.gamma_scale
        tt = t[:, None, None]
        d = torus_difference(f1, noise["f0"])
        f_t = wrap(noise["f0"] + tt * d + a * tt * (1 - tt) * noise["z"]) * node
        target = remove_mean(d + a * (1 - 2 * tt) * noise["z"], mask)
        y_t = t[:, None] * y1 + (1 - t[:, None]) * noise["y0"]
        h_t = h1 if self.config.csp else (tt * h1 + (1 - tt) * noise["h0"]) * node
        frac_out, lattice_out, logits = self.forward(model, h_t, f_t, y_t, t, mask, condition)
        frac_err = ((frac_out.float() - target) ** 2).sum(-1).mul(mask).sum(1) / (3 * mask.sum(1).clamp(min=1) * UNIFORM_VARIANCE)
        lattice_err = ((lattice_out.float() - (y1 - noise["y0"])) ** 2).mean(-1)
        return (frac_err + self.config.lattice_loss_weight * lattice_err + self.type_loss(logits, types, mask)).mean()

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0,
               anneal_slope: float = 0.0) -> dict[str, torch.Tensor]:
        """De novo: request {"n_atoms": [B]}; structure prediction: {"types": [B, N], "mask": [B, N]} (the
        compositions). The backbone predicts the velocities themselves; Heun's method; anneal_slope: see
        CrystalProcess.integrate."""
        self.check_sampling(method)
        return self.integrate(model, request, n_steps, True, generator, rates=lambda frac, lattice, t: (frac, lattice),
                              time_power=time_power, anneal_slope=anneal_slope)
