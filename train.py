"""Train a 3D generative model of molecules or crystals (every --arch x --gen combination), or a student force
field on label.py's labels (--task ff): one loop for all.

    python train.py --arch gnn --gen flow --preset small            # one device (CUDA if present, else CPU)
    python train.py --data perov5 --csp --train-split val           # crystal structure prediction (CDVAE sets)
    torchrun --nproc_per_node 8 train.py --arch gnn --gen flow ...  # data-parallel, same flags
    python train.py --task ff --data labels.h5 [more.h5 ...]        # student of the teacher that labelled them

Reads top to bottom: flags, distributed setup, data, model, optimiser, checkpoints, loop. Only rank 0
writes files. Writes OUT/ckpt.pt (+ config.json), OUT/log.jsonl and OUT/train.log; at the last step also
OUT/weights.pt, the EMA weights alone (sample.py --ckpt reads it).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import queue
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

from models import ARCH_NAMES, CRYSTAL_DATA, PROCESS_NAMES, RECIPE_DEFAULTS
from models.cli import (checked_device, clip_value, decay, fraction, nonnegative_float, nonnegative_int, positive_float,
                        positive_int, writable_dir)

# ----------------------------------------------------------------------------------------------
# Flags. A preset sets model size, data size and schedule; any flag given explicitly wins.

PRESETS = {
    # seconds on a CPU: tests and smoke runs
    "tiny": dict(hidden=32, n_layers=2, iters=60, batch_size=16, n_train=256, lr=2e-3, warmup=10,
                 log_every=10, eval_every=0, eval_samples=32, sample_steps=10, val_size=64),
    # the README's CPU default: about 9 minutes on 2 cores
    "small": dict(hidden=64, n_layers=4, iters=2500, batch_size=64, n_train=None, lr=1e-3, warmup=100,
                  log_every=50, eval_every=500, eval_samples=100, sample_steps=50, val_size=512),
    # a GPU
    "base": dict(hidden=128, n_layers=6, iters=200_000, batch_size=128, n_train=None, lr=5e-4, warmup=2000,
                 log_every=100, eval_every=10_000, eval_samples=500, sample_steps=100, val_size=2000),
    "large": dict(hidden=256, n_layers=9, iters=500_000, batch_size=256, n_train=None, lr=3e-4, warmup=5000,
                  log_every=100, eval_every=20_000, eval_samples=1000, sample_steps=100, val_size=4000),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", choices=["gen", "ff"], default="gen", help="gen: a generative model; ff: a student force field (models/forcefield.py) on --data labels files")
parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default=None, help="--task gen: backbone network (default gnn)")
parser.add_argument("--gen", choices=sorted(PROCESS_NAMES), default=None, help="--task gen: generative process (default flow)")
parser.add_argument("--data", nargs="+", default=None, help="--task gen: the data set: qm9 (default), or the CDVAE crystal sets perov5, carbon24, mp20; --task ff: label.py's labels files (.h5) of one teacher")
parser.add_argument("--csp", action="store_true", help="crystals: structure prediction (the composition is given; lattice and coordinates are generated) instead of de novo generation")
parser.add_argument("--train-split", choices=["train", "val"], default="train", help="crystals: the CDVAE split to train on; val where the train file cannot be had (offline), with 5 %% of it (by a hash of material_id) held out for validation")
parser.add_argument("--data-dir", default=None, help="where the data cache lives (default: ./data or $MOLGEN_DATA)")
parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model/data/schedule size")
parser.add_argument("--hidden", type=positive_int, help="hidden width of the backbone (preset)")
parser.add_argument("--n-layers", type=positive_int, help="number of backbone layers (preset)")
parser.add_argument("--cfconv-cutoff", type=nonnegative_float, default=0.0, help="molecules, gnn: add a radius-graph continuous-filter convolution with this cutoff in A (fused Triton kernel on CUDA; 0: off)")
parser.add_argument("--iters", type=positive_int, help="optimisation steps in total (preset)")
parser.add_argument("--batch-size", type=positive_int, help="global batch size in molecules, crystals or structures, split over ranks (preset)")
parser.add_argument("--batching", choices=["random", "size"], default=None, help="--task gen: size (default; with --resume, the "
                    "checkpoint's): batches of similar-sized structures, padded only to their largest (about 2 x the structures/s on "
                    "QM9); random: batches drawn uniformly, padded to the largest structure of the data set")
parser.add_argument("--n-train", type=positive_int, help="use only the first N training molecules / structures (preset; default all)")
parser.add_argument("--lr", type=positive_float, help="peak learning rate of AdamW (preset)")
parser.add_argument("--warmup", type=nonnegative_int, help="linear warm-up steps before cosine decay (preset)")
parser.add_argument("--min-lr-ratio", type=fraction, default=0.1, help="final learning rate as a fraction of the peak")
parser.add_argument("--weight-decay", type=nonnegative_float, default=1e-12, help="AdamW weight decay")
parser.add_argument("--grad-clip", type=clip_value, default=1.0, help="clip the global gradient norm to this (0: off), or adaptive: "
                    "to 1.5 x the mean + 2 x the standard deviation of the last 50 steps' (clipped) norms, as EDM does")
parser.add_argument("--ema-decay", type=decay, default=0.999, help="decay of the EMA weights used for sampling")
parser.add_argument("--time-tilt", type=fraction, default=0.0, help="--task gen: draw training times with density "
                    "proportional to the loss weight to this power, and divide the weight by that density: 0 uniform times, 1 the "
                    "draws where the weight is; the same objective, with another variance (models/time.py; no effect where the "
                    "loss is unweighted: diffusion)")
parser.add_argument("--time-frequencies", type=nonnegative_int, default=None, help="--task gen: K: the backbone also sees sin "
                    "and cos of 2^k pi t for k < K (Fourier time features; 0: t alone). Default 6 for molecules (the recipe "
                    "ablation's winner), 0 for crystals (not ablated there); with --resume, the checkpoint's")
parser.add_argument("--self-condition", action=argparse.BooleanOptionalAction, default=None, help="molecules: the backbone "
                    "also sees its own estimate of the clean molecule (from a no-gradient pass on half the batches; the "
                    "previous step's when sampling). Default on for molecules (the recipe ablation's winner; "
                    "--no-self-condition: off); with --resume, the checkpoint's")
parser.add_argument("--ot-align", action="store_true", help="molecules, flow: equivariant OT alignment of prior and data")
parser.add_argument("--gamma-scale", type=nonnegative_float, default=None, help="molecules, interpolant: a in the latent noise gamma_t^2 = a t (1 - t) (default: the config's; 0 is flow matching's path)")
parser.add_argument("--cutoff", type=positive_float, default=5.0, help="ff: radius of the student's neighbour graph (A)")
parser.add_argument("--energy-weight", type=nonnegative_float, default=1.0, help="ff: weight of the energy-per-atom loss")
parser.add_argument("--force-weight", type=nonnegative_float, default=10.0, help="ff: weight of the force loss")
parser.add_argument("--stress-weight", type=nonnegative_float, default=1.0, help="ff: weight of the stress loss (crystals)")
parser.add_argument("--val-fraction", type=fraction, default=0.05, help="ff: fraction of structures held out for validation (by a hash of their key, so stable across files)")
parser.add_argument("--compile", action="store_true", help="torch.compile the model")
parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of data order, noise and initialisation")
parser.add_argument("--out", default=None, help="output directory (default: out/<data>[_csp]_<arch>_<gen>_<preset>)")
parser.add_argument("--init-from", default=None, help="--task gen: start a new run from the EMA weights of another run's checkpoint (ckpt.pt, weights.pt, or a "
                    "shipped model such as models/pretrained/qm9_gnn_flow.pt): its backbone, process, data and model flags, with a fresh "
                    "optimiser, schedule and step count. A second stage: fine-tuning, or training on where --resume cannot (the "
                    "first run's optimiser state is gone)")
parser.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt: weights, EMA, optimiser, schedule, RNG, step; the logs are cut back to its step")
parser.add_argument("--overwrite", action="store_true", help="start a new run in an OUT that holds one: its checkpoints and logs are deleted")
parser.add_argument("--override", action="store_true", help="with --resume: accept run-defining flags (iters, batch size, seed, lr, schedule, EMA, n-train, preset) that differ from the checkpoint's; they apply from its step on")
parser.add_argument("--max-bad-steps", type=positive_int, default=10, help="stop when this many steps in a row have a non-finite loss or gradient (each is skipped)")
parser.add_argument("--log-every", type=positive_int, help="steps between progress lines (preset)")
parser.add_argument("--eval-every", type=nonnegative_int, help="steps between validation loss + a quick sample check: molecule stability, crystal validity or structure-prediction match rate (0: only at the end) (preset)")
parser.add_argument("--eval-samples", type=nonnegative_int, help="molecules or crystals sampled for that check (preset)")
parser.add_argument("--sample-steps", type=positive_int, help="ODE steps of the periodic sampling check (preset)")
parser.add_argument("--val-size", type=positive_int, help="validation molecules / structures for the validation loss and MAE (preset)")
parser.add_argument("--ckpt-every", type=positive_int, default=500, help="steps between checkpoints (also written at the end)")
parser.add_argument("--stop-after", type=positive_int, default=None, help="run at most this many steps now, checkpoint and exit (time-limited jobs; continue with --resume)")
parser.add_argument("--wandb", default=None, help="wandb project name (logs there if wandb is installed)")
args = parser.parse_args()
explicit = {k for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}  # set on the command line
for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
FF_ONLY = ("cutoff", "energy_weight", "force_weight", "stress_weight", "val_fraction")
GEN_ONLY = ("arch", "gen", "cfconv_cutoff", "ot_align", "gamma_scale", "csp", "train_split", "batching", "time_tilt",
            "time_frequencies", "self_condition")
MOLECULE_ONLY = ("cfconv_cutoff", "ot_align", "gamma_scale", "self_condition")
CRYSTAL_ONLY = ("csp", "train_split")
domain = None  # --task gen: "molecules" or "crystals", from --data
if args.task == "ff":
    if args.init_from:
        parser.error("--init-from applies to --task gen; a student force field starts from reference energies fitted to its labels")
    if given := [k for k in GEN_ONLY if getattr(args, k) not in (None, False, 0.0, parser.get_default(k))]:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in given)}: options of --task gen; --task ff trains the "
                     f"student force field of models/forcefield.py")
    if not args.data:
        parser.error("--task ff needs --data LABELS.h5 [...]: label.py's output")
    for path in args.data:
        if not Path(path).is_file():
            parser.error(f"--data {path}: no such labels file")
    args.data = [str(Path(p)) for p in args.data]
else:
    if given := [k for k in FF_ONLY if getattr(args, k) != parser.get_default(k)]:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in given)}: options of --task ff")
    args.arch, args.gen = args.arch or "gnn", args.gen or "flow"
    args.data = (args.data or ["qm9"])[0] if len(args.data or [None]) == 1 else args.data
    if args.data not in ("qm9",) + CRYSTAL_DATA:
        parser.error(f"--data {args.data if isinstance(args.data, str) else ' '.join(args.data)}: --task gen trains on "
                     f"one of qm9, {', '.join(CRYSTAL_DATA)}")
    domain = "molecules" if args.data == "qm9" else "crystals"
    wrong = CRYSTAL_ONLY if domain == "molecules" else MOLECULE_ONLY
    if given := [k for k in wrong if getattr(args, k) not in (None, False, 0.0, parser.get_default(k))]:
        parser.error(f"{', '.join('--' + k.replace('_', '-') for k in given)}: not an option for {domain} (--data {args.data})")
if args.cfconv_cutoff and args.arch != "gnn":
    parser.error(f"--cfconv-cutoff is an option of --arch gnn, not --arch {args.arch}")
if args.ot_align and args.gen != "flow":
    parser.error(f"--ot-align is an option of --gen flow, not --gen {args.gen}")
if args.gamma_scale is not None and args.gen != "interpolant":
    parser.error(f"--gamma-scale is an option of --gen interpolant, not --gen {args.gen}")
if args.resume and args.overwrite:
    parser.error("--resume continues the run in OUT and --overwrite deletes it: give one of them")
if args.override and not args.resume:
    parser.error("--override applies to --resume only")
if args.init_from and not Path(args.init_from).is_file():
    parser.error(f"--init-from {args.init_from}: no such checkpoint file")
default_out = f"out/{args.data}{'_csp' if args.csp else ''}_{args.arch}_{args.gen}_{args.preset}" if args.task == "gen" else \
    f"out/ff_{Path(args.data[0]).stem}_{args.preset}"
out_dir = Path(args.out or default_out)
writable_dir(parser, out_dir, "--out")

# torch and the models are imported once the flags are known to be good: a bad flag fails at once.
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import numpy as np  # noqa: E402
from ase.data import chemical_symbols  # noqa: E402

from models import arch_class, process_class  # noqa: E402
from models.checkpoint import (CheckpointError, build_model, build_student, config_from_dict, export_weights,  # noqa: E402
                               load_checkpoint, save_checkpoint)
from models.crystal_metrics import csp_metrics, composition_valid, structure_valid  # noqa: E402
from models.crystals import PaddedCrystals, holdout_mask, load_crystals, unpad  # noqa: E402
from models.geometry import LatticeScaler  # noqa: E402
from models.molecules import ATOM_SYMBOLS, ATOMIC_NUMBERS, DataError, PaddedMolecules, load_qm9  # noqa: E402
from models.fileio import Busy, ExclusiveLock, is_disk_full, remove_stale_temporaries  # noqa: E402
from models.forcefield import ForceField, ForceFieldConfig, ForceFieldObjective, fit_reference_energies  # noqa: E402
from models.labelled_data import EV_PER_A3_IN_GPA, LabelledStructures  # noqa: E402
from models.labels import LabelsError  # noqa: E402
from models.molecule_metrics import stability  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Distributed setup: the same file runs alone or under torchrun.

ddp = "RANK" in os.environ
if ddp:
    if args.device is not None:
        checked_device(parser, args.device)
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:  # share the cores between the processes on this node
        torch.set_num_threads(max(1, os.cpu_count() // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
else:
    rank, world = 0, 1
    device = checked_device(parser, args.device)
master = rank == 0
if args.batch_size % world:
    raise SystemExit(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world})")
local_batch = args.batch_size // world
# bf16 autocast for the generative models on CUDA; a force field's forces are derivatives, trained in float32
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and args.task == "gen" else \
    torch.autocast(device.type, enabled=False)

# ----------------------------------------------------------------------------------------------
# Run directory: a new run never overwrites an old one by accident, and a resumed run continues exactly
# where its checkpoint stopped, logs included.

try:  # one process writes a run directory (the lock is held until exit); a second train.py is refused, naming the first
    run_lock = ExclusiveLock(out_dir / "train", what=f"the run directory {out_dir}") if master else None
except Busy as e:
    raise SystemExit(str(e))
ckpt_path, prev_ckpt_path = out_dir / "ckpt.pt", out_dir / "ckpt.prev.pt"
run_files = [out_dir / name for name in ("ckpt.pt", "ckpt.prev.pt", "config.json", "log.jsonl", "train.log")]
# Flags that define a run: changing them on --resume makes a different run. The model's sizes come from the
# checkpoint, so they cannot change at all.
RUN_FLAGS = ("iters", "batch_size", "seed", "warmup", "lr", "min_lr_ratio", "weight_decay", "grad_clip", "ema_decay",
             "n_train", "preset", "batching") + (("data", "energy_weight", "force_weight", "stress_weight", "val_fraction") if args.task == "ff" else ())
MODEL_FLAGS = ("hidden", "n_layers") + (("cfconv_cutoff", "ot_align", "gamma_scale", "data", "csp", "train_split", "time_tilt",
                                          "time_frequencies", "self_condition", "init_from")
                                         if args.task == "gen" else ("cutoff",))


def changes(keys, stored: dict) -> str:
    return ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (checkpoint: {stored[k]})"
                     for k in keys if k in stored and stored[k] != getattr(args, k))


def adopt_model_flags(stored: dict, keys, source: str, advice: str) -> None:
    """The model is rebuilt from a checkpoint whose flags are `stored`: a model flag left unset (a preset's value)
    becomes the checkpoint's, one set to another value is refused. --data and --csp chose the domain before any
    checkpoint was read, so they must match as they are."""
    if changed := changes([k for k in keys if k in explicit or k in ("data", "csp")], stored):
        raise SystemExit(f"{source}: {changed}; {advice}")
    for key in (k for k in keys if k in stored):
        setattr(args, key, stored[key])


resume_ckpt, resume_path = None, ckpt_path
if args.resume:
    try:
        resume_ckpt = load_checkpoint(ckpt_path, arch=args.arch, gen=args.gen, resume=True, task=args.task)
    except CheckpointError as e:
        if not prev_ckpt_path.exists():
            raise SystemExit(f"cannot resume: {e}")
        try:  # the previous checkpoint is kept beside the last one for exactly this
            resume_ckpt, resume_path = load_checkpoint(prev_ckpt_path, arch=args.arch, gen=args.gen, resume=True, task=args.task), prev_ckpt_path
        except CheckpointError as e_prev:
            raise SystemExit(f"cannot resume: {e}; and {e_prev}")
        print(f"warning: {e}; resuming from the previous checkpoint {prev_ckpt_path}", file=sys.stderr)
    stored = resume_ckpt["args"]
    # flags left unset take the checkpoint's value, or for runs from before the flag what they did then: batches
    # drawn at random, t alone, no self-conditioning
    for key, before_the_flag in (("batching", "random"), ("time_frequencies", 0), ("self_condition", False)):
        if getattr(args, key) is None:
            setattr(args, key, stored.get(key, before_the_flag))
    adopt_model_flags(stored, MODEL_FLAGS, f"cannot resume {resume_path}", "the model is rebuilt from the checkpoint, so these "
                      "cannot change. Drop those flags, or start a new run in another --out")
    if (changed := changes(RUN_FLAGS, stored)) and not args.override:
        raise SystemExit(f"cannot resume {resume_path}: {changed}; these define the run. Give the checkpoint's values, "
                         f"or add --override to change them from its step on")
elif any(p.exists() for p in run_files if p.name != "train.log"):  # a run that stopped before its first step
    if not args.overwrite:  # (bad data, say) leaves only train.log: the next attempt appends to it
        what = "a checkpoint (ckpt.pt)" if ckpt_path.exists() or prev_ckpt_path.exists() else "the logs of an earlier run"
        raise SystemExit(f"{out_dir} holds {what}. Continue it with --resume, start over there with --overwrite "
                         f"(deletes its checkpoints and logs), or give another --out")
init_ckpt = None  # --init-from: a new run whose model is another run's (its EMA weights and every model flag)
if args.init_from and resume_ckpt is None:
    try:
        init_ckpt = load_checkpoint(args.init_from, arch=args.arch, gen=args.gen)
    except CheckpointError as e:
        raise SystemExit(f"--init-from: {e}")
    if "args" not in init_ckpt:
        raise SystemExit(f"--init-from {args.init_from}: the checkpoint holds no train.py flags ('args'), so its model flags are unknown")
    adopt_model_flags(init_ckpt["args"], [k for k in MODEL_FLAGS if k != "init_from"], f"--init-from {args.init_from}",
                      "the model is the checkpoint's. Drop those flags, or give its values")
if args.batching is None:  # the force field's flat batches have no padding: "random" is what its runs have stored
    args.batching = "size" if args.task == "gen" else "random"
if args.time_frequencies is None and args.task == "gen":
    args.time_frequencies = RECIPE_DEFAULTS[domain]["time_frequencies"]
if args.self_condition is None:
    args.self_condition = args.task == "gen" and RECIPE_DEFAULTS[domain].get("self_condition", False)
if ddp:  # every rank has looked at OUT before rank 0 changes it
    dist.barrier()
if args.overwrite and master:
    for p in run_files:
        p.unlink(missing_ok=True)

log_file = None
if master:
    for p in (ckpt_path, prev_ckpt_path, out_dir / "config.json"):
        remove_stale_temporaries(p)  # left by a checkpoint write that was killed
    if resume_ckpt is not None:  # lines logged after the checkpoint would appear twice
        for name, size in resume_ckpt.get("log_bytes", {}).items():
            if (out_dir / name).exists() and (out_dir / name).stat().st_size > size:
                os.truncate(out_dir / name, size)
    log_file = open(out_dir / "train.log", "a")


def log(line: str) -> None:
    if master:
        tqdm.write(line)
        log_file.write(line + "\n")
        log_file.flush()


def log_json(record: dict) -> None:
    if master:
        with open(out_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            wandb_run.log(record, step=record["step"])


# ----------------------------------------------------------------------------------------------
# Data. gen: every batch is padded to the data set's largest molecule: one shape for torch.compile, and
# noise drawn for the global batch can be sliced by rank. ff: flat batches of labelled structures with
# their neighbour lists, split into train / validation by a hash of each structure's key.

t_load = time.time()
if args.task == "gen" and domain == "crystals":
    try:
        train_crystals = load_crystals(args.data, args.train_split, args.data_dir, progress=master)
        if args.train_split == "val":  # the validation split is the training set: hold a fixed part of it out
            held = holdout_mask(train_crystals.ids, 0.05)
            valid_crystals, train_crystals = train_crystals.subset(np.flatnonzero(held)), train_crystals.subset(np.flatnonzero(~held))
        else:
            valid_crystals = load_crystals(args.data, "val", args.data_dir, progress=master)
    except DataError as e:
        raise SystemExit(f"train.py: {e}")
    if args.n_train:
        train_crystals = train_crystals.subset(range(min(args.n_train, len(train_crystals))))
    valid_crystals = valid_crystals.subset(range(min(args.val_size, len(valid_crystals))))
    # the vocabulary and the lattice statistics belong to the model: a resumed run keeps the checkpoint's
    model_ckpt = resume_ckpt if resume_ckpt is not None else init_ckpt
    elements = model_ckpt["elements"] if model_ckpt is not None else \
        sorted(set(train_crystals.elements()) | set(valid_crystals.elements()))
    n_max = int(max(train_crystals.n_atoms.max(), valid_crystals.n_atoms.max()))
    try:
        train_set = PaddedCrystals(train_crystals, elements, n_max, f"{args.data} {args.train_split}")
        valid_set = PaddedCrystals(valid_crystals, elements, n_max, f"{args.data} validation")
    except DataError as e:
        raise SystemExit(f"train.py: {e}")
    n_atoms_hist = train_crystals.n_atoms_histogram().tolist()
    log(f"data: {args.data} ({args.train_split} split): {len(train_set)} train / {len(valid_set)} validation crystals, "
        f"{len(elements)} elements, n_max {n_max}, loaded in {time.time() - t_load:.1f} s")
elif args.task == "gen":
    try:
        train_mols, valid_mols = load_qm9("train", args.data_dir), load_qm9("valid", args.data_dir)
    except DataError as e:
        raise SystemExit(f"train.py: {e}")
    if args.n_train:
        train_mols = train_mols.subset(range(min(args.n_train, len(train_mols))))
    valid_mols = valid_mols.subset(range(min(args.val_size, len(valid_mols))))
    n_max = int(max(train_mols.n_atoms.max(), valid_mols.n_atoms.max()))
    train_set, valid_set = PaddedMolecules(train_mols, n_max), PaddedMolecules(valid_mols, n_max)
    n_atoms_hist = train_mols.n_atoms_histogram().tolist()
    log(f"data: {len(train_set)} train / {len(valid_set)} validation molecules, n_max {n_max}, loaded in {time.time() - t_load:.1f} s")
else:
    try:
        labelled = LabelledStructures.load(args.data)
    except LabelsError as e:
        raise SystemExit(f"train.py: {e}")
    if resume_ckpt is not None and (labelled.teacher, labelled.teacher_version) != (resume_ckpt["teacher"], resume_ckpt["teacher_version"]):
        raise SystemExit(f"cannot resume {resume_path}: it learned {resume_ckpt['teacher']} ({resume_ckpt['teacher_version']}), and "
                         f"{', '.join(args.data)} hold labels of {labelled.teacher} ({labelled.teacher_version}). A student learns one teacher")
    train_set, valid_set = labelled.split(args.val_fraction)
    if not len(train_set) or not len(valid_set):
        raise SystemExit(f"train.py: the {len(labelled)} structures of {', '.join(args.data)} leave {len(train_set)} for training and "
                         f"{len(valid_set)} for validation (--val-fraction {args.val_fraction}); label more, or change --val-fraction")
    if args.n_train:
        train_set = train_set.subset(range(min(args.n_train, len(train_set))))
    valid_set = valid_set.subset(range(min(args.val_size, len(valid_set))))
    n_max = 0  # flat batches: no padding
    log(f"data: {len(train_set)} train / {len(valid_set)} validation structures ({int(train_set.c['n_atoms'].sum()):,} / "
        f"{int(valid_set.c['n_atoms'].sum()):,} atoms, {int(train_set.periodic.sum())} / {int(valid_set.periodic.sum())} periodic) "
        f"labelled by {labelled.teacher} ({labelled.teacher_version}), loaded in {time.time() - t_load:.1f} s")


atom_counts = train_set.mask.sum(1) if args.task == "gen" else None  # structure sizes, for --batching size
if args.batching == "size" and len(train_set) < args.batch_size:
    raise SystemExit(f"--batching size needs at least one whole batch of training structures: {len(train_set)} < "
                     f"--batch-size {args.batch_size}")


def load_batch(data, idx, global_idx=None) -> dict:
    """The batch of `idx`; for ff, normalised over the global batch `global_idx` that this rank holds a part of."""
    return data.batch(idx, device) if args.task == "gen" else \
        data.batch(idx, device, args.cutoff, global_index=global_idx, world=world if global_idx is not None else 1)


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def epoch_permutation(epoch: int) -> torch.Tensor:
    return torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))


@functools.lru_cache(maxsize=2)
def size_grouped_batches(epoch: int) -> torch.Tensor:
    """--batching size: the epoch's batches [len // batch_size, batch_size]. The epoch's permutation is cut into
    pools of 32 batches; each pool is sorted by structure size and cut into batches, and the batches of the epoch
    are shuffled. Batches hold similar sizes yet stay random, and depend on (seed, epoch) alone. The structures
    left over by the last whole batch sit this epoch out (another set each epoch)."""
    perm = epoch_permutation(epoch)
    n_batches, pool = len(perm) // args.batch_size, 32 * args.batch_size
    perm = perm[: n_batches * args.batch_size]
    grouped = torch.cat([p[torch.argsort(atom_counts[p], stable=True)] for p in perm.split(pool)])
    order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch + 50_000))
    return grouped.view(n_batches, args.batch_size)[order]


def batch_indices(step: int) -> torch.Tensor:
    """The global batch of a step: a fresh seeded permutation each epoch, so any step can be rebuilt
    from (seed, step) alone and a resumed run sees exactly the batches it would have seen."""
    if args.batching == "size":
        n_batches = len(train_set) // args.batch_size
        return size_grouped_batches(step // n_batches)[step % n_batches]
    positions = torch.arange(step * args.batch_size, (step + 1) * args.batch_size)
    epochs, within = positions // len(train_set), positions % len(train_set)
    return torch.stack([epoch_permutation(int(e))[i] for e, i in zip(epochs, within)])


def step_generator(step: int, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(args.seed * 1_000_003 + step * 7 + salt)


# ----------------------------------------------------------------------------------------------
# Model, process, optimiser, schedule, EMA

# objective: the generative process (gen) or the force-field loss (ff); the loop calls its draw_noise and loss
if resume_ckpt is not None:  # the checkpoint's configs win over the flags
    try:
        model, objective = (build_model if args.task == "gen" else build_student)(resume_ckpt, weights="model")
    except CheckpointError as e:
        raise SystemExit(f"cannot resume from {resume_path}: {e}")
elif init_ckpt is not None:  # the model (and so the EMA) starts from the checkpoint's EMA weights
    torch.manual_seed(args.seed)
    try:
        model, objective = build_model(init_ckpt, weights="ema")
    except CheckpointError as e:
        raise SystemExit(f"--init-from {args.init_from}: {e}")
    log(f"initialised from {args.init_from}: the EMA weights of its step {init_ckpt['step']}")
elif args.task == "gen":
    torch.manual_seed(args.seed)
    arch_cls, proc_cls = arch_class(domain, args.arch), process_class(domain, args.gen)
    extra = {"cfconv_cutoff": args.cfconv_cutoff} if args.cfconv_cutoff else {}
    if args.self_condition:
        extra["self_condition"] = True
    n_types = len(ATOM_SYMBOLS) if domain == "molecules" else len(elements)
    model = arch_cls(arch_cls.Config(n_types=n_types, hidden=args.hidden, n_layers=args.n_layers,
                                     time_frequencies=args.time_frequencies, **extra))
    process_options = {"n_types": n_types, "time_tilt": args.time_tilt}
    if domain == "crystals":
        scaler = LatticeScaler.fit(train_set.lengths, train_set.angles)
        process_options.update(csp=args.csp, lattice_mean=scaler.state()["mean"], lattice_std=scaler.state()["std"])
    if args.ot_align:
        process_options["ot_align"] = True
    if args.self_condition:
        process_options["self_condition"] = True
    if args.gamma_scale is not None:
        process_options["gamma_scale"] = args.gamma_scale
    objective = proc_cls(config_from_dict(proc_cls.Config, process_options))
else:
    torch.manual_seed(args.seed)
    model = ForceField(ForceFieldConfig(elements=labelled.elements, hidden=args.hidden, n_layers=args.n_layers, cutoff=args.cutoff))
    with torch.no_grad():  # per-element energies by least squares and the force scale: the network learns the rest
        e0 = fit_reference_energies(train_set.structure_numbers(), train_set.c["energy"], model.config.elements)
        model.reference_energy.copy_(torch.from_numpy(e0))
        model.energy_scale.fill_(train_set.force_rms())
    objective = ForceFieldObjective(ForceFieldObjective.Config(
        energy_weight=args.energy_weight, force_weight=args.force_weight, stress_weight=args.stress_weight,
        force_scale=train_set.force_rms(), stress_scale=train_set.stress_rms()))
model.to(device)
ema = copy.deepcopy(model).requires_grad_(False)
n_params = sum(p.numel() for p in model.parameters())
if args.task == "gen":
    log(f"model: {args.arch} {asdict(model.config)}, {n_params / 1e6:.2f} M parameters; process: {args.gen} {asdict(objective.config)}")
else:
    log(f"model: student force field {asdict(model.config)}, {n_params / 1e6:.3f} M parameters; loss {asdict(objective.config)}")

optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))


def lr_factor(step: int) -> float:
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.iters - args.warmup))
    return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


class AdaptiveClip:
    """EDM's gradient clipping: the threshold follows the recent norms (1.5 x their mean + 2 x their standard
    deviation over the last 50 steps), so it clips the rare spikes, where a fixed clip far below the typical norm
    rescales every step (QM9's global norm is 1e3-1e4 at initialisation and 3-120 later). The first step is not
    clipped. Its history is part of the checkpoint, so that resuming stays exact."""

    def __init__(self, history: list[float] | None = None, length: int = 50):
        self.history, self.length = list(history or []), length

    def threshold(self) -> float:
        if not self.history:
            return float("inf")
        norms = torch.tensor(self.history, dtype=torch.float64)
        return float(1.5 * norms.mean() + 2 * (norms.std() if len(norms) > 1 else 0.0))

    def record(self, norm: float, threshold: float) -> None:
        """Remember a good step's norm, as clipped (a spike does not raise the next thresholds)."""
        self.history = (self.history + [min(norm, threshold)])[-self.length:]


adaptive_clip = AdaptiveClip(resume_ckpt.get("clip_history") if resume_ckpt is not None else None) \
    if args.grad_clip == "adaptive" else None
start_step, run_seconds_before = 0, 0.0
if resume_ckpt is not None:
    try:
        ema.load_state_dict(resume_ckpt["ema"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise SystemExit(f"cannot resume from {resume_path}: its EMA or optimiser state does not fit the model ({e})")
    scheduler.load_state_dict(resume_ckpt["scheduler"])
    scheduler.base_lrs = [args.lr] * len(optimizer.param_groups)  # --override may have changed --lr
    start_step = resume_ckpt["step"]
    run_seconds_before = resume_ckpt.get("run_seconds", 0.0)  # (0 for checkpoints from before it was kept)
    torch.set_rng_state(resume_ckpt["rng"]["torch"])
    if device.type == "cuda" and resume_ckpt["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(resume_ckpt["rng"]["cuda"], device)
    log(f"resumed from {resume_path} at step {start_step}")

train_model = torch.compile(model) if args.compile else model
if ddp:
    train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)

wandb_run = None
if master and args.wandb:
    try:
        import wandb
        wandb_run = wandb.init(project=args.wandb, config=vars(args), dir=str(out_dir))
    except ImportError:
        log("wandb is not installed; logging to log.jsonl only")


@torch.no_grad()
def update_ema(step: int) -> None:
    decay = min(args.ema_decay, (1 + step) / (10 + step))  # short memory early on, when weights move fast
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def save(step: int) -> None:
    """Write ckpt.pt, keeping the one it replaces as ckpt.prev.pt (and weights.pt at the last step); never a
    checkpoint with non-finite weights."""
    if not master:
        return
    bad = [name for net in (model, ema) for name, p in net.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise SystemExit(f"step {step}: non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); not writing a "
                         f"checkpoint. The last good one is {ckpt_path}. Lower --lr (now {args.lr:g}) or --grad-clip.")
    log_file.flush()  # log.jsonl is closed after each record
    log_bytes = {name: (out_dir / name).stat().st_size for name in ("train.log", "log.jsonl") if (out_dir / name).exists()}
    if args.task == "gen":
        task_meta = {"domain": domain, "arch": args.arch, "gen": args.gen, "process_config": asdict(objective.config),
                     "atom_symbols": list(ATOM_SYMBOLS), "n_atoms_hist": n_atoms_hist}
        if domain == "crystals":  # the element vocabulary, by atomic number
            task_meta.update(elements=elements, atom_symbols=[chemical_symbols[z] for z in elements], csp=args.csp)
    else:  # the student knows whose labels it learned: label.py and evaluate.py name them
        task_meta = {"objective_config": asdict(objective.config), "teacher": labelled.teacher,
                     "teacher_version": labelled.teacher_version, "n_valid": len(valid_set)}
    state = {
        "task": args.task, "data": args.data, "step": step, "model_config": asdict(model.config), **task_meta,
        "n_params": n_params, "n_train": len(train_set), "train_flops_per_step": flops_per_step,
        "args": vars(args), "model": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "log_bytes": log_bytes,  # a resumed run cuts its logs back to these sizes
        "run_seconds": run_seconds(),
        **({"clip_history": adaptive_clip.history} if adaptive_clip else {}),
    }
    save_checkpoint(ckpt_path, state, keep_previous=out_dir / "ckpt.prev.pt")
    if step == args.iters:  # the finished run's EMA weights alone, to sample from or to share (a few MB)
        export_weights(state, out_dir / "weights.pt")


@torch.no_grad()
def evaluate(step: int) -> dict:
    """Validation loss of the EMA weights with fixed noise, and stability of freshly sampled molecules."""
    ema.eval()
    losses = []
    for lo in range(0, len(valid_set), local_batch):
        idx = torch.arange(lo, min(lo + local_batch, len(valid_set)))
        noise = objective.draw_noise(len(idx), n_max, step_generator(lo, salt=3))
        with autocast:
            losses.append(objective.loss(ema, valid_set.batch(idx, device), noise).item() * len(idx))
    record = {"step": step, "val_loss": sum(losses) / len(valid_set)}
    if args.eval_samples and domain == "crystals":
        record.update(crystal_quality())
    elif args.eval_samples:
        hist = torch.tensor(n_atoms_hist)
        gen = torch.Generator().manual_seed(args.seed + 17)
        n_atoms = torch.multinomial(hist, args.eval_samples, replacement=True, generator=gen)
        with autocast:
            out = objective.sample(ema, n_atoms, n_steps=args.sample_steps, generator=gen)
        types, pos, mask = (out[k].cpu() for k in ("types", "pos", "mask"))
        z = torch.tensor(ATOMIC_NUMBERS)[types]
        results = [stability(z[i][mask[i]].numpy(), pos[i][mask[i]].double().numpy()) for i in range(len(n_atoms))]
        record["mol_stability"] = sum(r[0] for r in results) / len(results)
        record["atom_stability"] = sum(r[1] for r in results) / sum(r[2] for r in results)
    return record


def crystal_quality() -> dict:
    """csp: match rate and RMSE of one sample for each of the first eval_samples validation crystals; de novo:
    structural and compositional validity of eval_samples fresh crystals."""
    gen = torch.Generator().manual_seed(args.seed + 17)
    if args.csp:
        truth = valid_set.batch(torch.arange(min(args.eval_samples, len(valid_set))))
        with autocast:
            out = objective.sample(ema, types=truth["types"], mask=truth["mask"], n_steps=args.sample_steps, generator=gen)
    else:
        n_atoms = torch.multinomial(torch.tensor(n_atoms_hist), args.eval_samples, replacement=True, generator=gen)
        with autocast:
            out = objective.sample(ema, n_atoms=n_atoms, n_steps=args.sample_steps, generator=gen)
    samples = unpad(out, elements)
    if args.csp:
        m = csp_metrics([[s] for s in samples], unpad(truth, elements), workers=1, progress=False)
        return {"match_rate": m["match_rate@1"], "rmse": m["rmse@1"]}
    return {"structural_validity": float(np.mean([structure_valid(*c) for c in samples])),
            "compositional_validity": float(np.mean([composition_valid(c[0]) for c in samples]))}


def evaluate_student(step: int) -> dict:
    """Validation loss and mean absolute errors of the EMA student against the teacher: energy per atom (meV),
    force components (meV/A) and, when crystals are held out, stress components (GPa). Forces are gradients, so
    this runs with autograd on (the weights need none)."""
    ema.eval()
    loss_sum, errors = 0.0, {}
    for lo in range(0, len(valid_set), local_batch):
        batch = load_batch(valid_set, range(lo, min(lo + local_batch, len(valid_set))))
        loss_sum += objective.loss(ema, batch, create_graph=False).item() * len(batch["energy"])
        for k, v in objective.absolute_errors(ema, batch).items():
            errors[k] = errors.get(k, 0) + v
    record = {"step": step, "val_loss": loss_sum / len(valid_set),
              "val_energy_mae_mev_per_atom": 1000 * errors["energy"] / errors["energy_n"],
              "val_force_mae_mev_per_a": 1000 * errors["forces"] / errors["forces_n"]}
    if errors["stress_n"]:
        record["val_stress_mae_gpa"] = EV_PER_A3_IN_GPA * errors["stress"] / errors["stress_n"]
    return record


class Prefetcher:
    """Builds the inputs of the coming steps on a thread while the current step runs; the time the loop still
    waits for them is what it logs as data wait. Inputs depend on the step alone, so prefetching changes nothing
    a resumed run would see."""

    def __init__(self, make, steps, depth: int = 2):
        self.queue = queue.Queue(depth)
        threading.Thread(target=self._produce, args=(make, steps), daemon=True).start()

    def _produce(self, make, steps):
        try:
            for step in steps:
                self.queue.put((make(step), None))
        except BaseException as e:  # handed to the loop, which raises it in the main thread
            self.queue.put((None, e))

    def next(self):
        inputs, error = self.queue.get()
        if error is not None:
            raise error
        return inputs


def epoch_widths() -> torch.Tensor:
    """The padded width of each of the first epoch's size-grouped batches."""
    return atom_counts[size_grouped_batches(0)].max(1).values


def step_inputs(step: int, width: int | None = None):
    """(batch, noise) of this rank at a step: both from (seed, step) alone. --batching size pads the batch only to
    the largest structure of the global batch, so that every rank draws the same noise; `width` overrides that
    padding (the FLOP count measures each width)."""
    idx = batch_indices(step)
    if width is None:
        width = int(atom_counts[idx].max()) if args.batching == "size" else n_max
    noise = {k: v[rows] for k, v in objective.draw_noise(args.batch_size, width, step_generator(step)).items()}
    if args.task == "ff":
        return load_batch(train_set, idx[rows], global_idx=idx), noise
    return train_set.batch(idx[rows], device, width=width), noise


def train_step_flops() -> float:
    """FLOPs of one global training step (forward and backward of the loss, times the ranks), counted by torch's
    FlopCounterMode: matrix products and convolutions, not elementwise work, the convention of scaling-law
    papers. Kernels outside torch (Triton on CUDA) are not seen. The dense backbones cost the same for every batch
    of one padded width, so with --batching size it is the mean over the widths of an epoch's batches, each
    counted once; flat force-field batches are counted on the first batch. Weights, gradients and the RNG are left
    as they were, so resuming stays exact. scale.py multiplies it by the steps."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(width: int | None) -> float:  # width None: the step's own padding
        batch, noise = step_inputs(start_step, width)
        # self-conditioning adds a no-gradient pass on half the batches (coin < 1/2): the mean of both kinds of step
        coins = [0.0, 1.0] if "self_condition" in noise else [None]
        total = 0
        for coin in coins:
            if coin is not None:
                noise["self_condition"] = torch.full_like(noise["self_condition"], coin)
            with FlopCounterMode(display=False) as counter, autocast:
                objective.loss(model, batch, noise).backward()
            model.zero_grad(set_to_none=True)
            total += counter.get_total_flops()
        return total / len(coins) * world

    rng = torch.get_rng_state()
    if args.batching == "size":  # (force-field runs store "random": their flat batches are not padded)
        widths, n_batches = epoch_widths().unique(return_counts=True)
        flops = sum(int(n) * count(int(w)) for w, n in zip(widths, n_batches)) / int(n_batches.sum())
    else:
        flops = count(None)
    torch.set_rng_state(rng)
    return flops


# ----------------------------------------------------------------------------------------------
# Loop

what = f"{args.arch} x {args.gen} on {args.data}{' (structure prediction)' if args.csp else ''}" if args.task == "gen" else \
    f"a student of {labelled.teacher} on {', '.join(args.data)}"
unit = "structures" if args.task == "ff" else "mol" if domain == "molecules" else "crystals"
log(f"training {what}: steps {start_step} -> {args.iters}, global batch {args.batch_size} "
    f"on {world} process(es), device {device}, out {out_dir}")
rows = slice(rank * local_batch, (rank + 1) * local_batch)
flops_per_step = train_step_flops()
log(f"{flops_per_step:.3g} FLOPs per training step (matrix products, forward and backward)")
if args.batching == "size":
    log(f"size-grouped batches: padded to {epoch_widths().double().mean():.1f} atoms "
        f"on average, not {n_max}")
end_step = args.iters if args.stop_after is None else min(args.iters, start_step + args.stop_after)
bar = tqdm(total=args.iters, initial=start_step, disable=not master, unit="step", dynamic_ncols=True,
           mininterval=0.1 if sys.stderr.isatty() else 10)  # a log file gets a line every 10 s, not 10 a second
t_start, t_last, seen, waited = time.time(), time.time(), 0, 0.0


def run_seconds() -> float:
    """The run's wall-clock so far, over all its sessions, evaluations included (what log.jsonl's time shows)."""
    return run_seconds_before + time.time() - t_start


bad_in_a_row, done = 0, start_step
model.train()
prefetch = Prefetcher(step_inputs, range(start_step, end_step))
try:
    for step in range(start_step, end_step):
        t_wait = time.time()
        batch, noise = prefetch.next()
        waited += time.time() - t_wait
        with autocast:
            loss = objective.loss(train_model, batch, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = adaptive_clip.threshold() if adaptive_clip else args.grad_clip if args.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # A non-finite loss or gradient skips the step (the weights and EMA stay as they were). This reads one
        # flag back from the device each step; under DDP the ranks agree on it, so they stay in lockstep.
        bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if ddp:
            bad = bad.to(torch.int32)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        done = step + 1
        if bool(bad):
            bad_in_a_row += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()  # the schedule follows the step count, skipped steps included
            log_json({"step": done, "skipped": "non-finite loss or gradient", "bad_in_a_row": bad_in_a_row})
            log(f"step {done:>7}/{args.iters} | non-finite loss ({loss.item():.3g}) or gradient norm ({grad_norm.item():.3g}): "
                f"step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"training diverged: {bad_in_a_row} steps in a row with a non-finite loss or gradient, up to "
                                 f"step {done}. Nothing was written after the last good checkpoint ({ckpt_path}). Lower --lr "
                                 f"(now {args.lr:g}), keep --grad-clip on (now {args.grad_clip}), or raise --max-bad-steps.")
        else:
            bad_in_a_row = 0
            if adaptive_clip:
                adaptive_clip.record(grad_norm.item(), max_norm)
            optimizer.step()
            scheduler.step()
            update_ema(step)
        seen += args.batch_size
        bar.update(1)

        if (done % args.log_every == 0 or done == args.iters) and not bad_in_a_row:
            loss_value = loss.detach()
            if ddp:  # the mean over ranks (gloo has no AVG)
                dist.all_reduce(loss_value)
                loss_value /= world
            now = time.time()
            per_s = seen / (now - t_last)
            eta = (args.iters - done) * args.batch_size / max(per_s, 1e-9)
            # data_wait: the fraction of the time since the last line that the loop waited for its inputs
            record = {"step": done, "loss": loss_value.item(), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm.item(), f"{unit}_per_s": per_s,
                      "data_wait": waited / (now - t_last), "time": run_seconds()}
            log_json(record)
            log(f"step {done:>7}/{args.iters} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad {record['grad_norm']:.2f} | {per_s:,.0f} {unit}/s | data wait {100 * record['data_wait']:.1f} % | "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            bar.set_postfix(loss=f"{record['loss']:.3f}", per_s=f"{per_s:,.0f}")
            t_last, seen, waited = now, 0, 0.0
        if master and ((args.eval_every and done % args.eval_every == 0) or done == args.iters):
            seconds = run_seconds()  # the run's time up to these weights, before evaluating them
            record = {**(evaluate(done) if args.task == "gen" else evaluate_student(done)), "time": seconds}
            log_json(record)
            log("eval " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            model.train()
        if done % args.ckpt_every == 0 or done == end_step:
            save(done)
except OSError as e:
    if not is_disk_full(e):
        raise
    raise SystemExit(f"{e} (train.py, step {done}). The checkpoint {ckpt_path} from the last --ckpt-every step is intact: "
                     f"free space in {out_dir} and rerun with --resume")
except KeyboardInterrupt:  # a step cut in half is not a state to save: the last checkpoint is the one to resume
    bar.close()
    raise SystemExit(f"interrupted at step {done} of {args.iters}; {ckpt_path} holds the last checkpoint (every --ckpt-every "
                     f"{args.ckpt_every} steps): the same command with --resume continues from it") from None
bar.close()
elapsed = time.time() - t_start
steps_run = end_step - start_step
log(f"{'done' if end_step == args.iters else f'stopped at step {end_step} (--stop-after)'}: {steps_run} steps in {elapsed:.1f} s ({steps_run * args.batch_size / max(elapsed, 1e-9):,.0f} {unit}/s "
    f"including evaluation); checkpoint {ckpt_path}")
if ddp:
    dist.destroy_process_group()
