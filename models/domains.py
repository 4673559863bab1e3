"""The domains a generative model learns, as objects the scripts ask instead of branching on a name.

A domain is QM9's molecules (`Molecules`) or one CDVAE crystal set (`Crystals("perov5")`, carbon24, mp20). It
knows its backbones and processes by name (train.py's --arch and --gen), its recipe and sampler defaults, which
train.py flags belong to it, how its training data load and pad, what the checkpoint keeps of them (the element
vocabulary, the size histogram), the quick quality check train.py logs, how a batch of samples becomes
structures, and how samples are written. `get_domain(--data)` builds one from a name, `domain_of(ckpt)` from a
checkpoint.

This module imports no torch at the top, so the scripts check their flags before the heavy imports.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path

ARCH_NAMES = ("gnn", "transformer", "pairformer")
PROCESS_NAMES = ("flow", "diffusion", "interpolant")
CRYSTAL_DATA = ("perov5", "carbon24", "mp20")  # the CDVAE sets models/crystals.py loads
DATA_SETS = ("qm9",) + CRYSTAL_DATA


def _load(path: str):
    module, name = path.split(":")
    return getattr(import_module(module), name)


@dataclass
class TrainingData:
    """A domain's training and validation sets as train.py uses them. train / valid: padded sets whose batch(idx,
    device, width) gives the process's batch; n_types: the backbone's type vocabulary; n_max: the padded width;
    meta: what the checkpoint keeps of the data (vocabulary, size histogram); summary: the log line."""

    train: object
    valid: object
    n_types: int
    n_max: int
    meta: dict
    summary: str


class Domain:
    """What molecules and crystals have in common; the subclasses fill in the rest."""

    kind: str  # the checkpoint's "domain"
    unit: str  # what train.py's throughput counts
    ARCHS: dict[str, str]  # --arch -> "module:Class"
    PROCESSES: dict[str, str]  # --gen -> "module:Class"
    RECIPE: dict  # backbone defaults where the classes' own differ (train.py; scale.py matches sizes with them)
    TIME_POWER: float  # the samplers' default time grid (models/time.py)
    FLAGS: tuple[str, ...]  # train.py flags that only this kind of domain takes

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def arch_class(self, arch: str):
        if arch not in self.ARCHS:
            raise KeyError(f"unknown backbone {arch!r} for {self.kind}; known: {sorted(self.ARCHS)}")
        return _load(self.ARCHS[arch])

    def process_class(self, gen: str):
        if gen not in self.PROCESSES:
            raise KeyError(f"unknown generative process {gen!r} for {self.kind}; known: {sorted(self.PROCESSES)}")
        return _load(self.PROCESSES[gen])

    def archs(self) -> dict:
        return {arch: self.arch_class(arch) for arch in self.ARCHS}

    def processes(self) -> dict:
        return {gen: self.process_class(gen) for gen in self.PROCESSES}

    def run_name(self, args) -> str:
        """The default run directory's data part."""
        return self.name

    def foreign_flags(self) -> tuple[str, ...]:
        """train.py flags of the other kind of domain, refused here."""
        return tuple(f for f in DOMAIN_FLAGS if f not in self.FLAGS)

    def train_flags(self, args) -> list:
        """What scale.py passes to train.py for this domain besides the cell's own flags."""
        return []

    def new_model(self, args, data: TrainingData):
        """(backbone, process) of a new run from train.py's flags and the training data."""
        arch_cls, proc_cls = self.arch_class(args.arch), self.process_class(args.gen)
        extra = {"self_condition": True} if args.self_condition else {}
        if getattr(args, "condition", None):
            extra["n_conditions"] = len(args.condition)
        model = arch_cls(arch_cls.Config(n_types=data.n_types, hidden=args.hidden, n_layers=args.n_layers,
                                         time_frequencies=args.time_frequencies, **extra, **self.backbone_options(args)))
        options = {"n_types": data.n_types, "time_tilt": args.time_tilt, **self.process_options(args, data)}
        from models.checkpoint import config_from_dict
        return model, proc_cls(config_from_dict(proc_cls.Config, options))

    def backbone_options(self, args) -> dict:
        return {}

    def process_options(self, args, data: TrainingData) -> dict:
        return {}

    def check_checkpoint(self, ckpt: dict, path) -> None:
        """Raise ValueError naming path when the checkpoint's vocabulary is not one this domain samples."""

    def sample_info(self, ckpt: dict) -> dict:
        """What sample.py records in each sample's extxyz info beside the sampler's settings."""
        return {}

    def de_novo_plan(self, ckpt: dict, n: int, generator, condition: dict | None = None, guidance: float = 1.0) -> "SamplingPlan":
        """n structures, sizes from the training histogram. A conditional checkpoint's structures each take a request:
        by default an (atom count, properties) pair drawn from the generator's training half, as EDM's protocol
        does; with condition {property: value} (every property the model knows, in its unit) those values, the
        sizes from the histogram. The requested values go into the plan's info (sample.py writes them to each
        structure's extxyz info as condition_<property>)."""
        import torch

        jobs = [(i, 0) for i in range(n)]
        if "condition" not in ckpt:
            if condition is not None or guidance != 1.0:
                raise ValueError("the checkpoint was trained without --condition: it takes no condition and no guidance")
            n_atoms = self.draw_sizes(ckpt, n, generator)
            return SamplingPlan(jobs, n_atoms, lambda rows, by_size: {"n_atoms": n_atoms[rows]})
        from models.condition import Normalisation

        norm = Normalisation.from_state(ckpt["condition"])
        if condition is None:
            pairs = ckpt["condition_pairs"]
            pick = torch.randint(len(pairs), (n,), generator=generator)
            n_atoms, values = pairs[pick, 0].long(), pairs[pick, 1:].double()
        else:
            if set(condition) != set(norm.names):
                raise ValueError(f"the checkpoint is conditioned on {', '.join(norm.names)}: give a value for each of them, "
                                 f"not for {', '.join(condition) or 'none'}")
            n_atoms = self.draw_sizes(ckpt, n, generator)
            values = torch.tensor([[float(condition[name]) for name in norm.names]], dtype=torch.float64).expand(n, -1)
        normalised = norm.normalise(values.numpy())
        info = {f"condition_{name}": values[:, k].tolist() for k, name in enumerate(norm.names)}
        return SamplingPlan(jobs, n_atoms, lambda rows, by_size: {"n_atoms": n_atoms[rows], "condition": normalised[rows],
                                                                  "guidance": guidance}, info)

    def draw_sizes(self, meta: dict, n: int, generator):
        """n structure sizes [n] drawn from the training histogram that meta (a checkpoint, or TrainingData.meta)
        keeps."""
        import torch
        return torch.multinomial(torch.tensor(meta["n_atoms_hist"]), n, replacement=True, generator=generator)


