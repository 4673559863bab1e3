"""The property oracle of EDM's conditional protocol: a regressor of a domain's properties, trained on the oracle's
half of the training split (models/condition.py) to judge structures a conditional generator made for the other half.

EDM's oracle (after Satorras et al. 2021's QM9 property networks) is an EGNN over the atom types and coordinates,
its atom features summed over the molecule and read out by an MLP, trained with an L1 loss on the normalised
property. Here one network may predict several properties at once (one output each); evaluate.py reports each
property's own error. The regressor sees no time, no noise and no condition: it is a plain invariant function of
the structure. Crystals use the same protocol with the crystal GNN's periodic embedding and message passing
(models/crystal_backbones.py), its atom features averaged over the cell.

    forward(batch) -> [B, C] normalised properties; batch: a padded molecule batch {types [B, N] long, pos [B, N, 3],
    mask [B, N]} (models/molecules.py), or a crystal batch {types, frac, lengths, angles, mask} (models/crystals.py)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.crystal_backbones import MessagePassingBlock, PeriodicConfig, PeriodicEmbedding
from models.egnn import EquivariantLayer, pairwise
from models.geometry import remove_mean


@dataclass
class OracleConfig:
    n_types: int = 5
    n_outputs: int = 1  # properties predicted
    hidden: int = 128
    n_layers: int = 7  # EDM's property network
    coords_range: float = 15.0
    aggregation_norm: float = 1.0


class PropertyRegressor(nn.Module):
    Config = OracleConfig

    def __init__(self, config: OracleConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.n_types, config.hidden)
        self.layers = nn.ModuleList(EquivariantLayer(config.hidden, config.coords_range, config.aggregation_norm)
                                    for _ in range(config.n_layers))
        self.atom_out = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.hidden))
        self.molecule_out = nn.Sequential(nn.Linear(config.hidden, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.n_outputs))

    def forward(self, batch: dict) -> torch.Tensor:
        types, pos, mask = batch["types"], batch["pos"], batch["mask"]
        node = mask.unsqueeze(-1).to(pos.dtype)
        pos = remove_mean(pos, mask)
        eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
        edge_mask = (mask.unsqueeze(2) & mask.unsqueeze(1) & ~eye).to(pos.dtype)
        fixed = pairwise(pos)[1].unsqueeze(-1)
        x = self.embed(F.one_hot(types, self.config.n_types).to(pos.dtype)) * node
        for layer in self.layers:
            x, pos = layer(x, pos, fixed, edge_mask, mask)
            x = x * node
        return self.molecule_out((self.atom_out(x) * node).sum(1))


@dataclass
class CrystalOracleConfig(PeriodicConfig):
    n_outputs: int = 1  # properties predicted
    n_layers: int = 4


class CrystalPropertyRegressor(nn.Module):
    """The crystal GNN's embedding (at t = 1: clean one-hot types) and message-passing blocks, the atom features
    averaged over the cell and read out by an MLP: invariant to rotations, periodic translations, permutations."""
    Config = CrystalOracleConfig

    def __init__(self, config: CrystalOracleConfig):
        super().__init__()
        self.config = config
        self.embed = PeriodicEmbedding(config)
        self.blocks = nn.ModuleList(MessagePassingBlock(config) for _ in range(config.n_layers))
        self.out = nn.Sequential(nn.LayerNorm(config.hidden), nn.Linear(config.hidden, config.hidden), nn.SiLU(),
                                 nn.Linear(config.hidden, config.n_outputs))

    def forward(self, batch: dict) -> torch.Tensor:
        mask = batch["mask"]
        node = mask.unsqueeze(-1).float()
        h = F.one_hot(batch["types"], self.config.n_types).float() * node
        t = torch.ones(len(mask), device=mask.device)
        s, z, _ = self.embed(h, batch["frac"], batch["lengths"], batch["angles"], t, mask)
        for block in self.blocks:
            s, z = block(s, z, mask)
        return self.out((s.float() * node).sum(1) / node.sum(1).clamp(min=1))


@dataclass
class OracleObjectiveConfig:
    """The loss of the normalised properties: L1, as EDM's property networks train."""
    n_outputs: int = 1


class OracleObjective:
    """What train.py's loop calls: no noise to draw, and the mean absolute error of the normalised properties."""
    Config = OracleObjectiveConfig

    def __init__(self, config: OracleObjectiveConfig):
        self.config = config

    def draw_noise(self, batch_size: int, n_max: int, generator=None, device="cpu") -> dict:
        return {}

    def loss(self, model, batch: dict, noise: dict | None = None) -> torch.Tensor:
        return (model(batch).float() - batch["condition"]).abs().mean()


REGRESSORS = {"molecules": PropertyRegressor, "crystals": CrystalPropertyRegressor}  # by the checkpoint's domain


def build_oracle(ckpt: dict, weights: str = "ema"):
    """(regressor, OracleObjective) from a --task oracle checkpoint."""
    from models.checkpoint import _load_weights, config_from_dict

    cls = REGRESSORS[ckpt.get("domain", "molecules")]
    model = _load_weights(cls(config_from_dict(cls.Config, ckpt["model_config"])), ckpt, weights, "oracle")
    return model, OracleObjective(config_from_dict(OracleObjectiveConfig, ckpt["objective_config"]))
