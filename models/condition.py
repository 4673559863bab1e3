"""Property-conditional generation: the condition a backbone sees, its normalisation, classifier-free guidance, and
the EDM protocol's two halves of the training split.

A condition is a vector of C properties per structure, normalised by the generator's training values ((value -
mean) / std), [B, C] float, NaN where a property is dropped. The backbone sees it as 2 C features beside the time:
the value (0 where dropped) and a flag (1 present, 0 dropped), so that a dropped property is an input of its own and
not a value of 0 (the mean). Training drops the whole condition of a structure at random (--condition-dropout),
which trains the unconditional model in the same weights: classifier-free guidance (Ho & Salimans 2022) then
samples with

    output = unconditional + w (conditional - unconditional)

for the backbone's coordinate and type outputs: w = 1 is the conditional model, w = 0 the unconditional one, and w
> 1 pushes further towards the condition.

The EDM protocol (Hoogeboom et al. 2022, section 4.2): the property's oracle, a regressor, trains on one half of the
training split and the conditional generator on the other, so that neither has seen the other's molecules: the
generator cannot reproduce molecules whose properties the oracle has memorised. The halves are a fixed permutation
of the split, the same on every machine.
"""
from __future__ import annotations

import numpy as np
import torch

HALVES_SEED = 1  # the permutation of the training split that cuts it into the generator's and the oracle's halves


def protocol_halves(n: int) -> dict[str, np.ndarray]:
    """{"generator": indices, "oracle": indices} into a training split of n structures: two disjoint halves that
    together cover it, fixed (seeded, independent of the machine), the generator's the first half of the
    permutation."""
    perm = np.random.RandomState(HALVES_SEED).permutation(n)
    return {"generator": np.sort(perm[: n // 2]), "oracle": np.sort(perm[n // 2:])}


def condition_features(condition: torch.Tensor | None, n_conditions: int, batch: int, dtype, device) -> torch.Tensor:
    """[B, C] normalised properties (NaN: dropped; None: all dropped) -> [B, 2 C]: the values (0 where dropped), then
    the flags (1 present, 0 dropped)."""
    if condition is None:
        return torch.zeros(batch, 2 * n_conditions, dtype=dtype, device=device)
    if condition.shape != (batch, n_conditions):
        raise ValueError(f"a condition of shape {tuple(condition.shape)} for a backbone of {n_conditions} properties "
                         f"and a batch of {batch}")
    present = ~torch.isnan(condition)
    return torch.cat([torch.where(present, condition, 0.0), present.to(condition.dtype)], dim=-1).to(dtype)


def drop(condition: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """The condition [B, C] with the rows where dropped [B] is True replaced by NaN (the unconditional input)."""
    return torch.where(dropped[:, None].to(condition.device), torch.full_like(condition, float("nan")), condition)


def guide(conditional: tuple, unconditional: tuple, guidance: float) -> tuple:
    """Classifier-free guidance of a backbone's outputs (each a tuple of tensors): u + w (c - u), in float32."""
    return tuple(u.float() + guidance * (c.float() - u.float()) for c, u in zip(conditional, unconditional))


def guided(run, condition: torch.Tensor | None, guidance: float) -> tuple:
    """A backbone's outputs under a condition [B, C] (None: unconditional) guided with weight w: run(condition or
    None) calls the backbone; w = 1 is one conditional pass, w = 0 one unconditional pass, other w both."""
    if condition is None or guidance == 1.0:
        return run(condition)
    unconditional = run(None)
    if guidance == 0.0:
        return unconditional
    return guide(run(condition), unconditional, guidance)


class Normalisation:
    """Per-property mean and standard deviation of the generator's training values, kept in the checkpoint."""

    def __init__(self, names: list[str], mean: list[float], std: list[float], units: list[str]):
        self.names, self.mean, self.std, self.units = list(names), np.asarray(mean, float), np.asarray(std, float), list(units)

    @classmethod
    def fit(cls, names: list[str], values: np.ndarray, units: list[str]) -> "Normalisation":
        """From values [S, C]; a property with no spread is refused with a DataError (it cannot condition anything,
        and its normalisation would divide by 0)."""
        from models.fileio import DataError

        std = values.std(0)
        flat = [n for n, s in zip(names, std) if not s > 0]
        if flat:
            raise DataError(f"the properties {flat} have one value in all {len(values)} training structures: nothing to "
                            "condition on or predict (more training structures: --n-train)")
        return cls(names, values.mean(0).tolist(), std.tolist(), units)

    def normalise(self, values) -> torch.Tensor:
        return torch.as_tensor((np.asarray(values, float) - self.mean) / self.std, dtype=torch.float32)

    def state(self) -> dict:
        return {"properties": self.names, "mean": self.mean.tolist(), "std": self.std.tolist(), "units": self.units}

    @classmethod
    def from_state(cls, state: dict) -> "Normalisation":
        return cls(state["properties"], state["mean"], state["std"], state["units"])


def time_and_condition(t: torch.Tensor, n_frequencies: int, condition: torch.Tensor | None, n_conditions: int) -> torch.Tensor:
    """What a backbone sees of a structure beside its atoms: the time features (models/time.py) and, for a
    backbone built for C > 0 properties, the condition's 2 C features; t [B] -> [B, 1 + 2 K + 2 C] in t's dtype. A
    backbone built without properties refuses a condition."""
    from models.time import time_features

    features = time_features(t, n_frequencies)
    if n_conditions == 0:
        if condition is not None:
            raise ValueError("a condition was passed to a backbone built without properties (n_conditions = 0)")
        return features
    return torch.cat([features, condition_features(condition, n_conditions, len(t), t.dtype, t.device)], dim=-1)


def conditioned_data(names: list[str], units: list[str], train, valid, half: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The properties of a conditional generator's or an oracle's training data: (normalised train [S, C], normalised
    valid [V, C], what the checkpoint keeps) for train and valid sets that have property_values(name) and n_atoms,
    train being the `half` ("generator" or "oracle") of the training split. The checkpoint keeps the normalisation
    and the half's (atom count, properties) pairs, which sample.py draws a generator's requests from as EDM's
    protocol does."""
    values = [np.stack([s.property_values(name) for name in names], 1) for s in (train, valid)]
    norm = Normalisation.fit(list(names), values[0], list(units))
    pairs = torch.cat([torch.from_numpy(np.asarray(train.n_atoms)).float()[:, None], torch.as_tensor(values[0], dtype=torch.float32)], 1)
    meta = {"condition": {**norm.state(), "half": half, "halves_seed": HALVES_SEED, "n_train": len(train)},
            "condition_pairs": pairs}
    return norm.normalise(values[0]), norm.normalise(values[1]), meta