class Molecules(Domain):
    """QM9 (models/molecules.py): five elements, Euclidean coordinates, the EDM split."""

    kind, unit = "molecules", "mol"
    ARCHS = {"gnn": "models.egnn:EGNN", "transformer": "models.transformer:Transformer",
             "pairformer": "models.pairformer:Pairformer"}
    PROCESSES = {"flow": "models.molecule_flow:FlowMatching", "diffusion": "models.molecule_diffusion:Diffusion",
                 "interpolant": "models.molecule_interpolant:StochasticInterpolant"}
    RECIPE = {"time_frequencies": 6, "self_condition": True}  # the recipe ablation's winners (models/EXPERIMENTS.md)
    TIME_POWER = 2.0  # the recipe ablation found P = 2 better (models/EXPERIMENTS.md)
    FLAGS = ("cfconv_cutoff", "ot_align", "discrete_types", "distance_loss", "min_one_minus_t", "gamma_scale", "self_condition", "condition",
             "condition_dropout")
    CONDITIONS = ("alpha", "gap", "homo", "lumo", "mu", "Cv")  # train.py --condition: models/molecules.py's PROPERTIES

    def quality_keys(self, csp: bool = False) -> tuple[str, ...]:
        """metrics.json keys scale.py's tables show, the headline first."""
        return ("mol_stability", "atom_stability", "validity", "uniqueness", "novelty", "fcd")

    def n_types(self, args) -> int:
        from models.molecules import ATOM_SYMBOLS
        return len(ATOM_SYMBOLS)

    def load_training(self, args, meta: dict | None = None, progress: bool = True, half: str = "generator") -> TrainingData:
        """The EDM train and validation splits, cut to --n-train and --val-size; meta (a checkpoint's) is unused:
        the vocabulary is fixed. With --condition, the `half` of the training split (models/condition.py: a
        generator's or an oracle's), each molecule with its properties normalised by that half's, and in meta the
        normalisation and the half's (atom count, properties) pairs that sample.py draws requests from, as EDM does."""
        from models.molecules import ATOM_SYMBOLS, PROPERTIES, PaddedMolecules, load_qm9

        t0 = time.time()
        train, valid = load_qm9("train", args.data_dir), load_qm9("valid", args.data_dir)
        condition = getattr(args, "condition", None)
        if condition:
            from models.condition import protocol_halves
            train = train.subset(protocol_halves(len(train))[half])
        if args.n_train:
            train = train.subset(range(min(args.n_train, len(train))))
        valid = valid.subset(range(min(args.val_size, len(valid))))
        n_max = int(max(train.n_atoms.max(), valid.n_atoms.max()))
        meta = {"atom_symbols": list(ATOM_SYMBOLS), "n_atoms_hist": train.n_atoms_histogram().tolist()}
        conditions = (None, None)
        if condition:
            from models.condition import conditioned_data
            *conditions, condition_meta = conditioned_data(condition, [PROPERTIES[name][3] for name in condition], train, valid, half)
            meta.update(condition_meta)
        summary = (f"data: {len(train)} train / {len(valid)} validation molecules, n_max {n_max}, loaded in {time.time() - t0:.1f} s"
                   + (f"; {', '.join(condition)}: the {half}'s half of the training split" if condition else ""))
        return TrainingData(PaddedMolecules(train, n_max, conditions[0]), PaddedMolecules(valid, n_max, conditions[1]),
                            len(ATOM_SYMBOLS), n_max, meta, summary)

    def backbone_options(self, args) -> dict:
        return {"cfconv_cutoff": args.cfconv_cutoff} if args.cfconv_cutoff else {}

    def process_options(self, args, data: TrainingData) -> dict:
        options = {"ot_align": True} if args.ot_align else {}
        if getattr(args, "discrete_types", False):
            options["discrete_types"] = True
        if getattr(args, "condition", None):
            options["condition_dropout"] = args.condition_dropout
        if args.distance_loss:
            options["distance_loss"] = args.distance_loss
        if args.min_one_minus_t is not None:
            options["min_one_minus_t"] = args.min_one_minus_t
        if args.self_condition:
            options["self_condition"] = True
        if args.gamma_scale is not None:
            options["gamma_scale"] = args.gamma_scale
        return options

    def check_checkpoint(self, ckpt: dict, path) -> None:
        from models.molecules import ATOM_SYMBOLS
        if list(ckpt["atom_symbols"]) != list(ATOM_SYMBOLS):
            raise ValueError(f"{path}: atom vocabulary {ckpt['atom_symbols']} is not the molecule vocabulary {list(ATOM_SYMBOLS)}")

    def sampling_plan(self, ckpt: dict, n: int, generator, compositions=None, n_per_composition: int = 1,
                      condition: dict | None = None, guidance: float = 1.0) -> "SamplingPlan":
        """n molecules: Domain.de_novo_plan."""
        return self.de_novo_plan(ckpt, n, generator, condition, guidance)

    def structures(self, out: dict, ckpt: dict) -> list:
        """A process's padded samples as ase.Atoms, None where a coordinate is not finite."""
        import ase
        import numpy as np
        import torch
        from ase.data import atomic_numbers

        numbers_of_type = torch.tensor([atomic_numbers[s] for s in ckpt["atom_symbols"]])
        types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
        result = []
        for i in range(len(types)):
            positions = pos[i][mask[i]].double().numpy()
            result.append(ase.Atoms(numbers=numbers_of_type[types[i][mask[i]]].numpy(), positions=positions)
                          if np.isfinite(positions).all() else None)
        return result

    def label(self, atoms, job: tuple[int, int], compositions=None, truth_rows=None) -> None:
        atoms.info["sample_index"] = job[0]

    def quality(self, model, process, data: TrainingData, n: int, n_steps: int, seed: int, autocast) -> dict:
        """train.py's periodic check: atom and molecule stability of n fresh molecules."""
        import torch
        from models.molecule_metrics import stability
        from models.molecules import ATOMIC_NUMBERS

        gen = torch.Generator().manual_seed(seed)
        n_atoms = self.draw_sizes(data.meta, n, gen)
        with autocast:
            out = process.sample(model, {"n_atoms": n_atoms}, n_steps, process.CHECK_SAMPLER, generator=gen)
        types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
        z = torch.tensor(ATOMIC_NUMBERS)[types]
        results = [stability(z[i][mask[i]].numpy(), pos[i][mask[i]].double().numpy()) for i in range(len(n_atoms))]
        return {"mol_stability": sum(r[0] for r in results) / len(results),
                "atom_stability": sum(r[1] for r in results) / sum(r[2] for r in results)}

    def score(self, args, out_json: Path, fig_dir: Path, started: float) -> None:
        """evaluate.py's molecule metrics (EDM protocol and distributions) of args.samples, or of the test set
        (--reference), under evaluate.py's flags."""
        from models.molecule_evaluation import score_molecules
        score_molecules(args.samples, out_json, fig_dir, data=args.data, n_test=args.n_test, data_dir=args.data_dir,
                        n_ref=args.n_ref, fcd=not args.no_fcd, coverage_threshold=args.coverage_threshold,
                        training_log=args.log or (args.samples.parent / "log.jsonl" if args.samples else None),
                        progress=not args.no_progress, started=started)

    def write_samples(self, out_dir: Path, structures: list) -> str:
        """samples.extxyz and samples.sdf (bonds inferred from geometry); returns what was written."""
        from models.molecules import write_sdf
        _write_extxyz(out_dir / "samples.extxyz", structures)
        failed = write_sdf(out_dir / "samples.sdf", structures)
        return f"{out_dir / 'samples.extxyz'} and {out_dir / 'samples.sdf'} ({failed} not writable as SDF)"


