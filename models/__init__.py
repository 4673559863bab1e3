"""Backbones and generative processes, picked by domain and name (train.py --data, --arch, --gen).

Each domain has its own classes behind the same names: the molecule backbones and processes work on
Euclidean coordinates, the crystal ones on a lattice and fractional coordinates on the torus
(models/geometry.py). ARCHS and PROCESSES are the molecule registries, CRYSTAL_ARCHS and CRYSTAL_PROCESSES
the crystal ones (name -> class); `arch_class` and `process_class` pick by domain. Classes are imported on
first use, so the scripts can check their flags, and modules of this package that need no torch
(models.labels, models.fileio) can be used, without importing torch."""
from importlib import import_module

DOMAINS = ("molecules", "crystals")
CRYSTAL_DATA = ("perov5", "carbon24", "mp20")  # the CDVAE sets models/crystals.py loads
_ARCHS = {"gnn": "models.egnn:EGNN", "transformer": "models.transformer:Transformer", "pairformer": "models.pairformer:Pairformer"}
_PROCESSES = {"flow": "models.molecule_flow:FlowMatching", "diffusion": "models.molecule_diffusion:Diffusion",
              "interpolant": "models.molecule_interpolant:StochasticInterpolant"}
_CRYSTAL_ARCHS = {"gnn": "models.crystal_backbones:PeriodicGNN", "transformer": "models.crystal_backbones:PeriodicTransformer",
                  "pairformer": "models.crystal_backbones:PeriodicPairformer"}
_CRYSTAL_PROCESSES = {"flow": "models.crystal_flow:CrystalFlowMatching", "diffusion": "models.crystal_diffusion:CrystalDiffusion",
                      "interpolant": "models.crystal_interpolant:CrystalInterpolant"}
ARCH_NAMES, PROCESS_NAMES = tuple(_ARCHS), tuple(_PROCESSES)
# train.py's backbone defaults per domain where the classes' own differ: the recipe ablation's winners for molecules
# (README); crystals were not ablated. scale.py matches parameter counts with them.
RECIPE_DEFAULTS = {"molecules": {"time_frequencies": 6, "self_condition": True}, "crystals": {"time_frequencies": 0}}
_REGISTRIES = {"ARCHS": _ARCHS, "PROCESSES": _PROCESSES, "CRYSTAL_ARCHS": _CRYSTAL_ARCHS, "CRYSTAL_PROCESSES": _CRYSTAL_PROCESSES}


def _load(registry: dict[str, str]) -> dict:
    return {name: getattr(import_module(path.split(":")[0]), path.split(":")[1]) for name, path in registry.items()}


def __getattr__(name: str):
    if name not in _REGISTRIES:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    globals()[name] = _load(_REGISTRIES[name])
    return globals()[name]


def arch_class(domain: str, name: str):
    return (__getattr__("ARCHS") if domain == "molecules" else __getattr__("CRYSTAL_ARCHS"))[name]


def process_class(domain: str, name: str):
    return (__getattr__("PROCESSES") if domain == "molecules" else __getattr__("CRYSTAL_PROCESSES"))[name]
