"""Variance-preserving diffusion for 3D molecules (EDM, Hoogeboom et al. 2022), in continuous time.

Same time convention as flow matching, so a backbone's time input means the same under every
process: t = 0 is pure noise, t = 1 is data, and

    x_t = alpha_t x1 + sigma_t x0,   x0 ~ N(0, I) (coordinates: zero centre of mass),  alpha_t^2 + sigma_t^2 = 1,

with EDM's polynomial schedule written in tau = 1 - t: alpha^2 = (1 - 2 s) (1 - tau^2)^2 + s, s = 1e-5
(so alpha_1^2 = 1 - s at the data end and alpha_0^2 = s at the noise end). Atom types are continuous,
as in flow matching and EDM: the one-hot vector times `type_scale`, noised the same way.

Parametrisation, as in EDM: the backbone's equivariant coordinate output is the noise prediction
x0_hat (EDM's epsilon), trained with the plain L2 loss; the type logits predict the clean types,
trained with cross-entropy as in flow matching.

Samplers, from t = 0 to 1 in n_steps steps (equal ones by default; models/time.py):
  - "ancestral": DDPM, draws z_s ~ q(z_s | z_t, x1 = x1_hat) at every step (stochastic);
  - "ode": DDIM with eta = 0, the deterministic probability-flow path through the same predictions.
The last step returns the prediction of the clean sample itself (EDM's p(x | z_0) without noise).

The contract every process keeps is in models/process.py; what the molecule processes share in
models/molecule_process.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from models.geometry import remove_mean
from models.molecule_process import MoleculeProcess, per_molecule_loss


def polynomial_schedule(t: torch.Tensor, precision: float) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t of EDM's polynomial schedule at times t (any shape), in float64 for the samplers' ratios:
    alpha^2 = (1 - 2 s) (1 - (1 - t)^2)^2 + s, sigma^2 = 1 - alpha^2, s = precision."""
    tau = 1 - t.double()
    alpha_sq = (1 - 2 * precision) * (1 - tau ** 2) ** 2 + precision
    return alpha_sq.sqrt(), (1 - alpha_sq).sqrt()


def ddpm_posterior(a_t: float, s_t: float, a_s: float, s_s: float) -> tuple[float, float, float]:
    """DDPM's posterior q(x_s | x_t, x1) from time t to the less noisy s, as (c_t, c_x, std): its mean is
    c_t x_t + c_x x1 and its standard deviation std (alpha_{t|s} = a_t / a_s, sigma_{t|s}^2 = s_t^2 - alpha_{t|s}^2 s_s^2)."""
    a_ts = a_t / a_s
    var_ts = s_t ** 2 - a_ts ** 2 * s_s ** 2
    return a_ts * s_s ** 2 / s_t ** 2, a_s * var_ts / s_t ** 2, (var_ts * s_s ** 2 / s_t ** 2) ** 0.5


@dataclass
class DiffusionConfig:
    n_types: int = 5
    type_scale: float = 0.25  # one-hot types are scaled by this before noising (EDM's 0.25)
    type_loss_weight: float = 0.5  # weight of the atom-type cross-entropy against the coordinate loss
    schedule_precision: float = 1e-5  # s of the polynomial schedule: alpha^2 stays within [s, 1 - s]
    time_tilt: float = 0.0  # no effect: the epsilon loss is unweighted, so every tilt draws t uniformly (models/time.py)
    self_condition: bool = False  # the backbone also sees its last estimate (models/self_conditioning.py)
    condition_dropout: float = 0.0  # of a conditional model's training structures, the share seen without their condition


class Diffusion(MoleculeProcess):
    Config = DiffusionConfig
    SAMPLERS = ("ancestral", "ode")  # the first is sample.py's default
    CHECK_SAMPLER = "ancestral"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return polynomial_schedule(t, self.config.schedule_precision)

    def estimate(self, x, t, pos_out, logits, mask) -> dict[str, torch.Tensor]:
        """The clean molecule implied by the noise prediction pos_out: (x - sigma_t x0_hat) / alpha_t."""
        alpha, sigma = (a.float()[:, None, None] for a in self.alpha_sigma(t))
        return {"pos": (x - sigma * remove_mean(pos_out.float(), mask)) / alpha,
                "h": logits.float().softmax(-1) * self.config.type_scale * mask.unsqueeze(-1)}

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        z = self.noised(batch, noise)
        x0_hat, logits = self.training_outputs(model, z)
        return per_molecule_loss(((x0_hat.float() - z["x0"]) ** 2).sum(-1), logits, z["types"], z["mask"],
                                 self.config.type_loss_weight)

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0) -> dict[str, torch.Tensor]:
        """Denoise from t = 0 (noise) to t = 1 (data) on the time grid of `time_power` (models/time.py) for
        molecules of request["n_atoms"] [B] atoms."""
        self.check_sampling(method)
        mask, node, x, h, guidance = self.sampling_start(model, request, generator)
        B, device = len(mask), mask.device
        ts, alphas, sigmas = self.time_grid(n_steps, time_power)
        estimate = None
        for step in range(n_steps):
            a_t, s_t, a_s, s_s = (float(v) for v in (alphas[step], sigmas[step], alphas[step + 1], sigmas[step + 1]))
            x0_hat, logits = self.backbone(model, h, x, torch.full((B,), float(ts[step]), device=device), mask, estimate, **guidance)
            x0_hat = remove_mean(x0_hat.float(), mask)
            x1_hat = (x - s_t * x0_hat) / a_t
            h1_hat = logits.float().softmax(-1) * self.config.type_scale * node
            estimate = {"pos": x1_hat, "h": h1_hat}
            if step == n_steps - 1:  # t = 1: the prediction of the clean sample
                x, h = x1_hat, h1_hat
            elif method == "ode":  # DDIM: keep the predicted noise, move to the next noise level
                h0_hat = (h - a_t * h1_hat) / s_t
                x, h = a_s * x1_hat + s_s * x0_hat, a_s * h1_hat + s_s * h0_hat
            else:  # DDPM posterior q(z_s | z_t, x1_hat): mean c_t z_t + c_x x1_hat, std sqrt(var)
                c_t, c_x, std = ddpm_posterior(a_t, s_t, a_s, s_s)
                noise_x, noise_h = self.fresh_noise(mask, generator)
                x = c_t * x + c_x * x1_hat + std * noise_x
                h = c_t * h + c_x * h1_hat + std * noise_h
        return {"types": logits.argmax(-1) * mask, "pos": x * node, "mask": mask}
