"""What the molecule processes (models/molecule_flow.py, molecule_diffusion.py, molecule_interpolant.py) share.

All three corrupt data the same way, x_t = alpha_t x1 + sigma_t x0 (x0 Gaussian, coordinates with
zero centre of mass; types as continuous one-hot vectors times `type_scale`), with t = 0 pure noise
and t = 1 data. They differ in the schedule `alpha_sigma(t)`, in what the backbone predicts, in the
loss weight over t and in their samplers; this base class holds the rest: the noise draw, the noised
batch, the endpoint regression that flow matching and interpolants both train, and the sampler's
starting state. The contract every process keeps is in models/process.py.

Precision: train.py and sample.py call loss and sample under bf16 autocast on CUDA. Autocast only
changes matmul-like ops, and the processes do elementwise arithmetic, so the sampler state (x, h across
steps) and the loss arithmetic on coordinates stay float32. A backbone's outputs are float32 already
(models/precision.py); the processes still cast them (full(), .float()) before combining them with the
state, so a 16-bit output could never pull the state down to bf16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.condition import drop, guided
from models.geometry import remove_mean
from models.precision import full
from models.process import Process
from models.time import time_grid


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


BONDED = 2.0  # A: QM9's bonds are 0.96-1.6 A long; under 2 A the pairs are bonded or share an atom (H-C-H: 1.8 A)


def short_distance_error(x_hat: torch.Tensor, x1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error [B] of the predicted clean molecule's interatomic distances, over the pairs the data holds
    closer than BONDED: bonds and the short 1-3 distances that fix bond angles. Bond orders, and so stability, are
    read from these distances to a few hundredths of an angstrom, which the coordinate MSE, a sum over all atoms'
    absolute positions, weighs no more than any other error. x_hat, x1 [B, N, 3], mask [B, N]."""
    n = mask.shape[1]
    pairs = mask[:, :, None] & mask[:, None, :] & ~torch.eye(n, dtype=torch.bool, device=mask.device)
    d_true = ((x1[:, :, None] - x1[:, None]) ** 2).sum(-1).sqrt()
    pairs = pairs & (d_true < BONDED)
    d_hat = ((x_hat[:, :, None] - x_hat[:, None]) ** 2).sum(-1).add(1e-12).sqrt()  # the floor keeps sqrt's gradient finite
    return (((d_hat - d_true) ** 2) * pairs).sum((1, 2)) / pairs.sum((1, 2)).clamp(min=1)


