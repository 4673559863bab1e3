"""Flow matching for crystals (after FlowMM, Miller et al. 2024): fractional coordinates along torus
geodesics, the lattice and the atom types along straight lines, for de novo generation and for structure
prediction (csp: the composition given).

Paths, t = 0 prior and t = 1 data (the molecule processes' convention):
  - fractional coordinates: f0 ~ uniform on the torus, f_t = wrap(f0 + t d) with d = torus_difference(f1, f0),
    the shortest way round (models/geometry.py). The network predicts the remaining displacement to f1,
    target torus_difference(f1, f_t) = (1 - t) d, centred over the atoms: a common shift of every atom gives
    the same crystal, so only the relative motion is learnt (FlowMM does the same);
  - lattice: y0 ~ N(0, I), y_t = (1 - t) y0 + t y1; the network predicts y1 - y_t;
  - types (de novo): as for molecules, h_t = (1 - t) h0 + t h1, with a cross-entropy on the logits.
The loss is the velocity regression: the displacement errors weighted by 1 / (1 - t)^2 (capped as in
models/molecule_flow.py), fractional errors in units of the uniform distribution's spread (a variance of 1/12 per
component), so the coordinates and the standardised lattice weigh alike.

Samplers integrate the ODE from t = 0 to 1: Euler, or Heun (2nd order; its last step is an Euler step, which
lands on the predicted endpoint). The shared parts and the interface are in models/crystal_process.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.crystal_process import UNIFORM_VARIANCE, CrystalProcess, CrystalProcessConfig
from models.geometry import remove_mean, torus_difference, wrap


@dataclass
class CrystalFlowConfig(CrystalProcessConfig):
    min_one_minus_t: float = 0.05  # caps the velocity-loss weight 1 / (1 - t)^2 at 400


class CrystalFlowMatching(CrystalProcess):
    Config = CrystalFlowConfig
    SAMPLERS = ("heun", "euler")
    CHECK_SAMPLER = "heun"
    OPTIONS = ("time_power", "anneal_slope")

    def time_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The velocity-matching weight 1 / (1 - t)^2 of the displacement errors, capped at t = 1 - min_one_minus_t."""
        return (1 - t).clamp(min=self.config.min_one_minus_t).pow(-2)

    def frac_path(self, f0, f1, z, t):
        """f_t [B, N, 3] on the path from f0 to f1 at times t [B]."""
        return wrap(f0 + t[:, None, None] * torus_difference(f1, f0))

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        types, f1, y1, h1, mask, node, noise, condition = self.data(batch, noise)
        t = noise["t"]
        f_t = self.frac_path(noise["f0"], f1, noise["z"], t) * node
        y_t = t[:, None] * y1 + (1 - t[:, None]) * noise["y0"]
        h_t = h1 if self.config.csp else (t[:, None, None] * h1 + (1 - t[:, None, None]) * noise["h0"]) * node
        frac_out, lattice_out, logits = self.forward(model, h_t, f_t, y_t, t, mask, condition)
        weight = self.times.loss_weight(t)  # [B], the velocity-matching weight over the times' density
        target = remove_mean(torus_difference(f1, f_t), mask)
        frac_err = ((frac_out.float() - target) ** 2).sum(-1).mul(mask).sum(1) / (3 * mask.sum(1).clamp(min=1) * UNIFORM_VARIANCE)
        lattice_err = ((lattice_out.float() - (y1 - y_t)) ** 2).mean(-1)
        return (weight * (frac_err + self.config.lattice_loss_weight * lattice_err) + self.type_loss(logits, types, mask)).mean()

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0,
               anneal_slope: float = 0.0) -> dict[str, torch.Tensor]:
        """De novo: request {"n_atoms": [B]}; structure prediction: {"types": [B, N], "mask": [B, N]} (the
        compositions). The velocity of an x1 prediction is the remaining displacement over the remaining time;
        anneal_slope: see CrystalProcess.integrate."""
        self.check_sampling(method)
        return self.integrate(model, request, n_steps, method == "heun", generator,
                              rates=lambda frac, lattice, t: (frac / (1 - t), lattice / (1 - t)), time_power=time_power,
                              anneal_slope=anneal_slope)
