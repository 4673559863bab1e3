"""Conditional flow matching for 3D molecules: coordinates and atom types on one straight path.

x_t = (1 - t) x0 + t x1 for t in [0, 1], with x0 from the prior and x1 from the data:
  - coordinates: x0 ~ N(0, I) projected to zero centre of mass (the subspace the data lives in, so
    the learned flow is translation invariant), optionally aligned to x1 by equivariant optimal
    transport (permutation within each element, then the Kabsch rotation);
  - atom types: a continuous formulation by default. x1 is the one-hot type vector times `type_scale`, x0 is
    Gaussian. Continuous types share the coordinates' path, prior and ODE solver, so one sampler
    integrates both and the same loss/sample interface carries over to diffusion and interpolants;
    the small scale (0.25, as in EDM) makes types resolve late, after the geometry has formed.
    With discrete_types (train.py --discrete-types), a discrete flow instead, the masking path of Campbell et
    al.'s discrete flow models that SemlaFlow and FlowMol build on: at time t each atom shows its type with
    probability t and no type otherwise (a zero vector, which no real type's one-hot is), and the sampler is the
    path's continuous-time Markov chain: between t and t' a still hidden atom is revealed with probability
    (t' - t) / (1 - t), its type drawn from the network's p(type | x_t). The network, its type cross-entropy and
    the coordinates are unchanged; only what the types look like at time t, and how the sampler moves them, differ.

The network predicts the endpoint x1 (coordinates directly, types as logits whose softmax is the
expected one-hot); the velocity is u_t = (x1_hat - x_t) / (1 - t). The coordinate loss is the standard
CFM regression of that velocity onto x1 - x0, i.e. the x1 error weighted by 1 / (1 - t)^2 (capped at
t = 1 - min_one_minus_t). Unweighted x1 errors are dominated by the irreducible error at small t and
leave the fine geometry at late t, which bond-based stability depends on, nearly untrained (measured:
atom stability 35 % unweighted vs 48 % weighted after 600 steps of the same model).

The contract every process keeps is in models/process.py; what the molecule processes share (this loss among
it) in models/molecule_process.py.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.geometry import remove_mean
from models.molecule_process import MoleculeProcess
from models.time import time_grid


@dataclass
class FlowConfig:
    n_types: int = 5
    type_scale: float = 0.25  # one-hot types are scaled by this before noising
    type_loss_weight: float = 0.5  # weight of the atom-type cross-entropy against the coordinate MSE
    ot_align: bool = False  # equivariant OT alignment of prior and data coordinates
    min_one_minus_t: float = 0.05  # caps the velocity-loss weight 1 / (1 - t)^2 at 400
    time_tilt: float = 0.0  # training times drawn with density proportional to that weight^tilt (models/time.py)
    self_condition: bool = False  # the backbone also sees its last estimate (models/self_conditioning.py)
    condition_dropout: float = 0.0  # of a conditional model's training structures, the share seen without their condition
    distance_loss: float = 0.0  # weight of the predicted molecule's short-distance error (molecule_process.py)
    discrete_types: bool = False  # types on the masking path of discrete flow matching (module docstring)


def kabsch_rotation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Proper rotation R (det +1) minimising |x R - y|^2 for centred point sets x, y [n, 3]."""
    u, _, vt = np.linalg.svd(x.T @ y)
    d = np.sign(np.linalg.det(u @ vt))
    return u @ np.diag([1.0, 1.0, d]) @ vt


