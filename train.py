"""Train a 3D generative model of molecules or crystals (every --arch x --gen combination), or a student force
field on label.py's labels (--task ff): one loop for all.

    python train.py --arch gnn --gen flow --preset small            # one device (CUDA if present, else CPU)
    python train.py --data perov5 --csp --train-split val           # crystal structure prediction (CDVAE sets)
    torchrun --nproc_per_node 8 train.py --arch gnn --gen flow ...  # data-parallel, same flags
    python train.py --task ff --data labels.h5 [more.h5 ...]        # student of the teacher that labelled them

Reads top to bottom: flags, distributed setup, run directory, data, model, optimiser, checkpoints, loop. The task
(models/tasks.py: a domain's generative model, or the student) answers what differs; the loop's parts are in
models/training.py. Only rank 0 writes files. Writes OUT/ckpt.pt (+ config.json), OUT/log.jsonl and OUT/train.log;
at the last step also OUT/weights.pt, the EMA weights alone (sample.py --ckpt reads it).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from models.cli import (PRECISIONS, add_markdown_help, checked_device, clip_value, decay, float_in, fraction, nonnegative_float,
                        nonnegative_int, open_unit, positive_float, positive_int, writable_dir)
from models.domains import ARCH_NAMES, DATA_SETS, PROCESS_NAMES, get_domain

# ----------------------------------------------------------------------------------------------
# Flags. A preset sets model size, data size and schedule; any flag given explicitly wins.

PRESETS = {
    # seconds on a CPU: tests and smoke runs
    "tiny": dict(hidden=32, n_layers=2, iters=60, batch_size=16, n_train=256, lr=2e-3, warmup=10,
                 log_every=10, eval_every=0, eval_samples=32, sample_steps=10, val_size=64),
    # the README's CPU default: about 7 minutes of training on 2 cores
    "small": dict(hidden=64, n_layers=4, iters=2500, batch_size=64, n_train=None, lr=1e-3, warmup=100,
                  log_every=50, eval_every=500, eval_samples=100, sample_steps=50, val_size=512),
    # a GPU
    "base": dict(hidden=128, n_layers=6, iters=200_000, batch_size=128, n_train=None, lr=5e-4, warmup=2000,
                 log_every=100, eval_every=10_000, eval_samples=500, sample_steps=100, val_size=2000),
    "large": dict(hidden=256, n_layers=9, iters=500_000, batch_size=256, n_train=None, lr=3e-4, warmup=5000,
                  log_every=100, eval_every=20_000, eval_samples=1000, sample_steps=100, val_size=4000),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--task", choices=["gen", "ff", "oracle", "joint"], default="gen", help="gen: a generative model; ff: a student force field "
                    "(models/forcefield.py) on --data labels files; oracle: EDM's property oracle (models/oracle.py), a regressor of the "
                    "--condition properties on the other half of the training split from the one conditional generators train on; "
                    "joint: one generative model of a molecule set and a crystal set (--data qm9 perov5) through one trunk, on "
                    "alternating batches (models/joint.py; transformer or pairformer, one process)")
parser.add_argument("--arch", choices=sorted(ARCH_NAMES), default=None, help="--task gen: backbone network (default gnn); --task joint: "
                    "transformer (default) or pairformer")
parser.add_argument("--gen", choices=sorted(PROCESS_NAMES), default=None, help="--task gen: generative process (default flow)")
parser.add_argument("--data", nargs="+", default=None, help="--task gen: the data set: qm9 (default), or the CDVAE crystal sets perov5, carbon24, mp20; --task joint: a molecule "
                    "set and a crystal set (qm9 perov5); --task ff: label.py's labels files (.h5) of one teacher")
parser.add_argument("--csp", action="store_true", help="crystals: structure prediction (the composition is given; lattice and coordinates are generated) instead of de novo generation")
parser.add_argument("--lattice-per-atom", action="store_true", help="crystals: generate the cell's lengths per atom (divided by N^(1/3) before standardising), so that its volume follows its atom count by construction rather than being learnt")
parser.add_argument("--train-split", choices=["train", "val"], default="train", help="crystals: the CDVAE split to train on; val where the train file cannot be had (offline), with 5 %% of it (by a hash of material_id) held out for validation")
parser.add_argument("--max-atoms", type=positive_int, default=32, help="crystals: refuse training or validation data that "
                    "hold a crystal of more atoms than this, naming the largest (a batch is padded to its largest crystal, and "
                    "memory grows with the square of that; the CDVAE sets' largest cells: perov-5 5, MP-20 20, carbon-24 24)")
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
parser.add_argument("--discrete-types", action="store_true", help="molecules, flow: atom types on the masking path of discrete "
                    "flow matching (each atom shows its type with probability t, and the sampler reveals hidden ones along the "
                    "path's Markov chain, as SemlaFlow and FlowMol do) instead of continuous one-hot vectors x 0.25 on the "
                    "coordinates' path (models/molecule_flow.py)")
parser.add_argument("--distance-loss", type=nonnegative_float, default=0.0, help="molecules, flow and interpolant: weight of "
                    "an auxiliary loss on the predicted clean molecule's distances between atoms the data holds under 2 A apart "
                    "(bonds and the 1-3 distances of angles), weighted over t like the coordinates' (0: off)")
parser.add_argument("--min-one-minus-t", type=open_unit, default=None, help="molecules, flow and interpolant: the coordinate "
                    "loss weight 1 / (1 - t)^2 (velocity matching) is taken at t <= 1 - this, in (0, 1]: the config's 0.05 caps it at "
                    "400 (default); 1 weighs every t alike, a plain regression of the clean molecule")
parser.add_argument("--condition", nargs="+", default=None, metavar="PROP", help="condition the model on these properties: "
                    "QM9's alpha gap homo lumo mu Cv (EDM's units: Bohr^3, meV, meV, meV, D, cal/(mol K)), perov-5's heat_ref, "
                    "carbon-24's energy_per_atom (eV/atom; de novo only), trained on the generator's half of the training split as "
                    "EDM's protocol has it (the other half trains the oracle); sample.py --condition PROP=VALUE or the protocol's "
                    "draw, --guidance W. --task oracle: the properties the oracle predicts")
parser.add_argument("--condition-dropout", type=decay, default=0.1, help="with --condition: the share of training structures seen "
                    "without their condition, which trains the unconditional model classifier-free guidance needs (0: none; "
                    "sample.py --guidance then has only 1)")
parser.add_argument("--gamma-scale", type=nonnegative_float, default=None, help="molecules, interpolant: a in the latent noise gamma_t^2 = a t (1 - t) (default: the config's; 0 is flow matching's path)")
parser.add_argument("--cutoff", type=float_in(2, 12, "a radius in [2, 12] A"), default=5.0, help="ff: radius of the student's "
                    "neighbour graph (A), 2 to 12: below 2 an atom misses its neighbours (metals' nearest lie 2.5-3 A away), above "
                    "12 a crystal's atoms have thousands each, a number that grows as the cube of the radius")
parser.add_argument("--max-force", type=positive_float, default=100.0, help="ff: leave out, with a warning naming them, structures "
                    "with an atom's force above this (eV/A): a teacher's forces on generated molecules have an RMS near 1.5 and "
                    "strongly overlapping atoms give tens to hundreds, so past 100 a label is broken or a collision, whose "
                    "squared error would outweigh thousands of ordinary atoms. evaluate.py --task ff applies the student's bound")
parser.add_argument("--student", choices=["schnet", "painn"], default="schnet", help="ff: the student's layers: schnet "
                    "(invariant continuous filters over distances; the fused Triton kernel's form) or painn (equivariant vector "
                    "features, so directions and angles enter every layer; models/forcefield.py)")
parser.add_argument("--repulsion", type=float_in(0, 1, "a fraction in [0, 1]"), default=0.0, help="ff: add the ZBL nuclear "
                    "repulsion of pairs closer than this fraction of their covalent-radii sum (0: none; models/forcefield.py). At "
                    "0.6 no perov-5 or carbon-24 crystal holds such a pair, so it changes nothing the labels show and stops "
                    "relaxations from pulling atoms onto each other (models/EXPERIMENTS.md: it does not stop them into the "
                    "learnt part's spurious basins)")
parser.add_argument("--energy-weight", type=nonnegative_float, default=1.0, help="ff: weight of the energy-per-atom loss")
parser.add_argument("--force-weight", type=nonnegative_float, default=10.0, help="ff: weight of the force loss")
parser.add_argument("--stress-weight", type=nonnegative_float, default=1.0, help="ff: weight of the stress loss (crystals)")
parser.add_argument("--val-fraction", type=fraction, default=0.05, help="ff: fraction of structures held out for validation (by a hash of their key, so stable across files)")
parser.add_argument("--count-flops", action="store_true", help="count the FLOPs of a training step before the first one "
                    "(torch's FlopCounterMode, once per padded width: a few extra passes); scale.py's compute axis reads them")
parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor; the atom axis symbolic, so size-grouped "
                    "batches compile once per kind of step, in about a minute). On this CPU it pays on one thread and most with bf16: "
                    "kernels/step_bench.py measured the Transformer's step 1.9 x faster (bf16, its default here), the EGNN's 1.2 x in "
                    "fp32 (its default) and 1.7 x with --precision bf16 (over eager fp32), and no gain on two threads (kernels/README.md, "
                    "\"A step on this CPU\")")
parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="--task gen: autocast of the backbone; auto (default): bf16 on "
                    "CUDA, and on a CPU with AMX bf16 only for the backbones kernels/step_bench.py measured faster in it; fp32 on a "
                    "CPU without AMX (models/precision.py); --task ff trains in fp32 (forces are derivatives)")
parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of data order, noise and initialisation")
parser.add_argument("--out", default=None, help="output directory (default: out/<data>[_csp]_<arch>_<gen>_<preset>)")
parser.add_argument("--init-from", default=None, help="--task gen: start a new run from the EMA weights of another run's checkpoint (ckpt.pt, weights.pt, or a "
                    "shipped model such as models/pretrained/qm9_gnn_flow.pt): its backbone, process, data and model flags, with a fresh "
                    "optimiser, schedule and step count. A second stage: fine-tuning, or training on where --resume cannot (the "
                    "first run's optimiser state is gone). The objective's flags given beside it (--distance-loss, --min-one-minus-t, "
                    "--time-tilt, --gamma-scale) apply to the new run; with --condition on an unconditional checkpoint, its "
                    "embedding is widened for the condition with zero weights")
parser.add_argument("--init-trunk", default=None, help="--task gen, transformer and pairformer: start a new run whose trunk "
                    "(and the heads' shared parts, and the type embeddings of the elements both vocabularies hold) is another "
                    "run's EMA weights, of either domain: transfer between molecules and crystals (models/transfer.py). The "
                    "geometry embeddings and the crystal heads start new; --hidden and --n-layers must be the source's")
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
add_markdown_help(parser)
args = parser.parse_args()
explicit = {k for k, v in vars(args).items() if v is not None and v != parser.get_default(k)}  # set on the command line
for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
        setattr(args, key, value)
FF_ONLY = ("cutoff", "energy_weight", "force_weight", "stress_weight", "val_fraction", "max_force", "student", "repulsion")
GEN_ONLY = ("arch", "gen", "cfconv_cutoff", "ot_align", "discrete_types", "distance_loss", "min_one_minus_t", "gamma_scale", "csp", "train_split", "max_atoms", "lattice_per_atom", "batching",
            "time_tilt", "time_frequencies", "self_condition", "precision", "condition", "condition_dropout")


def given(keys) -> list[str]:
    """The flags of `keys` set to something other than off or their default."""
    return ["--" + k.replace("_", "-") for k in keys if getattr(args, k) not in (None, False, 0.0, parser.get_default(k))]


def not_default(keys) -> list[str]:
    """The flags of `keys` set to anything other than their default (off and 0 included)."""
    return ["--" + k.replace("_", "-") for k in keys if getattr(args, k) != parser.get_default(k)]


def single_data_set(what: str) -> str:
    """--data as the one data set a --task gen or oracle run takes (default qm9); a flag error, `what` one of the
    known sets, otherwise."""
    data = (args.data or ["qm9"])[0] if len(args.data or [None]) == 1 else args.data
    if data not in DATA_SETS:
        parser.error(f"--data {data if isinstance(data, str) else ' '.join(data)}: {what} one of {', '.join(DATA_SETS)}")
    return data


domain = None  # --task gen: the data set's domain (models/domains.py)
if args.task == "ff":
    if args.init_from:
        parser.error("--init-from applies to --task gen; a student force field starts from reference energies fitted to its labels")
    if given(GEN_ONLY):
        parser.error(f"{', '.join(given(GEN_ONLY))}: options of --task gen; --task ff trains the student force field of "
                     f"models/forcefield.py")
    if not args.data:
        parser.error("--task ff needs --data LABELS.h5 [...]: label.py's output")
    for path in args.data:
        if not Path(path).is_file():
            parser.error(f"--data {path}: no such labels file")
    args.data = [str(Path(p)) for p in args.data]
elif args.task == "oracle":
    if args.init_from:
        parser.error("--init-from applies to --task gen")
    if wrong := given([k for k in GEN_ONLY if k not in ("condition", "batching", "precision", "train_split", "max_atoms")]) + \
            not_default(FF_ONLY):
        parser.error(f"{', '.join(wrong)}: not options of --task oracle (a regressor of a data set's properties)")
    if not args.condition:
        parser.error("--task oracle needs --condition PROP [...]: the properties it predicts")
    args.data = single_data_set("--task oracle predicts the properties of")
elif args.task == "joint":
    from models.transfer import SHARED_ARCHS
    if wrong := given(("csp", "condition", "cfconv_cutoff", "init_from", "init_trunk", "count_flops")) + not_default(FF_ONLY):
        parser.error(f"{', '.join(wrong)}: not options of --task joint (de novo generation of two data sets through one trunk)")
    args.arch, args.gen = args.arch or "transformer", args.gen or "flow"
    if args.arch not in SHARED_ARCHS:
        parser.error(f"--task joint: --arch {args.arch} has no trunk the two domains share; {' or '.join(SHARED_ARCHS)} do (models/transfer.py)")
    kinds = [get_domain(d).kind if d in DATA_SETS else None for d in args.data or []]
    if sorted(map(str, kinds)) != ["crystals", "molecules"]:
        parser.error(f"--task joint needs --data MOLECULES CRYSTALS, one of each of {', '.join(DATA_SETS)} (qm9 perov5, say), not "
                     f"{' '.join(args.data or []) or 'none'}")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        parser.error("--task joint runs in one process: each step trains one domain's part, which torchrun's data-parallel "
                     "wrapper would see as unused weights")
else:
    if changed := not_default(FF_ONLY):
        parser.error(f"{', '.join(changed)}: options of --task ff")
    args.arch, args.gen = args.arch or "gnn", args.gen or "flow"
    args.data = single_data_set("--task gen trains on")
    domain = get_domain(args.data)
    if given(domain.foreign_flags()):
        parser.error(f"{', '.join(given(domain.foreign_flags()))}: not an option for {domain.kind} (--data {args.data})")
if args.cfconv_cutoff and args.arch != "gnn":
    parser.error(f"--cfconv-cutoff is an option of --arch gnn, not --arch {args.arch}")
for flag in ("ot_align", "discrete_types"):
    if getattr(args, flag) and args.gen != "flow":
        parser.error(f"--{flag.replace('_', '-')} is an option of --gen flow, not --gen {args.gen}")
for flag in ("distance_loss", "min_one_minus_t"):
    if getattr(args, flag) and args.gen == "diffusion":
        parser.error(f"--{flag.replace('_', '-')} is an option of --gen flow and interpolant, whose backbones predict the clean molecule")
if args.condition:
    conditioned = domain or get_domain(args.data)  # --task oracle: the properties of its data set
    if unknown := [c for c in args.condition if c not in conditioned.CONDITIONS]:
        parser.error(f"--condition {' '.join(unknown)}: {conditioned.name} {'has' if args.task == 'oracle' else 'is conditioned on'} "
                     f"{', '.join(conditioned.CONDITIONS) or 'no properties'}")
    if args.csp:
        parser.error("--condition applies to de novo generation; a --csp model is given its composition instead")
    if len(set(args.condition)) < len(args.condition):
        parser.error(f"--condition {' '.join(args.condition)} names a property twice")
elif args.condition_dropout != parser.get_default("condition_dropout"):
    parser.error("--condition-dropout applies to --condition")
if args.gamma_scale is not None and args.gen != "interpolant":
    parser.error(f"--gamma-scale is an option of --gen interpolant, not --gen {args.gen}")
if args.resume and args.overwrite:
    parser.error("--resume continues the run in OUT and --overwrite deletes it: give one of them")
if args.override and not args.resume:
    parser.error("--override applies to --resume only")
if args.init_from and not Path(args.init_from).is_file():
    parser.error(f"--init-from {args.init_from}: no such checkpoint file")
if args.init_trunk:
    if args.init_from or args.task != "gen":
        parser.error("--init-trunk starts a new generative run from another's trunk; --init-from from its whole model: give one")
    if not Path(args.init_trunk).is_file():
        parser.error(f"--init-trunk {args.init_trunk}: no such checkpoint file")
default_out = f"out/{domain.run_name(args)}_{args.arch}_{args.gen}_{args.preset}" if domain else \
    f"out/oracle_{args.data}_{'_'.join(args.condition)}_{args.preset}" if args.task == "oracle" else \
    f"out/joint_{'_'.join(args.data)}_{args.arch}_{args.gen}_{args.preset}" if args.task == "joint" else f"out/ff_{Path(args.data[0]).stem}_{args.preset}"
out_dir = Path(args.out or default_out)
writable_dir(parser, out_dir, "--out")

# torch and the models are imported once the flags are known to be good: a bad flag fails at once.
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.checkpoint import CheckpointError, export_weights, load_checkpoint, save_checkpoint  # noqa: E402
from models.fileio import is_disk_full  # noqa: E402
from models.precision import flush_denormals  # noqa: E402
from models.tasks import TASKS, TaskError  # noqa: E402
from models.training import (AdaptiveClip, Prefetcher, RunDirectory, cosine_schedule,  # noqa: E402
                             hardware_description, step_generator, train_step_flops, update_ema)

flush_denormals()  # float32 denormals cost the CPU ~100 cycles each: 2.4 x on the QM9 oracle's step

task = TASKS[args.task](args)

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
precision = task.precision(args, device)  # the backbone's autocast: "bf16" or "fp32"
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

# ----------------------------------------------------------------------------------------------
# Run directory: a new run never overwrites an old one by accident, and a resumed run continues exactly
# where its checkpoint stopped, logs included.

run = RunDirectory(out_dir, master)  # one process writes a run directory: a second train.py is refused, naming the first


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


resume_ckpt, resume_path = None, None
if args.resume:
    resume_ckpt, resume_path = run.last_checkpoint(lambda path: load_checkpoint(path, arch=args.arch, gen=args.gen, resume=True,
                                                                                task=args.task))
    stored = resume_ckpt["args"]
    for key in ("batching", "time_frequencies", "self_condition"):  # left unset: the checkpoint's
        if getattr(args, key) is None:
            setattr(args, key, stored[key])
    adopt_model_flags(stored, task.MODEL_FLAGS, f"cannot resume {resume_path}", "the model is rebuilt from the checkpoint, so these "
                      "cannot change. Drop those flags, or start a new run in another --out")
    if (changed := changes(task.RUN_FLAGS, stored)) and not args.override:
        raise SystemExit(f"cannot resume {resume_path}: {changed}; these define the run. Give the checkpoint's values, "
                         f"or add --override to change them from its step on")
elif (left := run.holds_a_run()) and not args.overwrite:
    raise SystemExit(f"{out_dir} holds {left}. Continue it with --resume, start over there with --overwrite "
                     f"(deletes its checkpoints and logs), or give another --out")
init_ckpt = None  # --init-from: a new run whose model is another run's (its EMA weights and every model flag)
OBJECTIVE_FLAGS = ("distance_loss", "min_one_minus_t", "time_tilt", "gamma_scale")  # the process's, not the network's
if args.init_from and resume_ckpt is None:
    try:
        init_ckpt = load_checkpoint(args.init_from, arch=args.arch, gen=args.gen)
    except CheckpointError as e:
        raise SystemExit(f"--init-from: {e}")
    if "args" not in init_ckpt:
        raise SystemExit(f"--init-from {args.init_from}: the checkpoint holds no train.py flags ('args'), so its model flags are unknown")
    # --condition on an unconditional checkpoint: its model, widened for the condition (models/transfer.py)
    adds_condition = bool(args.condition) and not init_ckpt["args"].get("condition")
    # the loss's levers given on the command line apply to the new run: fine-tuning with another objective
    new_objective = {k: getattr(args, k) for k in OBJECTIVE_FLAGS if k in explicit and getattr(args, k) != init_ckpt["args"].get(k)}
    own = ("init_from", "init_trunk", *new_objective) + (("condition", "condition_dropout") if adds_condition else ())
    adopt_model_flags(init_ckpt["args"], [k for k in task.MODEL_FLAGS if k not in own], f"--init-from {args.init_from}",
                      "the model is the checkpoint's. Drop those flags, or give its values")
if args.batching is None:  # the force field's flat batches have no padding: "random" is what its runs have stored
    args.batching = "random" if args.task == "ff" else "size"
if args.time_frequencies is None and domain:
    args.time_frequencies = domain.RECIPE["time_frequencies"]
if args.self_condition is None and args.task != "joint":  # a joint run's parts each take their domain's (models/tasks.py)
    args.self_condition = bool(domain) and domain.RECIPE.get("self_condition", False)
if ddp:  # every rank has looked at OUT before rank 0 changes it
    dist.barrier()
run.open(args.overwrite, resume_ckpt.get("log_bytes") if resume_ckpt is not None else None)
log, log_json = run.log, run.log_json

# ----------------------------------------------------------------------------------------------
# Data: the task's training and validation sets; the vocabulary of a resumed or initialised run is its checkpoint's.

model_ckpt = resume_ckpt if resume_ckpt is not None else init_ckpt
try:
    log(task.load(args, model_ckpt, progress=master))
except TaskError as e:
    raise SystemExit(f"train.py: {e}")
if args.batching == "size" and len(task.train) < args.batch_size:
    raise SystemExit(f"--batching size needs at least one whole batch of training structures: {len(task.train)} < "
                     f"--batch-size {args.batch_size}")
schedule = task.schedule(args)

# ----------------------------------------------------------------------------------------------
# Model, objective (the generative process, or the force field's loss), optimiser, schedule, EMA

if resume_ckpt is not None:  # the checkpoint's configs win over the flags
    try:
        model, objective = task.from_checkpoint(resume_ckpt, weights="model")
    except CheckpointError as e:
        raise SystemExit(f"cannot resume from {resume_path}: {e}")
elif init_ckpt is not None:  # the model (and so the EMA) starts from the checkpoint's EMA weights
    torch.manual_seed(args.seed)
    try:
        if adds_condition:
            from models.transfer import conditional_from_unconditional
            model, objective = conditional_from_unconditional(init_ckpt, args.init_from, len(args.condition), args.condition_dropout)
        else:
            model, objective = task.from_checkpoint(init_ckpt, weights="ema")
        if new_objective:
            from models.checkpoint import config_from_dict
            objective = type(objective)(config_from_dict(type(objective.config), {**asdict(objective.config), **new_objective}))
    except (CheckpointError, ValueError) as e:  # TransferError is a ValueError
        raise SystemExit(f"--init-from {args.init_from}: {e}")
    log(f"initialised from {args.init_from}: the EMA weights of its step {init_ckpt['step']}"
        + (f", its embedding widened for {', '.join(args.condition)} with zero weights" if adds_condition else "")
        + ("; the objective's " + ", ".join(f"{k} {init_ckpt['args'].get(k)} -> {v}" for k, v in new_objective.items())
           if new_objective else ""))
else:
    torch.manual_seed(args.seed)
    try:
        model, objective = task.new_model(args)
    except ValueError as e:  # a size the backbone cannot take (attention heads must divide --hidden, say)
        raise SystemExit(f"train.py: no model of --hidden {args.hidden} --n-layers {args.n_layers} here: {e}")
    if args.init_trunk:  # transfer: the shared parts from another run, of either domain
        from models.transfer import TransferError, transfer_weights
        try:
            log(transfer_weights(load_checkpoint(args.init_trunk), args.init_trunk, model, args.arch, task.data.meta["atom_symbols"]))
        except (CheckpointError, TransferError) as e:
            raise SystemExit(f"--init-trunk: {e}")
model.to(device)
ema = copy.deepcopy(model).requires_grad_(False)
n_params = sum(p.numel() for p in model.parameters())
log(task.describe(args, model, objective, n_params))

optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(args.warmup, args.iters, args.min_lr_ratio))
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
# Every machine the run has trained on, in order (a resumed run may go on elsewhere): its speeds are theirs
hardware = list(resume_ckpt.get("hardware", [])) if resume_ckpt is not None else []
here = hardware_description(device, world)
if here not in hardware[-1:]:
    hardware.append(here)

if args.compile and ddp:
    # One graph, not dynamo's split at DDP's gradient buckets: the split hands the EGNN's float constants (pi of the
    # time features) to a subgraph as inputs, which inductor (torch 2.13) fails to compile; the split only buys
    # overlap of communication with the backward, which gloo on a CPU's cores hardly has
    torch._dynamo.config.optimize_ddp = False
train_model = torch.compile(model, dynamic=True) if args.compile else model  # dynamic: size-grouped batches change the atom axis
if ddp:
    train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[device.index] if device.type == "cuda" else None)
if master and args.wandb:
    try:
        import wandb
        run.wandb = wandb.init(project=args.wandb, config=vars(args), dir=str(out_dir))
    except ImportError:
        log("wandb is not installed; logging to log.jsonl only")

rows = slice(rank * local_batch, (rank + 1) * local_batch)  # this rank's part of every global batch


def step_inputs(step: int, width: int | None = None):
    """(batch, noise) of this rank at a step: both from (seed, step) alone. --batching size pads the batch only to
    the largest structure of the global batch, so that every rank draws the same noise; `width` overrides that
    padding (the FLOP count measures each width)."""
    idx = schedule.indices(step)
    width = width or schedule.width(idx) or task.n_max
    noise = {k: v[rows] for k, v in objective.draw_noise(args.batch_size, width, step_generator(args.seed, step)).items()}
    return task.batch(task.train, idx[rows], device, width=width, global_idx=idx, world=world), noise


def save(step: int, flops_per_step: float | None, seconds: float) -> None:
    """Write ckpt.pt, keeping the one it replaces as ckpt.prev.pt (and weights.pt at the last step); never a
    checkpoint with non-finite weights."""
    if not master:
        return
    bad = [name for net in (model, ema) for name, p in net.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise SystemExit(f"step {step}: non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); not writing a "
                         f"checkpoint. The last good one is {run.ckpt}. Lower --lr (now {args.lr:g}) or --grad-clip.")
    state = {
        "task": args.task, "data": args.data, "step": step, "model_config": asdict(model.config),
        **task.checkpoint_meta(args, objective), "n_params": n_params, "n_train": len(task.train),
        "train_flops_per_step": flops_per_step, "args": vars(args), "model": model.state_dict(), "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
        "log_bytes": run.log_sizes(),  # a resumed run cuts its logs back to these sizes
        "run_seconds": seconds, "hardware": hardware,
        **({"clip_history": adaptive_clip.history} if adaptive_clip else {}),
    }
    save_checkpoint(run.ckpt, state, keep_previous=run.prev_ckpt)
    if step == args.iters:  # the finished run's EMA weights alone, to sample from or to share (a few MB)
        for name, exported in task.exports(state, ema).items():
            export_weights(exported, out_dir / name)


# ----------------------------------------------------------------------------------------------
# Loop

log(f"training {task.what}: steps {start_step} -> {args.iters}, global batch {args.batch_size} "
    f"on {world} process(es), device {device} ({precision}), out {out_dir}; {hardware[-1]}")
flops_per_step = None
if args.count_flops:
    flops_per_step = train_step_flops(model, objective, lambda width: step_inputs(start_step, width), schedule.width_counts(),
                                      autocast, world)
    log(f"{flops_per_step:.3g} FLOPs per training step (matrix products, forward and backward)")
if args.batching == "size":
    log(f"size-grouped batches: padded to {schedule.epoch_widths().double().mean():.1f} atoms on average, not {task.n_max}")
end_step = args.iters if args.stop_after is None else min(args.iters, start_step + args.stop_after)
bar = tqdm(total=args.iters, initial=start_step, disable=not master, unit="step", dynamic_ncols=True,
           mininterval=0.1 if sys.stderr.isatty() else 10)  # a log file gets a line every 10 s, not 10 a second
t_start, t_last, seen, waited = time.time(), time.time(), 0, 0.0
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
                                 f"step {done}. Nothing was written after the last good checkpoint ({run.ckpt}). Lower --lr "
                                 f"(now {args.lr:g}), keep --grad-clip on (now {args.grad_clip}), or raise --max-bad-steps.")
        else:
            bad_in_a_row = 0
            if adaptive_clip:
                adaptive_clip.record(grad_norm.item(), max_norm)
            optimizer.step()
            scheduler.step()
            update_ema(ema, model, step, args.ema_decay)
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
                      "grad_norm": grad_norm.item(), f"{task.unit}_per_s": per_s,
                      "data_wait": waited / (now - t_last), "time": run_seconds_before + now - t_start}
            log_json(record)
            log(f"step {done:>7}/{args.iters} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad {record['grad_norm']:.2f} | {per_s:,.0f} {task.unit}/s | data wait {100 * record['data_wait']:.1f} % | "
                f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
            bar.set_postfix(loss=f"{record['loss']:.3f}", per_s=f"{per_s:,.0f}")
            t_last, seen, waited = now, 0, 0.0
        if master and ((args.eval_every and done % args.eval_every == 0) or done == args.iters):
            seconds = run_seconds_before + time.time() - t_start  # the run's time up to these weights, before evaluating them
            ema.eval()
            record = {**task.evaluate(ema, objective, done, args, local_batch, lambda lo: step_generator(args.seed, lo, salt=3),
                                      autocast, device), "time": seconds}
            log_json(record)
            log("eval " + " | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            model.train()
        if done % args.ckpt_every == 0 or done == end_step:
            save(done, flops_per_step, run_seconds_before + time.time() - t_start)
except OSError as e:
    if not is_disk_full(e):
        raise
    raise SystemExit(f"{e} (train.py, step {done}). The checkpoint {run.ckpt} from the last --ckpt-every step is intact: "
                     f"free space in {out_dir} and rerun with --resume")
except KeyboardInterrupt:  # a step cut in half is not a state to save: the last checkpoint is the one to resume
    bar.close()
    raise SystemExit(f"interrupted at step {done} of {args.iters}; {run.ckpt} holds the last checkpoint (every --ckpt-every "
                     f"{args.ckpt_every} steps): the same command with --resume continues from it") from None
bar.close()
elapsed = time.time() - t_start
steps_run = end_step - start_step
log(f"{'done' if end_step == args.iters else f'stopped at step {end_step} (--stop-after)'}: {steps_run} steps in {elapsed:.1f} s "
    f"({steps_run * args.batch_size / max(elapsed, 1e-9):,.0f} {task.unit}/s including evaluation); checkpoint {run.ckpt}")
if ddp:
    dist.destroy_process_group()