class MoleculeProcess(Process):
    """Base class; a subclass sets Config, SAMPLERS, alpha_sigma(t) and sample, time_weight(t) when its coordinate
    loss is weighted over t, and loss and estimate() when its backbone predicts something other than the clean
    molecule. Its config has at least n_types, type_scale, type_loss_weight, time_tilt (models/time.py: training
    times drawn with density proportional to time_weight^tilt) and self_condition (models/self_conditioning.py); an
    endpoint-regression process's also distance_loss (the weight of short_distance_error beside the coordinates') and
    condition_dropout (models/condition.py: the share of a conditional model's training structures seen without
    their condition, which trains the unconditional model that guidance needs)."""

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None,
                   device="cpu") -> dict[str, torch.Tensor]:
        """Prior samples and times for a batch; drawn for the global batch so DDP ranks can slice rows."""
        kw = dict(generator=generator, device=generator.device if generator is not None else device)
        noise = {
            "t": self.times.draw(torch.rand(batch_size, **kw)),
            "x0": torch.randn(batch_size, n_max, 3, **kw),
            "h0": torch.randn(batch_size, n_max, self.config.n_types, **kw),
        }
        if self.config.self_condition:  # one coin for the global batch, a copy per row so that ranks can slice it
            noise["self_condition"] = torch.rand(1, **kw).expand(batch_size)
        if self.config.condition_dropout:  # which structures train without their condition
            noise["drop_condition"] = torch.rand(batch_size, **kw) < self.config.condition_dropout
        return noise

    def noised_types(self, h1: torch.Tensor, noise: dict, alpha: torch.Tensor, sigma: torch.Tensor, node: torch.Tensor) -> torch.Tensor:
        """The types at time t [B, N, T]: the scaled one-hot h1 on the coordinates' path from the Gaussian h0
        (alpha, sigma [B, 1, 1]; node [B, N, 1], 0 at padding)."""
        return (alpha * h1 + sigma * noise["h0"] * node) * node

    def couple(self, x0: torch.Tensor, x1: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The prior coordinates paired with x1; independent by default (flow matching's OT overrides it)."""
        return x0

    def noised(self, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The batch at its noise's times: t [B], x0 [B, N, 3] (centred, coupled), x_t, h_t, and the
        batch's types, x1 (= pos) and mask, all on the batch's device; and a conditional batch's condition [B, C],
        NaN in the rows the noise drops."""
        types, x1, mask = batch["types"], batch["pos"], batch["mask"]
        if noise is None:
            noise = self.draw_noise(*types.shape, device=x1.device)
        noise = {k: v.to(x1.device) for k, v in noise.items()}
        node = mask.unsqueeze(-1).to(x1.dtype)
        t = noise["t"]
        alpha, sigma = (a.to(x1.dtype)[:, None, None] for a in self.alpha_sigma(t))
        x0 = self.couple(remove_mean(noise["x0"], mask), x1, types, mask)
        h1 = F.one_hot(types, self.config.n_types).to(x1.dtype) * self.config.type_scale
        z = {"t": t, "x0": x0, "x_t": alpha * x1 + sigma * x0, "h_t": self.noised_types(h1, noise, alpha, sigma, node),
             "types": types, "x1": x1, "mask": mask, **({"coin": noise["self_condition"]} if "self_condition" in noise else {})}
        if "condition" in batch:
            z["condition"] = drop(batch["condition"], noise["drop_condition"]) if "drop_condition" in noise else batch["condition"]
        return z

    def estimate(self, x, t, pos_out, logits, mask) -> dict[str, torch.Tensor]:
        """The clean molecule the backbone's outputs at state x [B, N, 3], times t [B] imply: {"pos" [B, N, 3], "h"
        [B, N, T] expected scaled one-hot}. Here the outputs predict it (pos_out: its displacement from x)."""
        return {"pos": x + remove_mean(pos_out.float(), mask),
                "h": logits.float().softmax(-1) * self.config.type_scale * mask.unsqueeze(-1)}

    def backbone(self, model, h, x, t, mask, estimate=None, condition=None, guidance: float = 1.0):
        """The backbone at a state; a self-conditioned one also sees the estimate (None: zeros), a conditional one
        the condition [B, C] (normalised, NaN: dropped; None: all dropped), guided with weight `guidance` unless it
        is 1 (models/condition.py: 0 is the unconditional model)."""
        inputs = {"estimate": estimate} if self.config.self_condition else {}
        return guided(lambda c: model(h, x, t, mask, **inputs, **({} if c is None else {"condition": c})), condition, guidance)

    def training_outputs(self, model, z: dict[str, torch.Tensor]):
        """The backbone on a noised batch. Self-conditioned, on the batches whose coin is below 1/2, it first
        estimates the clean molecule without gradient and sees that estimate (models/self_conditioning.py)."""
        estimate, condition = None, z.get("condition")
        if self.config.self_condition and float(z["coin"][0]) < 0.5:
            with torch.no_grad():
                estimate = self.estimate(z["x_t"], z["t"], *self.backbone(model, z["h_t"], z["x_t"], z["t"], z["mask"],
                                                                          condition=condition), z["mask"])
        return self.backbone(model, z["h_t"], z["x_t"], z["t"], z["mask"], estimate, condition)

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The endpoint regression of flow matching and interpolants: the backbone predicts x1 (as a displacement
        from x_t), and its squared error is weighted by the process's velocity weight over the times' density."""
        z = self.noised(batch, noise)
        pos_out, logits = self.training_outputs(model, z)
        x1_hat = z["x_t"] + full(pos_out)
        weight = self.times.loss_weight(z["t"])[:, None]
        loss = per_molecule_loss(((x1_hat - z["x1"]) ** 2).sum(-1) * weight, logits, z["types"], z["mask"],
                                 self.config.type_loss_weight)
        if self.config.distance_loss:  # the same weight over t as the coordinates'
            loss = loss + self.config.distance_loss * (short_distance_error(x1_hat, z["x1"], z["mask"]) * weight[:, 0]).mean()
        return loss

    def sampling_start(self, model, request: dict, generator: torch.Generator | None):
        """The state at t = 0 for molecules of request["n_atoms"] [B] atoms: (mask [B, N], node [B, N, 1] float,
        x [B, N, 3] centred prior coordinates, h [B, N, T] prior types), on the model's device, and what backbone()
        takes of the request: a conditional request's "condition" [B, C] (normalised) and "guidance" (a float,
        default 1)."""
        if "n_atoms" not in request or not set(request) <= {"n_atoms", "condition", "guidance"}:
            raise ValueError(f"a molecule process samples for a request of atom counts and optionally a condition and its "
                             f"guidance ({{'n_atoms', 'condition', 'guidance'}}), not {set(request)}")
        device = next(model.parameters()).device
        guidance = {}
        if "condition" in request:
            guidance = {"condition": request["condition"].to(device), "guidance": float(request.get("guidance", 1.0))}
        n_atoms = request["n_atoms"].to(device)
        B, N = len(n_atoms), int(n_atoms.max())
        mask = torch.arange(N, device=device)[None, :] < n_atoms[:, None]
        node = mask.unsqueeze(-1).float()
        noise = self.draw_noise(B, N, generator, device=device)
        return mask, node, remove_mean(noise["x0"].to(device), mask), noise["h0"].to(device) * node, guidance

    def fresh_noise(self, mask: torch.Tensor, generator: torch.Generator | None):
        """New Gaussian noise for a stochastic sampler step: coordinates [B, N, 3] with zero centre of
        mass and types [B, N, T], both 0 at padding, on the mask's device."""
        B, N = mask.shape
        kw = dict(generator=generator, device=generator.device if generator is not None else mask.device)
        coords = remove_mean(torch.randn(B, N, 3, **kw).to(mask.device), mask)
        return coords, torch.randn(B, N, self.config.n_types, **kw).to(mask.device) * mask.unsqueeze(-1)

    def time_grid(self, n_steps: int, power: float = 1.0):
        """The sampler's n_steps + 1 times from 0 to 1 (models/time.py: equal steps at power 1, finer near the data
        at power > 1) with their alpha_t and sigma_t, in float64."""
        ts = time_grid(n_steps, power)
        return (ts, *self.alpha_sigma(ts))

