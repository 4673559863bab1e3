"""Checkpoints: atomic writes, safe loads (weights_only), and rebuilding a model from a checkpoint alone.

A checkpoint is a dict of tensors and plain Python values only (no pickled classes), so
`torch.load(weights_only=True)` reads it; configs are stored as dicts and turned back into the
arch's and process's dataclasses here. Two tasks write checkpoints: "gen" (a backbone and a generative
process) and "ff" (a student force field with the teacher it learned); each load names the task it wants.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import torch

from models.domains import Crystals, Molecules, domain_of
from models.fileio import atomic_write

FORMAT = "molgen-bench-ckpt-v1"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: Path, state: dict, keep_previous: Path | None = None) -> None:
    """state: the checkpoint dict; its metadata (everything but tensors and tensors' dicts) also goes to config.json.

    With keep_previous, the checkpoint being replaced stays there (a hard link, or a copy where links are not
    supported), so a checkpoint that later turns out bad never takes the last good one with it. Both steps are
    atomic: at every instant `path` holds a complete checkpoint. A full disk raises models.fileio.DiskFull."""
    path = Path(path)
    state = {"format": FORMAT, **state}
    if keep_previous is not None and path.exists():
        def keep(tmp):
            os.remove(tmp)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
        atomic_write(keep_previous, keep)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    # config.json is for reading: tensors (the states, a student's training-key hashes) stay in the checkpoint alone
    meta = {k: v for k, v in state.items() if k not in ("model", "ema", "optimizer", "scheduler", "rng")
            and not isinstance(v, torch.Tensor)}

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=2)

    atomic_write(path.with_name("config.json"), write_json)


REQUIRED = {"gen": ("arch", "gen", "step", "model_config", "process_config", "atom_symbols", "n_atoms_hist", "ema"),
            "ff": ("step", "model_config", "objective_config", "teacher", "teacher_version", "ema"),
            "oracle": ("step", "model_config", "objective_config", "condition", "atom_symbols", "ema"),
            "joint": ("arch", "gen", "step", "model_config", "process_config", "parts", "ema")}
RESUME = ("model", "optimizer", "scheduler", "rng", "args")  # only train.py --resume needs these
TRAINING_STATE = ("model", "optimizer", "scheduler", "rng", "log_bytes", "clip_history")  # what export_weights leaves out
TASK_NAMES = {"gen": "a generative model (train.py --task gen)", "ff": "a student force field (train.py --task ff)",
              "oracle": "a property oracle (train.py --task oracle)",
              "joint": "a joint model of two domains (train.py --task joint; its weights_<data>.pt are standard checkpoints)"}


def export_weights(state: dict, path: Path) -> None:
    """Write the sampling-only file of a checkpoint dict: its EMA weights and what rebuilds the model (configs,
    vocabulary, size histogram, flags), without the raw weights, optimiser, scheduler and RNG states, so about a
    quarter of the checkpoint's size. sample.py, evaluate.py and label.py read it like a checkpoint; train.py
    cannot resume from it."""
    weights = {"format": FORMAT, **{k: v for k, v in state.items() if k not in TRAINING_STATE}}
    atomic_write(Path(path), lambda tmp: torch.save(weights, tmp))


def load_checkpoint(path: Path, arch: str | None = None, gen: str | None = None, resume: bool = False,
                    task: str = "gen") -> dict:
    """Load safely; refuse a checkpoint of another task, or with arch / gen given, one trained for another
    backbone or process; with resume, also require what train.py --resume restores (optimiser, scheduler, RNG,
    flags)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects we refuse to load
        raise CheckpointError(f"{path}: not a readable MolGen-Bench checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a MolGen-Bench checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else None!r}, expected {FORMAT!r})")
    if ckpt.get("task", "gen") != task:  # checkpoints from before the force field have no "task": generative
        raise CheckpointError(f"{path} is {TASK_NAMES.get(ckpt.get('task'), repr(ckpt.get('task')))}, not {TASK_NAMES[task]}")
    missing = [k for k in REQUIRED[task] + (RESUME if resume else ()) if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, entries {missing} are missing")
    fill_older_defaults(ckpt)
    if task == "ff":
        _student_configs(ckpt, path)
        return ckpt
    if task == "oracle":
        from models.oracle import REGRESSORS, OracleObjectiveConfig
        try:
            config_from_dict(REGRESSORS[ckpt.get("domain", "molecules")].Config, ckpt["model_config"])
            config_from_dict(OracleObjectiveConfig, ckpt["objective_config"])
        except (CheckpointError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: property-oracle checkpoint with an unusable config: {e}") from None
        return ckpt
    if task == "joint":
        for part, config in zip(ckpt["parts"], ckpt["model_config"]["parts"]):
            check_generative({**part, "model_config": config}, path, arch, gen)
    else:
        check_generative(ckpt, path, arch, gen)
    return ckpt


def check_generative(ckpt: dict, path, arch: str | None, gen: str | None) -> None:
    """Raise CheckpointError naming path where a generative checkpoint's domain, backbone, process or configs are not
    ones this code builds, or (arch / gen given) not the ones asked for."""
    for key, want in (("arch", arch), ("gen", gen)):
        if want is not None and ckpt[key] != want:
            raise CheckpointError(f"{path}: checkpoint was trained with --{key} {ckpt[key]}, not --{key} {want}")
    if ckpt["domain"] not in (Molecules.kind, Crystals.kind):
        raise CheckpointError(f"{path}: unknown domain {ckpt['domain']!r}; known: {[Molecules.kind, Crystals.kind]}")
    domain = domain_of(ckpt)
    try:
        arch_cls = domain.arch_class(ckpt["arch"])
    except KeyError:
        raise CheckpointError(f"{path}: unknown architecture {ckpt['arch']!r} for {domain.kind}") from None
    try:
        proc_cls = domain.process_class(ckpt["gen"])
    except KeyError:
        raise CheckpointError(f"{path}: unknown generative process {ckpt['gen']!r} for {domain.kind}") from None
    try:  # configs that no longer (or never) fit their classes fail here, with the file's name
        config_from_dict(arch_cls.Config, ckpt["model_config"])
        config_from_dict(proc_cls.Config, ckpt["process_config"])
    except (CheckpointError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {ckpt['arch']} x {ckpt['gen']} checkpoint with an unusable config: {e}") from None


def fill_older_defaults(ckpt: dict) -> None:
    """Give a checkpoint from before a key was kept what it did then, once, here at load: a generative one is of
    molecules (before crystals) on QM9, and its flags are those from before batching by size, Fourier time features,
    self-conditioning, --train-split, --distance-loss, --min-one-minus-t, --condition, --discrete-types and --lattice-per-atom."""
    if ckpt.get("task", "gen") == "gen":
        ckpt.setdefault("domain", Molecules.kind)
        ckpt.setdefault("data", "qm9")
    if "args" in ckpt and ckpt.get("task") == "ff":
        ckpt["args"].setdefault("student", "schnet")  # before --student
    if "args" in ckpt:
        for key, before_the_flag in (("batching", "random"), ("time_frequencies", 0), ("self_condition", False),
                                     ("train_split", "train"), ("distance_loss", 0.0), ("min_one_minus_t", None),
                                     ("condition", None), ("condition_dropout", 0.1), ("init_trunk", None),
                                     ("discrete_types", False), ("lattice_per_atom", False)):
            ckpt["args"].setdefault(key, before_the_flag)


def config_from_dict(cls, values: dict):
    """Dataclass from a stored dict, naming unknown keys (a checkpoint from a newer or other version)."""
    names = {f.name for f in fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise CheckpointError(f"config keys {sorted(unknown)} are not fields of {cls.__name__}")
    return cls(**values)


def _load_weights(model, ckpt: dict, weights: str, name: str):
    if weights not in ckpt:
        raise CheckpointError(f"the checkpoint holds no {weights!r} weights (an export of train.py: only its EMA weights)")
    try:
        model.load_state_dict(ckpt[weights])
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit a {name} model with config {ckpt['model_config']}: {e}") from None
    bad = [k for k, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise CheckpointError(f"non-finite (NaN / Inf) {weights} weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    return model


def build_model(ckpt: dict, weights: str = "ema"):
    """(model, process) from a checkpoint alone; weights 'ema' (for sampling) or 'model'."""
    domain = domain_of(ckpt)
    arch_cls, proc_cls = domain.arch_class(ckpt["arch"]), domain.process_class(ckpt["gen"])
    model = _load_weights(arch_cls(config_from_dict(arch_cls.Config, ckpt["model_config"])), ckpt, weights, ckpt["arch"])
    process = proc_cls(config_from_dict(proc_cls.Config, ckpt["process_config"]))
    return model, process


def _student_configs(ckpt: dict, path="checkpoint"):
    from models.forcefield import ForceFieldConfig, ForceFieldObjectiveConfig

    try:
        return (config_from_dict(ForceFieldConfig, ckpt["model_config"]),
                config_from_dict(ForceFieldObjectiveConfig, ckpt["objective_config"]))
    except (CheckpointError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: student force-field checkpoint with an unusable config: {e}") from None


def build_student(ckpt: dict, weights: str = "ema"):
    """(ForceField, ForceFieldObjective) from a --task ff checkpoint alone; weights 'ema' (for use) or 'model'."""
    from models.forcefield import ForceField, ForceFieldObjective

    model_config, objective_config = _student_configs(ckpt)
    return _load_weights(ForceField(model_config), ckpt, weights, "student force-field"), ForceFieldObjective(objective_config)


def load_student(path: Path, device="cpu"):
    """(ForceField with the EMA weights in eval mode, checkpoint metadata: teacher, teacher_version, data, step)."""
    ckpt = load_checkpoint(path, task="ff")
    try:
        model, _ = build_student(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return model.to(device).eval(), {k: ckpt.get(k) for k in ("teacher", "teacher_version", "step", "data")}