def align_prior(x0: torch.Tensor, x1: torch.Tensor, types: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Equivariant OT: re-pair prior atoms with data atoms of the same element, then rotate the prior.

    Permuting i.i.d. prior points and rotating an isotropic Gaussian leave the prior's distribution
    unchanged, so the aligned x0 is still a prior sample, only closer to its x1 (straighter paths).
    x0, x1 [B, N, 3] centred; types [B, N]; mask [B, N]. Runs on the CPU (B small Hungarian problems).
    """
    from scipy.optimize import linear_sum_assignment  # imported here: only --ot-align needs scipy

    x0_np, x1_np = x0.detach().cpu().double().numpy(), x1.detach().cpu().double().numpy()
    types_np, mask_np = types.cpu().numpy(), mask.cpu().numpy()
    out = x0_np.copy()
    for b in range(x0_np.shape[0]):
        n = int(mask_np[b].sum())
        a, d, ty = x0_np[b, :n], x1_np[b, :n], types_np[b, :n]
        paired = np.empty_like(a)
        for element in np.unique(ty):
            idx = np.flatnonzero(ty == element)
            cost = ((a[idx, None, :] - d[None, idx, :]) ** 2).sum(-1)
            rows, cols = linear_sum_assignment(cost)
            paired[idx[cols]] = a[idx[rows]]
        out[b, :n] = paired @ kabsch_rotation(paired, d)
    return torch.from_numpy(out).to(x0)


class FlowMatching(MoleculeProcess):
    Config = FlowConfig
    SAMPLERS = ("heun", "euler")  # the first is sample.py's default
    CHECK_SAMPLER = "euler"  # one evaluation a step

    @staticmethod
    def alpha_sigma(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t = alpha_t x1 + sigma_t x0: the straight path, alpha_t = t and sigma_t = 1 - t."""
        return t, 1 - t

    def time_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The velocity-matching weight 1 / (1 - t)^2 of the x1 error, capped at t = 1 - min_one_minus_t."""
        return (1 - t).clamp(min=self.config.min_one_minus_t).pow(-2)

    def couple(self, x0, x1, types, mask):
        return align_prior(x0, x1, types, mask) if self.config.ot_align else x0

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None, device="cpu") -> dict:
        """The molecule processes' noise; with discrete types also "reveal" [B, N] uniform: an atom shows its type at
        time t when its draw is below t."""
        noise = super().draw_noise(batch_size, n_max, generator, device)
        if self.config.discrete_types:
            noise["reveal"] = torch.rand(batch_size, n_max, generator=generator,
                                         device=generator.device if generator is not None else device)
        return noise

    def noised_types(self, h1, noise, alpha, sigma, node):
        if not self.config.discrete_types:
            return super().noised_types(h1, noise, alpha, sigma, node)
        shown = (noise["reveal"] < alpha[:, :, 0]).unsqueeze(-1).to(h1.dtype)  # alpha_t = t
        return h1 * shown * node

    def reveal(self, logits, types, shown, t: float, t_next: float, mask, generator):
        """One step of the masked types' Markov chain from t to t_next: each hidden real atom is revealed with
        probability (t_next - t) / (1 - t) (1 at t_next = 1), its type drawn from softmax(logits) [B, N, T].
        types [B, N] long, shown [B, N] bool -> (types, shown, h [B, N, T] the scaled one-hot of the shown atoms)."""
        B, N, T = logits.shape
        kw = dict(generator=generator, device=generator.device if generator is not None else logits.device)
        revealed = (torch.rand(B, N, **kw).to(mask.device) < (t_next - t) / (1 - t)) & mask & ~shown
        drawn = torch.multinomial(logits.float().softmax(-1).reshape(B * N, T).to(kw["device"]), 1, generator=generator)
        types = torch.where(revealed, drawn.view(B, N).to(mask.device), types)
        shown = shown | revealed
        h = torch.nn.functional.one_hot(types, T).float() * self.config.type_scale * shown.unsqueeze(-1)
        return types, shown, h

    @torch.no_grad()
    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, time_power: float = 1.0) -> dict[str, torch.Tensor]:
        """Integrate the learned ODE from t=0 to 1 on the time grid of `time_power` (models/time.py) for molecules of
        request["n_atoms"] [B] atoms; Euler or Heun (2nd order).

        Heun's corrector needs u at t + dt, which is undefined at t = 1 (division by 1 - t), so the last
        step is an Euler step; with x1 prediction that step lands exactly on the predicted endpoint.
        """
        self.check_sampling(method)
        mask, node, x, h, guidance = self.sampling_start(model, request, generator)
        discrete = self.config.discrete_types
        if discrete:  # every atom starts hidden: no type
            h, types, shown = torch.zeros_like(h), torch.zeros_like(mask, dtype=torch.long), torch.zeros_like(mask)

        def velocity(x, h, t: float, estimate):
            """The velocities at (x, h, t) and the logits and estimate they come from."""
            tt = torch.full((len(x),), t, device=x.device)
            pos_out, logits = self.backbone(model, h, x, tt, mask, estimate, **guidance)
            estimate = self.estimate(x, tt, pos_out, logits, mask)
            return remove_mean(pos_out.float(), mask) / (1 - t), (estimate["h"] - h) * node / (1 - t), logits, estimate

        ts, estimate = time_grid(n_steps, time_power, torch.float32).tolist(), None  # float32, as the grid always was here
        for t, t_next in zip(ts[:-1], ts[1:]):
            dt = t_next - t
            vx, vh, logits, estimate = velocity(x, h, t, estimate)
            if discrete:
                types, shown, h_next = self.reveal(logits, types, shown, t, t_next, mask, generator)
            else:
                h_next = h + dt * vh
            if method == "heun" and t_next < 1:  # the corrector: the velocities at the predicted state at t_next
                vx2, vh2, _, estimate = velocity(x + dt * vx, h_next, t_next, estimate)
                vx = (vx + vx2) / 2
                if not discrete:
                    h_next = h + dt * ((vh + vh2) / 2)
            x, h = x + dt * vx, h_next
        # Continuous types: after the last step h equals the predicted expected one-hot; the argmax of the last
        # logits is the same decision without the scale. Discrete ones: every atom was revealed at t = 1.
        return {"types": (types if discrete else logits.argmax(-1)) * mask, "pos": x * node, "mask": mask}
