"""Backbones and generative processes, picked by name (train.py --arch / --gen)."""
from models.diffusion import Diffusion
from models.flow import FlowMatching
from models.gnn import EGNN
from models.interpolant import StochasticInterpolant
from models.pairformer import Pairformer
from models.transformer import Transformer

ARCHS = {"gnn": EGNN, "transformer": Transformer, "pairformer": Pairformer}
PROCESSES = {"flow": FlowMatching, "diffusion": Diffusion, "interpolant": StochasticInterpolant}
