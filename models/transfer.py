"""Transfer between molecules and crystals: a new model starts from another run's weights wherever the two domains'
backbones are the same network (train.py --init-trunk).

The Transformer and the Pairformer run one trunk in both domains (models/transformer.py, pairformer.py and
crystal_backbones.py build it from the same blocks), and their heads share the pair-weight MLP of the equivariant
displacement and the type head. What is the domain's own stays new: the geometry embeddings (Euclidean distances
for molecules; fractional-coordinate Fourier features, minimum-image distances and the cell for crystals), the time
and condition inputs, and the crystal heads of the lattice and of each atom's own shift. Atom types go by element:
the two vocabularies are subsets of one periodic table, so an element both know (C, H, N, O, F between QM9 and
perov-5) keeps its type embedding column and type-logit row, and the others start new.

The GNNs are two networks: the molecule EGNN moves coordinates inside its layers and reads distances only, while
the crystal GNN is CSPNet-style message passing over pair features. Sharing them would take a molecule GNN built
on the crystal one's blocks, a new backbone whose own quality would first have to be measured; it is not built.
"""
from __future__ import annotations

import torch

SHARED_ARCHS = ("transformer", "pairformer")
SHARED_PREFIXES = ("blocks.", "embed.pair_from_atoms.", "head.pair_from_atoms.", "head.weight.", "head.types.0.")
TYPE_COLUMNS = "embed.atom.weight"  # [hidden, inputs]: the first n_types inputs are the atom's type vector
TYPE_ROWS = ("head.types.1.weight", "head.types.1.bias")  # [n_types, ...]: one logit per type


class TransferError(ValueError):
    """A source whose weights do not fit the new model: train.py exits with the message."""


def transfer_weights(source_ckpt: dict, source_path, model: torch.nn.Module, arch: str, symbols: list[str]) -> str:
    """Copy into `model` (a new `arch` backbone whose type vocabulary is `symbols`) the shared weights of the source
    checkpoint's EMA model; returns what was copied, for the log. Raises TransferError naming the source and the
    first tensor that does not fit, with the flags that would make it fit."""
    from models.checkpoint import build_model

    if source_ckpt["arch"] != arch or arch not in SHARED_ARCHS:
        raise TransferError(f"{source_path} is a {source_ckpt['arch']} and this run a {arch}: only the "
                            f"{' and '.join(SHARED_ARCHS)} share a trunk between molecules and crystals, each with itself "
                            "(models/transfer.py)")
    source = build_model(source_ckpt)[0].state_dict()
    target = model.state_dict()
    config = source_ckpt["model_config"]
    fits = f"give the trunk's size (--hidden {config['hidden']} --n-layers {config['n_layers']})"
    copied = 0
    for name, tensor in target.items():
        if not name.startswith(SHARED_PREFIXES):
            continue
        if name not in source or source[name].shape != tensor.shape:
            raise TransferError(f"{source_path}: its {name} is {tuple(source[name].shape) if name in source else 'absent'}, this "
                                f"model's {tuple(tensor.shape)}: {fits}")
        target[name] = source[name].clone()
        copied += tensor.numel()
    if extra := [k for k in source if k.startswith(SHARED_PREFIXES) and k not in target]:
        raise TransferError(f"{source_path} has {extra[0]}, which this model has not: {fits}")
    source_symbols = list(source_ckpt["atom_symbols"])
    shared = [s for s in symbols if s in source_symbols]
    for s in shared:
        i, j = symbols.index(s), source_symbols.index(s)
        target[TYPE_COLUMNS][:, i] = source[TYPE_COLUMNS][:, j]
        for name in TYPE_ROWS:
            target[name][i] = source[name][j]
    model.load_state_dict(target)
    total = sum(t.numel() for t in target.values())
    return (f"initialised {copied:,} of {total:,} weights (the trunk and the shared heads) from the EMA weights of {source_path} "
            f"({source_ckpt['domain']}, {source_ckpt.get('data')}, step {source_ckpt['step']}), and the type embeddings of the "
            f"{len(shared)} elements both vocabularies hold ({', '.join(shared) or 'none'})")


def conditional_from_unconditional(source_ckpt: dict, source_path, n_conditions: int, condition_dropout: float):
    """(model, process) of a conditional run started from an unconditional checkpoint's EMA weights (train.py
    --init-from with --condition): the same backbone and process, the backbone's embedding widened by the
    condition's 2 C inputs with zero weights, so that the new model is the source, whatever the condition, until
    training teaches it the condition. The condition's inputs sit after the time's (and, for crystals, before the
    cell's CELL_FEATURES: models/crystal_backbones.py)."""
    from models.checkpoint import build_model, config_from_dict
    from models.crystal_backbones import CELL_FEATURES
    from models.domains import domain_of

    domain = domain_of(source_ckpt)
    arch_cls, proc_cls = domain.arch_class(source_ckpt["arch"]), domain.process_class(source_ckpt["gen"])
    source = build_model(source_ckpt)[0].state_dict()
    model = arch_cls(config_from_dict(arch_cls.Config, {**source_ckpt["model_config"], "n_conditions": n_conditions}))
    process = proc_cls(config_from_dict(proc_cls.Config, {**source_ckpt["process_config"], "condition_dropout": condition_dropout}))
    target, widened = model.state_dict(), []
    trailing = CELL_FEATURES if domain.kind == "crystals" else 0
    for name, tensor in target.items():
        old = source[name]
        if old.shape == tensor.shape:
            target[name] = old.clone()
            continue
        if old.shape[:-1] != tensor.shape[:-1] or tensor.shape[-1] - old.shape[-1] != 2 * n_conditions:
            raise TransferError(f"{source_path}: {name} is {tuple(old.shape)} there and {tuple(tensor.shape)} with "
                                f"{n_conditions} properties: not a widened embedding")
        cut = old.shape[-1] - trailing
        target[name] = torch.cat([old[..., :cut], old.new_zeros(*old.shape[:-1], 2 * n_conditions), old[..., cut:]], dim=-1)
        widened.append(name)
    if len(widened) != 1:
        raise TransferError(f"{source_path}: expected one embedding to widen for the condition, found {widened or 'none'}")
    model.load_state_dict(target)
    return model, process
