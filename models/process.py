"""The contracts every generative model here is built from, written once: the backbone (one per geometry) and the
process (one base for molecules and crystals).

A backbone maps a noisy structure at time t to its outputs; a process corrupts data into noise, trains a backbone
to undo it and integrates the learned path back. Time runs from t = 0 (noise) to t = 1 (data) under every process,
so a backbone's time input means the same whichever process trains it.

Processes (models/molecule_process.py and models/crystal_process.py subclass `Process`):
    loss(model, batch, noise=None) -> scalar
    draw_noise(batch_size, n_max, generator, device) -> dict of prior samples and times for a global batch
    sample(model, request, n_steps, method, generator=None, **options) -> the padded samples
        request: {"n_atoms": [B]} (de novo), or {"types": [B, N], "mask": [B, N]} (the composition given:
        crystal structure prediction)
        options: only those the class lists in OPTIONS (time_power everywhere, anneal_slope for the crystal ODEs)
    SAMPLERS: the sampler names, sample.py's default first; CHECK_SAMPLER: the one train.py's periodic quality
        check uses
"""
from __future__ import annotations

from typing import Protocol

import torch

from models.time import TimeDistribution


class MoleculeBackbone(Protocol):
    """Euclidean geometry (models/egnn.py, transformer.py, pairformer.py).

    forward(h [B, N, T] noisy scaled one-hot types, pos [B, N, 3] A, t [B], mask [B, N] bool[, estimate, condition])
        -> (pos_out [B, N, 3] an equivariant vector per atom, 0 at padding; logits [B, N, T])
    estimate: with config.self_condition, the last estimate of the clean molecule {"pos", "h"} or None.
    condition: with config.n_conditions > 0, normalised properties [B, C] (NaN: dropped) or None (models/condition.py)."""

    config: object

    def __call__(self, h: torch.Tensor, pos: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                 estimate: dict | None = None, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


class CrystalBackbone(Protocol):
    """A lattice and fractional coordinates on the torus (models/crystal_backbones.py).

    forward(h [B, N, T], frac [B, N, 3], lengths [B, 3] A, angles [B, 3] degrees, t [B], mask [B, N] bool)
        -> (frac_out [B, N, 3] a centred tangent vector on the torus; lattice_out [B, 6]; logits [B, N, T])"""

    config: object

    def __call__(self, h: torch.Tensor, frac: torch.Tensor, lengths: torch.Tensor, angles: torch.Tensor,
                 t: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


class Process:
    """What every process shares: its config (at least n_types and time_tilt), the training-time distribution
    (models/time.py), and samplers and sampler options chosen by name. A subclass sets Config, SAMPLERS, OPTIONS,
    loss, draw_noise and sample, and time_weight(t) when its loss is weighted over t."""

    Config: type
    SAMPLERS: tuple[str, ...] = ()
    OPTIONS: tuple[str, ...] = ("time_power",)

    CHECK_SAMPLER: str = ""  # each class's own, as its check has always used (a run's curve stays comparable)

    def __init__(self, config):
        self.config = config
        self.times = TimeDistribution(self.time_weight, config.time_tilt)

    def time_weight(self, t: torch.Tensor) -> torch.Tensor:
        """The loss's weight over t [B] (what a uniform draw of t multiplies the error by): 1 here."""
        return torch.ones_like(t)

    def check_sampling(self, method: str, options=()) -> None:
        """Refuse a sampler or a sampler option this class does not have, naming the ones it has."""
        if method not in self.SAMPLERS:
            raise ValueError(f"unknown sampler {method!r} for {type(self).__name__}; choose one of {self.SAMPLERS}")
        if unknown := sorted(set(options) - set(self.OPTIONS)):
            raise ValueError(f"{type(self).__name__} has no sampler option {', '.join(unknown)}; its options are {self.OPTIONS}")

    def loss(self, model, batch: dict[str, torch.Tensor], noise: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None,
                   device="cpu") -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def sample(self, model, request: dict[str, torch.Tensor], n_steps: int, method: str,
               generator: torch.Generator | None = None, **options) -> dict[str, torch.Tensor]:
        raise NotImplementedError