class Crystals(Domain):
    """One CDVAE set (models/crystals.py): a lattice and fractional coordinates, an element vocabulary of the
    training data's own, de novo generation or structure prediction (--csp)."""

    kind, unit = "crystals", "crystals"
    ARCHS = {"gnn": "models.crystal_backbones:PeriodicGNN", "transformer": "models.crystal_backbones:PeriodicTransformer",
             "pairformer": "models.crystal_backbones:PeriodicPairformer"}
    PROCESSES = {"flow": "models.crystal_flow:CrystalFlowMatching", "diffusion": "models.crystal_diffusion:CrystalDiffusion",
                 "interpolant": "models.crystal_interpolant:CrystalInterpolant"}
    RECIPE = {"time_frequencies": 0}  # not ablated for crystals
    TIME_POWER = 1.0  # on perov-5, P = 2 and 50-200 steps moved validity by under a point (models/EXPERIMENTS.md, Crystals)
    FLAGS = ("csp", "train_split", "max_atoms", "lattice_per_atom", "condition", "condition_dropout")

    @property
    def CONDITIONS(self) -> tuple[str, ...]:  # noqa: N802 (a class attribute of Molecules, a per-set one here)
        """train.py --condition: the CDVAE property columns of this set (models/crystals.py)."""
        from models.crystals import CRYSTAL_SETS
        return CRYSTAL_SETS[self.name].conditions

    def run_name(self, args) -> str:
        return f"{self.name}{'_csp' if args.csp else ''}"

    def quality_keys(self, csp: bool = False) -> tuple[str, ...]:
        if csp:
            return ("match_rate@1", "rmse@1", "structural_validity")
        return ("validity", "structural_validity", "compositional_validity", "cov_recall", "cov_precision", "wdist_density",
                "uniqueness", "novelty")

    def split_path(self, split: str, args) -> Path:
        """The CDVAE CSV file of a split under --data-dir, for messages about its records."""
        from models.crystals import split_file
        from models.molecules import default_data_dir
        return split_file(self.name, split, Path(args.data_dir) if args.data_dir is not None else default_data_dir(),
                          download_missing=False)

    def splits(self, args, progress: bool = True):
        """(training, validation) crystals, whole: the training split and the validation split, or with --train-split
        val the validation split less a fixed 5 % of it (by a hash of material_id), and that 5 %."""
        import numpy as np

        from models.crystals import holdout_mask, load_crystals

        train = load_crystals(self.name, args.train_split, args.data_dir, progress=progress)
        if args.train_split == "val":  # the validation split is the training set: hold a fixed part of it out
            held = holdout_mask(train.ids, 0.05)
            if held.all() or not held.any():
                from models.fileio import DataError
                raise DataError(f"{self.split_path('val', args)}: {'all' if held.any() else 'none'} of its {len(train)} "
                                f"crystals fall in the 5 % held out for validation (by a CRC-32 of material_id), which leaves "
                                f"no {'training' if held.any() else 'validation'} crystals: --train-split val needs a file of "
                                f"more crystals (the CDVAE val splits hold thousands)")
            return train.subset(np.flatnonzero(~held)), train.subset(np.flatnonzero(held))
        return train, load_crystals(self.name, "val", args.data_dir, progress=progress)

    def n_types(self, args) -> int:
        """The element vocabulary of a new model: every element of the whole training and validation sets, whatever
        --n-train and --val-size keep (so scale.py counts the parameters the run builds)."""
        train, valid = self.splits(args, progress=False)
        return len(set(train.elements()) | set(valid.elements()))

    def load_training(self, args, meta: dict | None = None, progress: bool = True, half: str = "generator") -> TrainingData:
        """The training and validation crystals (splits()), cut to --n-train and --val-size. The element vocabulary
        belongs to the model: a resumed or initialised run keeps its checkpoint's (meta), a new one takes every
        element of both sets before they are cut (n_types()). With --condition, the `half` of the training split,
        as for molecules."""
        from models.crystals import PaddedCrystals

        t0 = time.time()
        train, valid = self.splits(args, progress)
        elements = meta["elements"] if meta is not None else sorted(set(train.elements()) | set(valid.elements()))
        condition = getattr(args, "condition", None)
        if condition:  # EDM's protocol: a generator's or an oracle's half of the training split (models/condition.py)
            from models.condition import protocol_halves
            train = train.subset(protocol_halves(len(train))[half])
        if args.n_train:
            train = train.subset(range(min(args.n_train, len(train))))
        valid = valid.subset(range(min(args.val_size, len(valid))))
        self.check_max_atoms(train, args.train_split, args)
        self.check_max_atoms(valid, "val", args)
        n_max = int(max(train.n_atoms.max(), valid.n_atoms.max()))
        from ase.data import chemical_symbols
        data_meta = {"elements": elements, "atom_symbols": [chemical_symbols[z] for z in elements], "csp": args.csp,
                     "n_atoms_hist": train.n_atoms_histogram().tolist()}
        conditions = (None, None)
        if condition:
            from models.condition import conditioned_data
            from models.crystals import CRYSTAL_PROPERTIES
            *conditions, condition_meta = conditioned_data(condition, [CRYSTAL_PROPERTIES[c] for c in condition], train, valid, half)
            data_meta.update(condition_meta)
        return TrainingData(
            PaddedCrystals(train, elements, n_max, f"{self.name} {args.train_split}", conditions[0]),
            PaddedCrystals(valid, elements, n_max, f"{self.name} validation", conditions[1]), len(elements), n_max,
            data_meta,
            f"data: {self.name} ({args.train_split} split): {len(train)} train / {len(valid)} validation crystals, "
            f"{len(elements)} elements, n_max {n_max}, loaded in {time.time() - t0:.1f} s"
            + (f"; {', '.join(condition)}: the {half}'s half of the training split" if condition else ""))

    def check_max_atoms(self, crystals, split: str, args) -> None:
        """DataError naming the largest crystal of `crystals` (read from `split`) above --max-atoms. A batch is padded
        to its largest crystal (validation batches, and every batch of --batching random, to the largest of the set),
        and a backbone's memory grows with the square of that width: one large cell would otherwise end the run in an
        out-of-memory kill, without a message."""
        import numpy as np

        from models.crystals import record_where
        from models.fileio import DataError

        over = np.flatnonzero(crystals.n_atoms > args.max_atoms)
        if not len(over):
            return
        largest = int(over[np.argmax(crystals.n_atoms[over])])
        n = int(crystals.n_atoms[largest])
        path = self.split_path(split, args)
        others = f" (and {len(over) - 1} more of the {len(crystals)} crystals used from it)" if len(over) > 1 else ""
        raise DataError(f"{record_where(path, str(crystals.ids[largest]))}: {n} atoms, more than --max-atoms "
                        f"{args.max_atoms}{others}. A batch is padded to its largest crystal and the backbone's memory "
                        f"grows with the square of that; remove the crystal from the file, or give --max-atoms {n} if "
                        f"the memory allows")

    def process_options(self, args, data: TrainingData) -> dict:
        from models.crystal_process import per_atom_length_scale
        from models.geometry import LatticeScaler
        per_atom = bool(getattr(args, "lattice_per_atom", False))
        scale = per_atom_length_scale(data.train.mask) if per_atom else 1.0
        scaler = LatticeScaler.fit(data.train.lengths / scale, data.train.angles).state()
        return {"csp": args.csp, "lattice_mean": scaler["mean"], "lattice_std": scaler["std"], "lattice_per_atom": per_atom,
                **({"condition_dropout": args.condition_dropout} if getattr(args, "condition", None) else {})}

    def train_flags(self, args) -> list:
        return ["--train-split", args.train_split] + (["--csp"] if args.csp else [])

    def sample_info(self, ckpt: dict) -> dict:
        return {"data": ckpt["data"], "csp": bool(ckpt["csp"]), "train_split": ckpt["args"]["train_split"]}

    def sampling_plan(self, ckpt: dict, n: int, generator, compositions=None, n_per_composition: int = 1,
                      condition: dict | None = None, guidance: float = 1.0) -> "SamplingPlan":
        """De novo: n crystals, sizes from the training histogram. Structure prediction: n_per_composition samples
        for each crystal of `compositions` (a models.crystals.CrystalSet), whose elements the model must know.
        A conditional (de novo) checkpoint: Domain.de_novo_plan."""
        from models.crystals import PaddedCrystals

        if not ckpt["csp"]:
            return self.de_novo_plan(ckpt, n, generator, condition, guidance)
        if condition is not None or guidance != 1.0:
            raise ValueError("a structure-prediction checkpoint takes no condition and no guidance")
        padded = PaddedCrystals(compositions, ckpt["elements"], name="the compositions")
        sizes = padded.mask.sum(1)

        def request(rows, by_size):
            b = padded.batch(rows, width=int(sizes[rows].max()) if by_size else None)  # random: padded to all, as before
            return {"types": b["types"], "mask": b["mask"]}
        jobs = [(i, k) for i in range(len(padded)) for k in range(n_per_composition)]
        return SamplingPlan(jobs, sizes[[i for i, _ in jobs]], request)

    def structures(self, out: dict, ckpt: dict) -> list:
        import numpy as np
        from models.crystals import crystal_atoms, unpad

        return [crystal_atoms(numbers, frac, lengths, angles)
                if np.isfinite(frac).all() and np.isfinite(lengths).all() and np.isfinite(angles).all() else None
                for numbers, frac, lengths, angles in unpad(out, ckpt["elements"])]

    def label(self, atoms, job: tuple[int, int], compositions=None, truth_rows=None) -> None:
        i, k = job
        if compositions is None:
            atoms.info["sample_index"] = i
        else:
            atoms.info["sample_index"] = k
            atoms.info.update(truth_id=str(compositions.ids[i]), truth_index=truth_rows[i] if truth_rows else i)

    def quality(self, model, process, data: TrainingData, n: int, n_steps: int, seed: int, autocast) -> dict:
        """train.py's periodic check. Structure prediction: match rate and RMSE of one sample for each of the first
        n validation crystals; de novo: structural and compositional validity of n fresh crystals."""
        import numpy as np
        import torch
        from models.crystal_metrics import composition_valid, csp_metrics, structure_valid
        from models.crystals import unpad

        gen, elements = torch.Generator().manual_seed(seed), data.meta["elements"]
        if data.meta["csp"]:
            truth = data.valid.batch(torch.arange(min(n, len(data.valid))))
            request = {"types": truth["types"], "mask": truth["mask"]}
        else:
            request = {"n_atoms": self.draw_sizes(data.meta, n, gen)}
        with autocast:
            out = process.sample(model, request, n_steps, process.CHECK_SAMPLER, generator=gen)
        samples = unpad(out, elements)
        if data.meta["csp"]:
            m = csp_metrics([[s] for s in samples], unpad(truth, elements), workers=1, progress=False)
            return {"match_rate": m["match_rate@1"], "rmse": m["rmse@1"]}
        return {"structural_validity": float(np.mean([structure_valid(*c) for c in samples])),
                "compositional_validity": float(np.mean([composition_valid(c[0]) for c in samples]))}

    def score(self, args, out_json: Path, fig_dir, started: float) -> None:
        """evaluate.py's crystal metrics (CDVAE protocol, structure prediction, stability) of args.samples, or of the
        test set (--reference), under evaluate.py's flags."""
        from models.crystal_evaluation import score_crystals
        score_crystals(self.name, args.samples, out_json, n_test=args.n_test, data_dir=args.data_dir, workers=args.workers,
                       n_unique=args.n_unique, coverage=not args.no_coverage, stability=args.stability,
                       relaxed_hull=args.hull == "relaxed", relax_steps=args.relax_steps,
                       stable_threshold=args.stable_threshold, structure_timeout=args.structure_timeout,
                       progress=not args.no_progress, started=started, fig_dir=fig_dir)

    def write_samples(self, out_dir: Path, structures: list) -> str:
        """samples.extxyz and samples.cif (one data block per crystal); returns what was written."""
        from pymatgen.io.ase import AseAtomsAdaptor

        from models.crystals import write_cif
        names = [f"{a.info['truth_id']}_{a.info['sample_index']}" if "truth_id" in a.info else f"sample_{a.info['sample_index']}"
                 for a in structures]
        _write_extxyz(out_dir / "samples.extxyz", structures)
        write_cif(out_dir / "samples.cif", [AseAtomsAdaptor.get_structure(a) for a in structures], names)
        return f"{out_dir / 'samples.extxyz'} and {out_dir / 'samples.cif'}"


