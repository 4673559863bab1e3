"""Backbones and generative processes, picked by name (train.py --arch / --gen)."""
from models.flow import FlowMatching
from models.gnn import EGNN

ARCHS = {"gnn": EGNN}
PROCESSES = {"flow": FlowMatching}
