"""What the crystal generative processes (models/crystal_flow.py, crystal_diffusion.py, crystal_interpolant.py)
share, as models/process.py is for molecules.

A crystal state has three parts, each on its own space (models/geometry.py):
  - frac [B, N, 3]: fractional coordinates on the torus [0, 1)^3 (prior: uniform, or a wide wrapped normal);
  - y [B, 6]: the lattice as standardised unconstrained parameters, Euclidean (prior N(0, I));
  - h [B, N, T]: types as the one-hot vector times `type_scale`, Euclidean (prior N(0, I)), generated de novo,
    or given (structure prediction, `csp`): then the clean one-hot is the input at every time.
The processes differ in how they move frac and y from t = 0 (prior) to t = 1 (data) and in what the
backbone's outputs mean; the backbone contract is in models/crystal_backbones.py.

The contract every process keeps is in models/process.py; a crystal process's samples are
{"types", "frac", "lengths", "angles", "mask"}, and the ODE processes (flow, interpolant) also take the sampler
option anneal_slope (CrystalProcess.integrate).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.condition import drop, guided
from models.geometry import LatticeScaler, remove_mean, wrap
from models.process import Process
from models.time import time_grid

UNIFORM_VARIANCE = 1 / 12  # variance of a component of a uniform point on the unit torus


def per_atom_length_scale(mask: torch.Tensor) -> torch.Tensor:
    """[B, 1]: N^(1/3) of crystals with atoms `mask` [B, N], what lattice_per_atom divides their lengths by (the fit of
    the lattice statistics and the process alike)."""
    return mask.sum(1, keepdim=True).clamp(min=1).float().pow(1 / 3)


@dataclass
class CrystalProcessConfig:
    n_types: int = 1
    csp: bool = False  # structure prediction: types given, not generated
    type_scale: float = 0.25  # one-hot types are scaled by this before noising
    type_loss_weight: float = 0.5  # weight of the type cross-entropy (de novo)
    lattice_loss_weight: float = 1.0
    lattice_mean: list = field(default_factory=lambda: [0.0] * 6)  # LatticeScaler of the training set
    lattice_std: list = field(default_factory=lambda: [1.0] * 6)
    # The lengths are generated per atom, divided by N^(1/3) before standardising, so that a cell's volume follows
    # its atom count by construction instead of being learnt from it (off in checkpoints from before the option).
    lattice_per_atom: bool = False
    time_tilt: float = 0.0  # training times drawn with density proportional to time_weight^tilt (models/time.py)
    condition_dropout: float = 0.0  # of a conditional model's training crystals, the share seen without their condition


class CrystalProcess(Process):
    """Base class; a subclass sets Config, SAMPLERS, loss and sample, and time_weight(t) when its loss is weighted
    over t."""

    def __init__(self, config):
        super().__init__(config)
        self.scaler = LatticeScaler(config.lattice_mean, config.lattice_std)

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None,
                   device="cpu") -> dict[str, torch.Tensor]:
        """Prior samples and times for a global batch (DDP ranks slice rows): t [B], f0 [B, N, 3] uniform on the
        torus, y0 [B, 6], h0 [B, N, T] and z [B, N, 3] (Gaussian; the processes that need noise on the torus
        take it from here)."""
        kw = dict(generator=generator, device=generator.device if generator is not None else device)
        noise = {"t": self.times.draw(torch.rand(batch_size, **kw)), "f0": torch.rand(batch_size, n_max, 3, **kw),
                 "y0": torch.randn(batch_size, 6, **kw), "h0": torch.randn(batch_size, n_max, self.config.n_types, **kw),
                 "z": torch.randn(batch_size, n_max, 3, **kw)}
        if self.config.condition_dropout:  # which crystals train without their condition (models/condition.py)
            noise["drop_condition"] = torch.rand(batch_size, **kw) < self.config.condition_dropout
        return noise

    def length_scale(self, mask: torch.Tensor) -> torch.Tensor:
        """[B, 1]: what the lengths of crystals with atoms `mask` [B, N] are divided by before standardising: N^(1/3)
        with lattice_per_atom, else 1."""
        return per_atom_length_scale(mask) if self.config.lattice_per_atom else torch.ones(len(mask), 1, device=mask.device)

    def normalised_lattice(self, lengths: torch.Tensor, angles: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Lengths [B, 3] (A) and angles [B, 3] (degrees) -> the standardised lattice y [B, 6] the process moves."""
        return self.scaler.normalise(lengths / self.length_scale(mask).to(lengths.dtype), angles)

    def lattice(self, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The standardised lattice y [B, 6] of crystals with atoms `mask` [B, N] -> (lengths [B, 3] A, angles [B, 3])."""
        lengths, angles = self.scaler.lattice(y)
        return lengths * self.length_scale(mask).to(lengths.dtype), angles

    def one_hot(self, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.one_hot(types, self.config.n_types).float() * self.config.type_scale * mask.unsqueeze(-1)

    def data(self, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None):
        """(types, f1, y1, h1, mask, node, noise on the batch's device, condition) of a training batch; the condition
        [B, C] of a conditional batch (NaN in the rows the noise drops), else None."""
        types, f1, mask = batch["types"], batch["frac"], batch["mask"]
        if noise is None:
            noise = self.draw_noise(*types.shape, device=f1.device)
        noise = {k: v.to(f1.device) for k, v in noise.items()}
        y1 = self.normalised_lattice(batch["lengths"], batch["angles"], mask)
        condition = batch.get("condition")
        if condition is not None and "drop_condition" in noise:
            condition = drop(condition, noise["drop_condition"])
        return types, f1, y1, self.one_hot(types, mask), mask, mask.unsqueeze(-1).float(), noise, condition

    def forward(self, model, h, f, y, t, mask, condition=None, guidance: float = 1.0):
        """The backbone on a state: lattice given as standardised y, converted to lengths and angles here; a
        conditional one also sees the condition [B, C] (None: dropped), guided with weight `guidance` unless it is 1
        (models/condition.py)."""
        lengths, angles = self.lattice(y, mask)
        return guided(lambda c: model(h, f, lengths, angles, t, mask, **({} if c is None else {"condition": c})), condition, guidance)

    def type_loss(self, logits, types, mask) -> torch.Tensor:
        """Per-crystal mean cross-entropy of the type logits, times type_loss_weight; 0 for csp. [B]"""
        if self.config.csp:
            return torch.zeros(len(types), device=types.device)
        ce = F.cross_entropy(logits.float().transpose(1, 2), types, reduction="none")
        return self.config.type_loss_weight * (ce * mask).sum(1) / mask.sum(1).clamp(min=1)

    def sampling_start(self, model, request, generator):
        """The prior state: (types or None, mask, node, noise dict, h), on the model's device, and what forward()
        takes of the request. De novo takes the request {"n_atoms": [B]}, a conditional model's optionally with
        "condition" [B, C] (normalised) and "guidance" (a float, default 1); structure prediction {"types": [B, N],
        "mask": [B, N]}."""
        device = next(model.parameters()).device
        want = {"types", "mask"} if self.config.csp else {"n_atoms"}
        if not (set(request) == want or not self.config.csp and want <= set(request) <= want | {"condition", "guidance"}):
            raise ValueError(f"a {'structure-prediction' if self.config.csp else 'de novo'} crystal model samples for a "
                             f"request of {sorted(want)}{'' if self.config.csp else ' (and a condition, its guidance)'}, "
                             f"not {sorted(request)}")
        guidance = {}
        if "condition" in request:
            guidance = {"condition": request["condition"].to(device), "guidance": float(request.get("guidance", 1.0))}
        types = None
        if self.config.csp:
            types, mask = request["types"].to(device), request["mask"].to(device)
        else:
            n_atoms = request["n_atoms"].to(device)
            mask = torch.arange(int(n_atoms.max()), device=device)[None, :] < n_atoms[:, None]
        node = mask.unsqueeze(-1).float()
        noise = {k: v.to(device) for k, v in self.draw_noise(*mask.shape, generator, device=device).items()}
        h = self.one_hot(types, mask) if self.config.csp else noise["h0"] * node
        return types, mask, node, noise, h, guidance

    def integrate(self, model, request, n_steps: int, heun: bool, generator, rates, time_power: float = 1.0,
                  anneal_slope: float = 0.0):
        """Integrate an ODE from the prior at t = 0 to t = 1 on the torus over the time grid of time_power
        (models/time.py), by Euler, or Heun with an Euler last step (where the types' velocity is undefined).
        rates(frac_out, lattice_out, t) -> the coordinates' and the lattice's velocities from the backbone's centred
        outputs; types move towards their prediction.

        anneal_slope c > 0 is FlowMM's inference anti-annealing: the coordinates' velocity is multiplied by 1 + c t,
        so atoms settle onto their predicted sites earlier and the late steps refine rather than move them. The
        factor is capped at (1 - t) / dt, where a step would carry the coordinates past the end of the path."""
        types, mask, node, noise, h, guidance = self.sampling_start(model, request, generator)
        f, y = noise["f0"] * node, noise["y0"]

        def velocity(f, y, h, t: float):
            frac_out, lattice_out, logits = self.forward(model, h, f, y, torch.full((len(mask),), t, device=mask.device), mask,
                                                         **guidance)
            vh = torch.zeros_like(h) if self.config.csp else \
                (logits.float().softmax(-1) * self.config.type_scale * node - h) / (1 - t)
            return *rates(remove_mean(frac_out.float(), mask), lattice_out.float(), t), vh, logits

        ts = time_grid(n_steps, time_power, torch.float32).tolist()  # float32, as the grid always was here
        for t, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t
            vf, vy, vh, logits = velocity(f, y, h, t)
            if heun and t_next < 1:
                vf2, vy2, vh2, _ = velocity(wrap(f + dt * vf) * node, y + dt * vy, h + dt * vh, t_next)
                vf, vy, vh = (vf + vf2) / 2, (vy + vy2) / 2, (vh + vh2) / 2
            vf = vf * min(1 + anneal_slope * t, max(1.0, (1 - t) / dt))
            f, y, h = wrap(f + dt * vf) * node, y + dt * vy, h + dt * vh
        return self.result(types, logits, f, y, mask)

    def result(self, types, logits, f, y, mask) -> dict[str, torch.Tensor]:
        lengths, angles = self.lattice(y, mask)
        out_types = types if self.config.csp else logits.argmax(-1) * mask
        return {"types": out_types, "frac": f, "lengths": lengths, "angles": angles, "mask": mask}