@dataclass
class SamplingPlan:
    """What a sampler run draws: jobs [(row, k)] (a size or composition row, and the k-th sample of it), the size of
    each job (for size-ordered batches), request(rows, by_size) -> the process's request for those rows, and info
    {key: [value of each row]} that each structure's extxyz info records (a conditional request's values)."""

    jobs: list
    sizes: object
    request: object
    info: dict = field(default_factory=dict)


def _write_extxyz(path: Path, structures: list) -> None:
    import ase.io

    from models.fileio import atomic_write
    atomic_write(path, lambda tmp: ase.io.write(tmp, structures, format="extxyz"))


DOMAIN_FLAGS = Molecules.FLAGS + Crystals.FLAGS


def all_samplers() -> list[str]:
    """Every sampler name of every process of both kinds of domain (sample.py's --method choices)."""
    return sorted({m for kind in (Molecules, Crystals) for path in kind.PROCESSES.values() for m in _load(path).SAMPLERS})


def get_domain(name: str) -> Domain:
    """The domain of a --data name: qm9, or a CDVAE crystal set."""
    if name == "qm9":
        return Molecules(name)
    if name in CRYSTAL_DATA:
        return Crystals(name)
    raise ValueError(f"unknown data set {name!r}; known: {', '.join(DATA_SETS)}")


def domain_of(ckpt: dict) -> Domain:
    """The domain a generative checkpoint was trained on (models.checkpoint fills in older checkpoints' defaults)."""
    return Molecules("qm9") if ckpt["domain"] == "molecules" else Crystals(ckpt["data"])
