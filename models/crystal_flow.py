"""Flow matching for crystals (after FlowMM, Miller et al. 2024): fractional coordinates along torus
geodesics, the lattice and the atom types along straight lines. Two tasks, one class:
  - de novo generation: types, lattice and coordinates are all generated;
  - crystal structure prediction (csp=True): the composition is given, only lattice and coordinates are.

Paths, t = 0 prior and t = 1 data (the molecule processes' convention):
  - fractional coordinates: f0 ~ uniform on the torus, f_t = wrap(f0 + t d) with d = torus_difference(f1, f0),
    the shortest way round (models/geometry.py). The network predicts the remaining displacement to f1,
    target torus_difference(f1, f_t) = (1 - t) d, centred over the atoms: a common shift of every atom gives
    the same crystal, so only the relative motion is learnt (FlowMM does the same);
  - lattice: y, the standardised unconstrained lattice parameters (models/geometry.py), y0 ~ N(0, I),
    y_t = (1 - t) y0 + t y1; the network predicts y1 - y_t;
  - types (de novo): as for molecules, the one-hot vector times `type_scale`, Gaussian at t = 0, with a
    cross-entropy on the logits. For csp the clean one-hot types are the input at every t.
The loss is the velocity regression: the displacement errors weighted by 1 / (1 - t)^2 (capped as in
models/flow.py), fractional errors in units of the uniform distribution's spread (a variance of 1/12 per
component), so the coordinates and the standardised lattice weigh alike.

The interface every generative process has (models/process.py), for crystal batches:
    loss(model, batch, noise=None) -> scalar;  draw_noise(batch_size, n_max, generator) -> dict
    sample(model, n_atoms=None, types=None, mask=None, n_steps, method, generator)
        -> {"types", "frac", "lengths", "angles", "mask"}
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.geometry import LatticeScaler, remove_mean, torus_difference, wrap

UNIFORM_VARIANCE = 1 / 12  # variance of a component of a uniform point on the unit torus


@dataclass
class CrystalFlowConfig:
    n_types: int = 1
    csp: bool = False  # structure prediction: types given, not generated
    type_scale: float = 0.25
    type_loss_weight: float = 0.5
    lattice_loss_weight: float = 1.0
    min_one_minus_t: float = 0.05  # caps the velocity-loss weight 1 / (1 - t)^2 at 400
    lattice_mean: list = field(default_factory=lambda: [0.0] * 6)  # LatticeScaler of the training set
    lattice_std: list = field(default_factory=lambda: [1.0] * 6)


class CrystalFlowMatching:
    Config = CrystalFlowConfig
    SAMPLERS = ("heun", "euler")

    def __init__(self, config: CrystalFlowConfig):
        self.config = config
        self.scaler = LatticeScaler(config.lattice_mean, config.lattice_std)

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None,
                   device="cpu") -> dict[str, torch.Tensor]:
        """Prior samples and times for a global batch (DDP ranks slice rows)."""
        kw = dict(generator=generator, device=generator.device if generator is not None else device)
        return {"t": torch.rand(batch_size, **kw), "f0": torch.rand(batch_size, n_max, 3, **kw),
                "y0": torch.randn(batch_size, 6, **kw), "h0": torch.randn(batch_size, n_max, self.config.n_types, **kw)}

    def one_hot(self, types, mask):
        return F.one_hot(types, self.config.n_types).float() * self.config.type_scale * mask.unsqueeze(-1)

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        types, f1, mask = batch["types"], batch["frac"], batch["mask"]
        if noise is None:
            noise = self.draw_noise(*types.shape, device=f1.device)
        noise = {k: v.to(f1.device) for k, v in noise.items()}
        t, node = noise["t"], mask.unsqueeze(-1).float()
        f_t = wrap(noise["f0"] + t[:, None, None] * torus_difference(f1, noise["f0"])) * node
        y1 = self.scaler.normalise(batch["lengths"], batch["angles"])
        y_t = t[:, None] * y1 + (1 - t[:, None]) * noise["y0"]
        h1 = self.one_hot(types, mask)
        h_t = h1 if self.config.csp else (t[:, None, None] * h1 + (1 - t[:, None, None]) * noise["h0"]) * node
        lengths_t, angles_t = self.scaler.lattice(y_t)
        frac_out, lattice_out, logits = model(h_t, f_t, lengths_t, angles_t, t, mask)
        weight = (1 - t).clamp(min=self.config.min_one_minus_t).pow(-2)  # [B]
        target = remove_mean(torus_difference(f1, f_t), mask)
        n_real = mask.sum(1).clamp(min=1)
        frac_err = ((frac_out.float() - target) ** 2).sum(-1).mul(mask).sum(1) / (3 * n_real * UNIFORM_VARIANCE)
        lattice_err = ((lattice_out.float() - (y1 - y_t)) ** 2).mean(-1)
        per_crystal = weight * (frac_err + self.config.lattice_loss_weight * lattice_err)
        if not self.config.csp:
            ce = F.cross_entropy(logits.float().transpose(1, 2), types, reduction="none")
            per_crystal = per_crystal + self.config.type_loss_weight * (ce * mask).sum(1) / n_real
        return per_crystal.mean()

    @torch.no_grad()
    def sample(self, model, n_atoms: torch.Tensor | None = None, types: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, n_steps: int = 50, method: str = "heun",
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """De novo: n_atoms [B]; structure prediction: types [B, N] and mask [B, N] (the compositions)."""
        if method not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {method!r} for {type(self).__name__}; choose one of {self.SAMPLERS}")
        device = next(model.parameters()).device
        if self.config.csp:
            if types is None or mask is None:
                raise ValueError("a structure-prediction model samples for given compositions: pass types and mask")
            types, mask = types.to(device), mask.to(device)
        else:
            n_atoms = n_atoms.to(device)
            mask = torch.arange(int(n_atoms.max()), device=device)[None, :] < n_atoms[:, None]
        B, N = mask.shape
        node = mask.unsqueeze(-1).float()
        noise = {k: v.to(device) for k, v in self.draw_noise(B, N, generator, device=device).items()}
        f, y = noise["f0"] * node, noise["y0"]
        h = self.one_hot(types, mask) if self.config.csp else noise["h0"] * node

        def velocity(f, y, h, t: float):
            lengths, angles = self.scaler.lattice(y)
            frac_out, lattice_out, logits = model(h, f, lengths, angles, torch.full((B,), t, device=device), mask)
            vh = torch.zeros_like(h) if self.config.csp else \
                (logits.float().softmax(-1) * self.config.type_scale * node - h) / (1 - t)
            return remove_mean(frac_out.float(), mask) / (1 - t), lattice_out.float() / (1 - t), vh, logits

        ts = torch.linspace(0, 1, n_steps + 1).tolist()
        for t, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t
            vf, vy, vh, logits = velocity(f, y, h, t)
            if method == "heun" and t_next < 1:  # the corrector needs u at t_next, undefined at t = 1
                vf2, vy2, vh2, _ = velocity(wrap(f + dt * vf) * node, y + dt * vy, h + dt * vh, t_next)
                vf, vy, vh = (vf + vf2) / 2, (vy + vy2) / 2, (vh + vh2) / 2
            f, y, h = wrap(f + dt * vf) * node, y + dt * vy, h + dt * vh
        lengths, angles = self.scaler.lattice(y)
        out_types = types if self.config.csp else logits.argmax(-1) * mask
        return {"types": out_types, "frac": f, "lengths": lengths, "angles": angles, "mask": mask}
