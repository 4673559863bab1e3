"""What train.py trains: a generative model of a domain (`Generation`) or a student force field (`Student`). Both
answer the loop's few questions, so the loop itself has no branch on the task:

    load(args, meta)           the training and validation sets (meta: a resumed or initialised checkpoint's)
    new_model(args)            (model, objective) of a new run; from_checkpoint(ckpt, weights) rebuilds them
    batch(data, idx, device, width, global_idx, world)   one rank's part of a batch
    evaluate(ema, objective, step, ...)   the validation record train.py logs
    checkpoint_meta(args, objective)      what a checkpoint keeps besides the weights and the loop's state

objective: the generative process, or the force field's loss; the loop calls its draw_noise and loss.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict

import numpy as np
import torch

from models.checkpoint import build_model, build_student
from models.domains import get_domain
from models.training import BatchSchedule


class TaskError(ValueError):
    """Training data or a checkpoint that do not fit the task: train.py exits with the message."""


def batch_schedule(task, args) -> BatchSchedule:
    """The steps' global batches over the task's training set (size-grouped under --batching size)."""
    return BatchSchedule(len(task.train), args.batch_size, args.seed, task.atom_counts if args.batching == "size" else None)


def own_weights(task, state: dict, ema) -> dict[str, dict]:
    """What a finished run exports beside its checkpoint: {file name: checkpoint dict} (the EMA weights alone)."""
    return {"weights.pt": state}


class Generation:
    """A backbone x process on one domain (QM9 or a CDVAE crystal set)."""

    name = "gen"
    # flags that define a run (changing them on --resume makes another run) and flags that define the model (the
    # model is rebuilt from the checkpoint, so they cannot change at all)
    RUN_FLAGS = ("iters", "batch_size", "seed", "warmup", "lr", "min_lr_ratio", "weight_decay", "grad_clip", "ema_decay",
                 "n_train", "preset", "batching")
    MODEL_FLAGS = ("hidden", "n_layers", "cfconv_cutoff", "ot_align", "discrete_types", "distance_loss", "min_one_minus_t", "gamma_scale", "data", "csp", "train_split", "lattice_per_atom", "time_tilt",
                   "time_frequencies", "self_condition", "condition", "condition_dropout", "init_from", "init_trunk")

    def __init__(self, args):
        self.domain = get_domain(args.data)
        self.unit = self.domain.unit
        self.what = f"{args.arch} x {args.gen} on {args.data}{' (structure prediction)' if args.csp else ''}"

    def load(self, args, meta: dict | None, progress: bool) -> str:
        from models.fileio import DataError
        try:
            self.data = self.domain.load_training(args, meta, progress)
        except DataError as e:
            raise TaskError(str(e)) from None
        self.train, self.valid, self.n_max = self.data.train, self.data.valid, self.data.n_max
        self.atom_counts = self.train.mask.sum(1)  # structure sizes, for --batching size
        return self.data.summary

    schedule = batch_schedule
    exports = own_weights

    def new_model(self, args):
        return self.domain.new_model(args, self.data)

    def precision(self, args, device) -> str:
        from models.precision import backbone_precision
        return backbone_precision(device, args.precision, self.domain.arch_class(args.arch))

    @staticmethod
    def from_checkpoint(ckpt: dict, weights: str):
        return build_model(ckpt, weights=weights)

    def describe(self, args, model, objective, n_params: int) -> str:
        return f"model: {args.arch} {asdict(model.config)}, {n_params / 1e6:.2f} M parameters; process: {args.gen} {asdict(objective.config)}"

    def batch(self, data, idx, device, width=None, global_idx=None, world: int = 1) -> dict:
        return data.batch(idx, device, width=width)

    def evaluate(self, ema, objective, step: int, args, local_batch: int, noise_generator, autocast, device) -> dict:
        return {"step": step, **generation_record(self.domain, self.data, ema, objective, args, local_batch, noise_generator,
                                                  autocast, device)}

    def checkpoint_meta(self, args, objective) -> dict:
        return {"domain": self.domain.kind, "arch": args.arch, "gen": args.gen, "process_config": asdict(objective.config),
                **self.data.meta}


@torch.no_grad()
def generation_record(domain, data, ema, objective, args, local_batch: int, noise_generator, autocast, device) -> dict:
    """Validation loss of a generative model's EMA weights with fixed noise, and the domain's quick quality check of
    --eval-samples fresh samples."""
    losses = []
    for lo in range(0, len(data.valid), local_batch):
        idx = torch.arange(lo, min(lo + local_batch, len(data.valid)))
        noise = objective.draw_noise(len(idx), data.n_max, noise_generator(lo))
        with autocast:
            losses.append(objective.loss(ema, data.valid.batch(idx, device), noise).item() * len(idx))
    record = {"val_loss": sum(losses) / len(data.valid)}
    if args.eval_samples:
        record.update(domain.quality(ema, objective, data, args.eval_samples, args.sample_steps, args.seed + 17, autocast))
    return record


class Student:
    """A student force field (models/forcefield.py) on label.py's labels of one teacher."""

    name = "ff"
    RUN_FLAGS = Generation.RUN_FLAGS + ("data", "energy_weight", "force_weight", "stress_weight", "val_fraction", "max_force")
    MODEL_FLAGS = ("hidden", "n_layers", "cutoff", "student")
    unit = "structures"

    def __init__(self, args):
        self.what = "a student of its labels' teacher on " + ", ".join(args.data)
        self.atom_counts = None  # flat batches: no padding to group by
        self.n_max = 0

    schedule = batch_schedule
    exports = own_weights

    def load(self, args, meta: dict | None, progress: bool) -> str:
        import time

        from models.labelled_data import LabelledStructures, key_hashes
        from models.labels import LabelsError

        t0 = time.time()
        try:
            labelled = LabelledStructures.load(args.data, max_force=args.max_force)
        except LabelsError as e:
            raise TaskError(str(e)) from None
        self.teacher = (labelled.teacher, labelled.teacher_version)
        self.what = f"a student of {labelled.teacher} on {', '.join(args.data)}"
        if meta is not None and self.teacher != (meta["teacher"], meta["teacher_version"]):
            raise TaskError(f"the checkpoint learned {meta['teacher']} ({meta['teacher_version']}), and {', '.join(args.data)} hold labels "
                            f"of {labelled.teacher} ({labelled.teacher_version}). A student learns one teacher")
        self.elements = labelled.elements
        train, valid = labelled.split(args.val_fraction)
        if not len(train) or not len(valid):
            raise TaskError(f"the {len(labelled)} structures of {', '.join(args.data)} leave {len(train)} for training and "
                            f"{len(valid)} for validation (--val-fraction {args.val_fraction}); label more, or change --val-fraction")
        if args.n_train:
            train = train.subset(range(min(args.n_train, len(train))))
        self.train, self.valid = train, valid.subset(range(min(args.val_size, len(valid))))
        # What the student trains on, by key: evaluate.py scores only other structures, whatever file holds them. A
        # resumed run keeps what its earlier steps trained on (--override may have changed --n-train or --data).
        self.trained_keys = np.union1d(key_hashes(self.train.c["key"]),
                                       meta["trained_key_hashes"].numpy() if meta and "trained_key_hashes" in meta
                                       else np.zeros(0, np.int64))
        self.cutoff = args.cutoff
        return "\n".join(labelled.warnings + [
            f"data: {len(self.train)} train / {len(self.valid)} validation structures ({int(self.train.c['n_atoms'].sum()):,} / "
            f"{int(self.valid.c['n_atoms'].sum()):,} atoms, {int(self.train.periodic.sum())} / {int(self.valid.periodic.sum())} "
            f"periodic) labelled by {labelled.teacher} ({labelled.teacher_version}), loaded in {time.time() - t0:.1f} s"])

    @staticmethod
    def precision(args, device) -> str:
        return "fp32"  # forces are derivatives of the energy: trained in float32

    def new_model(self, args):
        from models.forcefield import ForceField, ForceFieldConfig, ForceFieldObjective, fit_reference_energies

        model = ForceField(ForceFieldConfig(elements=self.elements, hidden=args.hidden, n_layers=args.n_layers, cutoff=args.cutoff,
                                            family=args.student, repulsion=args.repulsion))
        with torch.no_grad():  # per-element energies by least squares and the force scale: the network learns the rest
            e0 = fit_reference_energies(self.train.structure_numbers(), self.train.c["energy"], model.config.elements)
            model.reference_energy.copy_(torch.from_numpy(e0))
            model.energy_scale.fill_(self.train.force_rms())
        objective = ForceFieldObjective(ForceFieldObjective.Config(
            energy_weight=args.energy_weight, force_weight=args.force_weight, stress_weight=args.stress_weight,
            force_scale=self.train.force_rms(), stress_scale=self.train.stress_rms()))
        return model, objective

    @staticmethod
    def from_checkpoint(ckpt: dict, weights: str):
        return build_student(ckpt, weights=weights)

    def describe(self, args, model, objective, n_params: int) -> str:
        return f"model: student force field {asdict(model.config)}, {n_params / 1e6:.3f} M parameters; loss {asdict(objective.config)}"

    def batch(self, data, idx, device, width=None, global_idx=None, world: int = 1) -> dict:
        """The structures idx with their neighbour lists; normalised over the global batch global_idx that this rank
        holds a part of."""
        return data.batch(idx, device, self.cutoff, global_index=global_idx, world=world if global_idx is not None else 1)

    def evaluate(self, ema, objective, step: int, args, local_batch: int, noise_generator, autocast, device) -> dict:
        """Validation loss and mean absolute errors of the EMA student against the teacher: energy per atom (meV),
        force components (meV/A) and, when crystals are held out, stress components (GPa). Forces are gradients, so
        this runs with autograd on (the weights need none)."""
        from models.labelled_data import EV_PER_A3_IN_GPA

        loss_sum, errors = 0.0, {}
        for lo in range(0, len(self.valid), local_batch):
            batch = self.batch(self.valid, range(lo, min(lo + local_batch, len(self.valid))), device)
            loss_sum += objective.loss(ema, batch, create_graph=False).item() * len(batch["energy"])
            for k, v in objective.absolute_errors(ema, batch).items():
                errors[k] = errors.get(k, 0) + v
        record = {"step": step, "val_loss": loss_sum / len(self.valid),
                  "val_energy_mae_mev_per_atom": 1000 * errors["energy"] / errors["energy_n"],
                  "val_force_mae_mev_per_a": 1000 * errors["forces"] / errors["forces_n"]}
        if errors["stress_n"]:
            record["val_stress_mae_gpa"] = EV_PER_A3_IN_GPA * errors["stress"] / errors["stress_n"]
        return record

    def checkpoint_meta(self, args, objective) -> dict:
        """The student knows whose labels it learned: label.py and evaluate.py name them."""
        return {"objective_config": asdict(objective.config), "teacher": self.teacher[0], "teacher_version": self.teacher[1],
                "n_valid": len(self.valid), "trained_key_hashes": torch.from_numpy(self.trained_keys)}


