"""Backbones and generative processes, picked by name (train.py --arch / --gen).

ARCHS and PROCESSES (name -> class) are imported on first use, so the scripts can check their flags, and modules
of this package that need no torch (models.labels, models.fileio) can be used, without importing torch."""
from importlib import import_module

_ARCHS = {"gnn": "models.gnn:EGNN", "transformer": "models.transformer:Transformer", "pairformer": "models.pairformer:Pairformer"}
_PROCESSES = {"flow": "models.flow:FlowMatching", "diffusion": "models.diffusion:Diffusion",
              "interpolant": "models.interpolant:StochasticInterpolant"}
ARCH_NAMES, PROCESS_NAMES = tuple(_ARCHS), tuple(_PROCESSES)


def _load(registry: dict[str, str]) -> dict:
    return {name: getattr(import_module(path.split(":")[0]), path.split(":")[1]) for name, path in registry.items()}


def __getattr__(name: str):
    if name not in ("ARCHS", "PROCESSES"):
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    globals().update(ARCHS=_load(_ARCHS), PROCESSES=_load(_PROCESSES))
    return globals()[name]