class Oracle:
    """EDM's property oracle (models/oracle.py): a regressor of a domain's properties (--condition names them) on the
    oracle's half of the training split, the half a conditional generator never trains on (models/condition.py)."""

    name = "oracle"
    RUN_FLAGS = Generation.RUN_FLAGS
    MODEL_FLAGS = ("hidden", "n_layers", "condition", "data", "train_split")

    def __init__(self, args):
        self.domain = get_domain(args.data)
        self.unit = self.domain.unit
        self.what = f"an oracle of {', '.join(args.condition)} on the oracle's half of {args.data}"

    def load(self, args, meta: dict | None, progress: bool) -> str:
        """The domain's training data (Domain.load_training) from the oracle's half of the training split."""
        from models.condition import Normalisation
        from models.fileio import DataError

        try:
            data = self.domain.load_training(args, meta, progress, half="oracle")
        except DataError as e:
            raise TaskError(str(e)) from None
        self.train, self.valid, self.n_max, self.n_types = data.train, data.valid, data.n_max, data.n_types
        self.atom_counts = self.train.mask.sum(1)
        self.norm = Normalisation.from_state(data.meta["condition"])
        self.vocabulary = {k: data.meta[k] for k in ("atom_symbols", "elements") if k in data.meta}
        return data.summary

    def precision(self, args, device) -> str:
        from models.oracle import REGRESSORS
        from models.precision import backbone_precision
        return backbone_precision(device, args.precision, REGRESSORS[self.domain.kind])

    def new_model(self, args):
        from models.oracle import REGRESSORS, OracleObjective, OracleObjectiveConfig

        cls, n = REGRESSORS[self.domain.kind], len(args.condition)
        return (cls(cls.Config(n_types=self.n_types, n_outputs=n, hidden=args.hidden, n_layers=args.n_layers)),
                OracleObjective(OracleObjectiveConfig(n_outputs=n)))

    @staticmethod
    def from_checkpoint(ckpt: dict, weights: str):
        from models.oracle import build_oracle
        return build_oracle(ckpt, weights=weights)

    def describe(self, args, model, objective, n_params: int) -> str:
        return f"model: property oracle {asdict(model.config)}, {n_params / 1e6:.2f} M parameters; L1 loss of the normalised properties"

    batch = Generation.batch  # padded batches of either domain, as a generator's
    schedule = batch_schedule
    exports = own_weights

    @torch.no_grad()
    def evaluate(self, ema, objective, step: int, args, local_batch: int, noise_generator, autocast, device) -> dict:
        """The validation loss (mean L1 of the normalised properties) and each property's mean absolute error in its
        unit, of the EMA weights."""
        errors, n = np.zeros(len(self.norm.names)), len(self.valid)
        for lo in range(0, n, local_batch):
            batch = self.valid.batch(torch.arange(lo, min(lo + local_batch, n)), device)
            with autocast:
                predicted = ema(batch).float()
            errors += (predicted - batch["condition"]).abs().sum(0).cpu().numpy()
        errors /= n
        return {"step": step, "val_loss": float(errors.mean()),
                **{f"val_mae_{name}": float(e * s) for name, e, s in zip(self.norm.names, errors, self.norm.std)}}

    def checkpoint_meta(self, args, objective) -> dict:
        return {"domain": self.domain.kind, "objective_config": asdict(objective.config), "n_valid": len(self.valid),
                "condition": {**self.norm.state(), "half": "oracle"}, **self.vocabulary}


class Joint:
    """One generative model of two data sets, a molecule set and a crystal set, through one trunk (models/joint.py):
    each part built and trained as its single-domain run would be (the domain's recipe, process and data), with
    the trunk, the shared heads and the shared elements' type weights in common, on alternating batches."""

    name = "joint"
    RUN_FLAGS = Generation.RUN_FLAGS
    MODEL_FLAGS = ("hidden", "n_layers", "data", "train_split", "max_atoms", "time_tilt", "time_frequencies", "self_condition", "discrete_types",
                   "distance_loss", "min_one_minus_t", "gamma_scale")

    def __init__(self, args):
        self.domains = [get_domain(name) for name in args.data]
        if sorted(d.kind for d in self.domains) != ["crystals", "molecules"]:
            raise TaskError(f"--task joint trains one molecule set and one crystal set, not {' and '.join(args.data)}")
        self.unit = "structures"
        self.what = f"{args.arch} x {args.gen} on {' and '.join(args.data)} (one trunk, alternating batches)"

    def part_args(self, args, i: int):
        """Part i's flags as its single-domain run takes them: its data set, its domain's recipe where the flag is
        unset (self-conditioning is built for molecules only)."""
        domain = self.domains[i]
        recipe = domain.RECIPE
        self_condition = recipe.get("self_condition", False) if args.self_condition is None else args.self_condition
        return argparse.Namespace(**{**vars(args), "data": args.data[i], "condition": None,
                                     "time_frequencies": recipe["time_frequencies"] if args.time_frequencies is None else args.time_frequencies,
                                     "self_condition": self_condition and domain.kind == "molecules"})

    def load(self, args, meta: dict | None, progress: bool) -> str:
        from models.fileio import DataError
        from models.joint import JointSet

        try:
            self.data = [d.load_training(self.part_args(args, i), meta["parts"][i] if meta else None, progress)
                         for i, d in enumerate(self.domains)]
        except DataError as e:
            raise TaskError(str(e)) from None
        self.train, self.valid = JointSet([d.train for d in self.data]), JointSet([d.valid for d in self.data])
        self.n_max = max(d.n_max for d in self.data)
        return "; ".join(f"{name}: {d.summary}" for name, d in zip(args.data, self.data))

    def schedule(self, args):
        from models.joint import AlternatingSchedule
        return AlternatingSchedule([BatchSchedule(len(d.train), args.batch_size, args.seed, d.train.mask.sum(1) if args.batching == "size"
                                                  else None) for d in self.data], self.train.offsets)

    def new_model(self, args):
        from models.joint import JointBackbone, JointProcess

        parts = [d.new_model(self.part_args(args, i), data) for i, (d, data) in enumerate(zip(self.domains, self.data))]
        return (JointBackbone([m for m, _ in parts], [data.meta["atom_symbols"] for data in self.data]),
                JointProcess([p for _, p in parts]))

    def precision(self, args, device) -> str:
        from models.precision import backbone_precision
        chosen = {backbone_precision(device, args.precision, d.arch_class(args.arch)) for d in self.domains}
        return chosen.pop() if len(chosen) == 1 else "fp32"  # one autocast runs both parts

    @staticmethod
    def from_checkpoint(ckpt: dict, weights: str):
        from models.joint import build_joint
        return build_joint(ckpt, weights)

    def describe(self, args, model, objective, n_params: int) -> str:
        sizes = [sum(p.numel() for p in part.parameters()) for part in model.parts]
        return (f"model: {args.arch} on {' and '.join(args.data)}, {n_params / 1e6:.2f} M parameters in all ("
                + ", ".join(f"{name} {n / 1e6:.2f} M" for name, n in zip(args.data, sizes))
                + f"; shared: the trunk, the shared heads and the elements {', '.join(model.shared_elements) or 'none'}); processes: "
                + "; ".join(f"{name} {args.gen} {asdict(p.config)}" for name, p in zip(args.data, objective.processes)))

    batch = Generation.batch

    def exports(self, state: dict, ema) -> dict[str, dict]:
        """The joint checkpoint's weights, and each part's as a standard checkpoint of its data set."""
        from models.joint import part_checkpoint
        return {"weights.pt": state, **{f"weights_{name}.pt": part_checkpoint(state, ema, i) for i, name in enumerate(state["args"]["data"])}}

    @torch.no_grad()
    def evaluate(self, ema, objective, step: int, args, local_batch: int, noise_generator, autocast, device) -> dict:
        """Each part's Generation.evaluate (its validation loss and its domain's quick check), keys prefixed with its
        data set."""
        record = {"step": step}
        for i, (name, domain, data) in enumerate(zip(args.data, self.domains, self.data)):
            part = generation_record(domain, data, ema.parts[i], objective.processes[i], args, local_batch, noise_generator,
                                     autocast, device)
            record.update({f"{name}/{k}": v for k, v in part.items()})
        return record

    def checkpoint_meta(self, args, objective) -> dict:
        """The joint model's, and each part's as its own checkpoint keeps it (models/joint.py's part_checkpoint)."""
        return {"domain": "joint", "arch": args.arch, "gen": args.gen, "process_config": asdict(objective.config),
                "parts": [{"domain": d.kind, "data": name, "arch": args.arch, "gen": args.gen, "process_config": asdict(p.config),
                           **data.meta} for name, d, data, p in zip(args.data, self.domains, self.data, objective.processes)]}


TASKS = {"gen": Generation, "ff": Student, "oracle": Oracle, "joint": Joint}
