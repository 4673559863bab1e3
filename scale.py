"""Sweeps of training runs and the scaling laws fitted to them.

    python scale.py grid --data qm9 --params 200000 --iters 2000 --samples 1000    # the 3 x 3 cells, matched size
    python scale.py model --arch gnn --gen flow --widths 32 64 128 256               # L(N)
    python scale.py data --arch gnn --gen flow --sizes 2000 8000 32000 110000        # L(D)
    python scale.py compute --arch gnn --gen flow --iters-list 500 1000 2000 4000     # L(C)
    python scale.py isoflop --arch gnn --gen flow --budgets 3e13 1e14 3e14 1e15 --widths 48 64 96 128   # N*(C), D*(C)
    python scale.py ablate --variants base= tilt='--time-tilt 1' grid='|--time-power 2'   # one lever at a time
    python scale.py fit out/scale/*/results.json                                     # the laws
    python scale.py curves out/scale/grid-qm9/gnn-*                                  # loss and samples against FLOPs, seconds
    python scale.py spread out/scale/levers-s*/results.json                          # one sweep run with several seeds

Each point of a sweep is one train.py run in OUT/<run>/ (the same loop, checkpoints and logs as by hand), then
optionally sample.py and evaluate.py on it (--samples). A finished run is skipped and an interrupted one resumed,
so a sweep killed at any point continues where it stopped when the same command is run again. OUT/results.json
(rewritten after every run) holds one record per run: parameters, training structures, examples seen, training
FLOPs (counted by train.py), the final validation loss and the lowest along the way, training and sampling throughput and the sample metrics;
OUT/results.md is the table, OUT/scale.log the log, and the grid adds OUT/grid.png.

`ablate` runs named variants of one recipe side by side, each NAME=TRAIN_FLAGS[|SAMPLE_FLAGS]: train.py flags
added to the common ones and, after a bar, sample.py flags. Variants with the same training flags share one
training run (a sampler-only variant trains nothing), and with --archs / --gens every variant runs on every
cell, the variants of one cell one after the other, so that throughput is compared under the same load.

`isoflop` trains every size for exactly each FLOP budget (Hoffmann et al. 2022, approach 2): a one-step probe per
size counts its FLOPs per step (kept in OUT/probes/), the budget sets each run's steps, and each run's warm-up is a
fixed fraction of its steps, so that every learning-rate schedule ends at its budget. Sizes a budget buys fewer
than --min-steps steps of are left out of that budget.

`curves` draws finished or running train.py runs (trained with --eval-every) against training FLOPs and seconds:
each run's validation loss relative to its own last value (the processes' losses have different scales) and its
periodic sample check, the processes' training efficiency side by side.

`spread` sets the runs of one sweep run with several --seed values (each seed its own --out) side by side: per run,
each metric's mean and sample standard deviation over the seeds, and each seed's value. The seeds of one run are
found by its name, so every results.json must come from the same command but for --seed.

`fit` fits L(N) = a N^-alpha + L_inf to the model sweep (N: parameters), L(D) to the data sweep (D: training
structures), L(C) to the compute sweep (C: training FLOPs), and L(N, D) = E + A N^-alpha + B D^-beta (D:
examples seen) to the model and compute sweeps together, with residual-bootstrap intervals for every parameter,
and from the joint law the compute-optimal N*(C) and D*(C) under C = k N D, k measured from the runs (models/
scaling.py says how and why). Iso-FLOP runs (also part of the joint fit) give each budget's minimum, the vertex of a
parabola of log L in log N, and through the minima N*(C) ~ C^a and D*(C) ~ C^b with bootstrap intervals, and the
largest budget predicted from the smaller ones; where iso-FLOP runs were sampled (--samples), fit.md puts their
sample metrics in tables beside the losses' and isoflop.png draws them against FLOPs. RESULTS are the sweeps'
results.json files (or lists of run records that name their sweep). Writes DIR/fit.json, DIR/fit.md, DIR/fit.png
(one-resource laws), DIR/isoflop.png (iso-FLOP profiles) and DIR/fit.log; DIR defaults to the first RESULTS file's
directory.
"""
import argparse
import json
import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

from models.cli import above_one, add_markdown_help, decay, nonnegative_int, positive_float, positive_int, writable_dir
from models.domains import ARCH_NAMES, DATA_SETS, PROCESS_NAMES as GEN_NAMES, get_domain
from models.fileio import DataError, ExclusiveLock, atomic_write

ROOT = Path(__file__).resolve().parent
RUN_FILE = "scale_run.json"  # the train.py flags of the run in a run directory: its identity
LAWS = {  # one-resource laws: sweep -> (record key of x, symbol, what x is)
    "model": ("params", "N", "parameters"),
    "data": ("train_size", "D", "training structures"),
    "compute": ("train_flops", "C", "training FLOPs"),
}
FITTED = [*LAWS, "isoflop"]  # the sweeps fit reads: the one-resource laws', and the iso-FLOP study's


def shell_words(text: str) -> list[str]:
    """A flags string split as the shell would (--train-args='--lr 5e-4'); an unbalanced quote is a flag error."""
    try:
        return shlex.split(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of flags a shell could split ({e})")


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

runs_flags = argparse.ArgumentParser(add_help=False)  # what every sweep shares
runs_flags.add_argument("--data", default="qm9", choices=DATA_SETS, help="data set of every run")
runs_flags.add_argument("--csp", action="store_true", help="crystals: structure prediction instead of de novo generation")
runs_flags.add_argument("--train-split", choices=["train", "val"], default="train", help="crystals: the CDVAE split to train on (val offline; see train.py)")
runs_flags.add_argument("--data-dir", default=None, help="data and cache directory of every run (default ./data or $MOLGEN_DATA)")
runs_flags.add_argument("--iters", type=positive_int, default=2000, help="optimizer steps of every run (compute: --iters-list instead)")
runs_flags.add_argument("--batch-size", type=positive_int, default=64, help="global batch size of every run")
runs_flags.add_argument("--n-layers", type=positive_int, default=4, help="backbone depth (model: --depths instead)")
runs_flags.add_argument("--seed", type=nonnegative_int, default=0, help="seed of every run")
runs_flags.add_argument("--samples", type=nonnegative_int, default=None, help="structures sampled and evaluated per run (0: validation "
                        "loss only; default 1000 for grid, 0 for the sweeps)")
runs_flags.add_argument("--sample-steps", type=positive_int, default=50, help="sampling steps (sample.py --steps)")
runs_flags.add_argument("--ranks", type=positive_int, default=1, help="train each run as this many single-threaded ranks under "
                        "torchrun (gloo on a CPU): the same global batch and noise, so the same run up to float rounding. On "
                        "this machine's 2 cores, --ranks 2 with --train-args='--compile --precision bf16' trained the EGNN 1.6-1.75 x "
                        "and the Transformer 2.8 x faster than one process in eager fp32 (kernels/README.md, \"The thread layout\")")
runs_flags.add_argument("--train-args", type=shell_words, default=[], help="more train.py flags for every run, as one string: --train-args='--lr 5e-4 --val-size 500'")
runs_flags.add_argument("--sample-args", type=shell_words, default=[], help="more sample.py flags for every run, as one string: --sample-args='--time-power 1'")
runs_flags.add_argument("--eval-args", type=shell_words, default=[], help="more evaluate.py flags, as one string: --eval-args=--no-fcd")
runs_flags.add_argument("--out", type=Path, default=None, help="sweep directory (default out/scale/<sweep>-<data>[-<arch>-<gen>])")
one_cell = argparse.ArgumentParser(add_help=False)
one_cell.add_argument("--arch", choices=ARCH_NAMES, default="gnn", help="backbone of every run")
one_cell.add_argument("--gen", choices=GEN_NAMES, default="flow", help="generative process of every run")

grid_parser = commands.add_parser("grid", parents=[runs_flags], help="every backbone x process at one matched size and budget",
                                  description="Train, sample and evaluate every backbone x process cell with parameter counts "
                                  "matched within 10 % and the same budget; a table, results.json and grid.png.")
grid_parser.add_argument("--archs", nargs="+", choices=ARCH_NAMES, default=list(ARCH_NAMES), help="backbones of the grid")
grid_parser.add_argument("--gens", nargs="+", choices=GEN_NAMES, default=list(GEN_NAMES), help="processes of the grid")
grid_parser.add_argument("--params", type=positive_int, default=200_000, help="parameter count every cell is matched to (within 10 %%, by width)")
grid_parser.add_argument("--seconds", type=positive_float, default=None, help="wall-clock training budget per cell instead of --iters: a "
                         "30-step probe measures each cell's speed, and the median over a backbone's processes sets the steps of all "
                         "of them, so each runs a complete schedule")
model_parser = commands.add_parser("model", parents=[runs_flags, one_cell], help="L(N): a sweep over width and depth",
                                   description="Runs over --widths x --depths at fixed data and steps.")
model_parser.add_argument("--widths", nargs="+", type=positive_int, required=True, help="hidden widths (--hidden)")
model_parser.add_argument("--depths", nargs="+", type=positive_int, default=None, help="depths (--n-layers; default: --n-layers)")
data_parser = commands.add_parser("data", parents=[runs_flags, one_cell], help="L(D): a sweep over training-set size",
                                  description="Runs over --sizes (train.py --n-train) at fixed model and steps. A small set "
                                  "is overfitted long before the last step, so evaluate the validation loss along the way "
                                  "(--train-args='--eval-every 500 --eval-samples 0') and fit --loss-key best_val_loss.")
data_parser.add_argument("--sizes", nargs="+", type=positive_int, required=True, help="training structures (the first N of the split)")
data_parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width of every run")
compute_parser = commands.add_parser("compute", parents=[runs_flags, one_cell], help="L(C): a sweep over training steps",
                                     description="Runs over --iters-list at fixed model and data, each with its full schedule.")
compute_parser.add_argument("--iters-list", nargs="+", type=positive_int, required=True, help="optimizer steps of the runs")
compute_parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width of every run")

isoflop_parser = commands.add_parser("isoflop", parents=[runs_flags, one_cell], help="N*(C), D*(C): model sizes at fixed FLOP budgets",
                                     description="Every size trained for exactly each --budgets FLOPs (Hoffmann et al. 2022, "
                                     "approach 2): a one-step probe counts each size's FLOPs per step, the budget sets its steps, and "
                                     "the learning-rate schedule (warm-up, cosine decay) ends at the budget. `fit` finds each budget's "
                                     "best size and fits N*(C) and D*(C).")
isoflop_parser.add_argument("--budgets", nargs="+", type=positive_float, required=True, help="training FLOPs of the runs (as train.py "
                            "--count-flops counts them: matrix products, forward and backward), e.g. 3e13 1e14 3e14 1e15")
sizes = isoflop_parser.add_mutually_exclusive_group(required=True)
sizes.add_argument("--widths", nargs="+", type=positive_int, help="hidden widths of the runs at every budget")
sizes.add_argument("--params", nargs="+", type=positive_int, help="parameter counts of the runs at every budget, each matched by "
                   "width at --n-layers (as the grid matches its cells); `fit` prints the N* to check at the largest budget")
isoflop_parser.add_argument("--warmup-fraction", type=decay, default=0.05, help="each run's warm-up steps as a fraction "
                            "of its steps (train.py --warmup, after --train-args), so that every schedule has the same shape")
isoflop_parser.add_argument("--min-steps", type=positive_int, default=100, help="a size that a budget buys fewer steps of is left "
                            "out of that budget, with a message (its run would be mostly warm-up)")

ablate_parser = commands.add_parser("ablate", parents=[runs_flags], help="variants of one recipe at a fixed budget, side by side",
                                    description="Train (and with --samples, sample and evaluate) every variant on every cell.")
ablate_parser.add_argument("--variants", nargs="+", required=True, metavar="NAME=FLAGS", help="NAME=TRAIN_FLAGS[|SAMPLE_FLAGS]: "
                           "base= is the common recipe, tilt='--time-tilt 1' adds a train.py flag, heun20='|--steps 20' a sample.py flag")
ablate_parser.add_argument("--archs", nargs="+", choices=ARCH_NAMES, default=["gnn"], help="backbones")
ablate_parser.add_argument("--gens", nargs="+", choices=GEN_NAMES, default=["flow"], help="processes")
ablate_parser.add_argument("--hidden", type=positive_int, default=64, help="hidden width of every run")

curves_parser = commands.add_parser("curves", help="validation loss and sample quality against training FLOPs and seconds",
                                    description="Training-efficiency curves of train.py runs from their log.jsonl and config.json: "
                                    "the validation loss and the periodic sample check (train.py --eval-every, --eval-samples) "
                                    "against training FLOPs and wall-clock seconds. Each process's loss has its own scale, so a "
                                    "run's loss is drawn relative to its own last value and compared only with itself; the samples "
                                    "are compared across runs. Runs of one data set and process (a transfer experiment's: from "
                                    "scratch, fine-tuned, joint) are compared in the loss too, which is then drawn as it is. Runs "
                                    "without FLOP counts (--count-flops) are drawn against steps instead. Runs of one recipe with other --seed values "
                                    "(every train.py flag the same but the seed and the bookkeeping) share a colour, and curves.md adds "
                                    "the sample metric's mean and spread over their seeds at each evaluation. Writes DIR/curves.png, "
                                    "DIR/curves.md and DIR/curves.json.")
curves_parser.add_argument("runs", nargs="+", type=Path, help="run directories (train.py --out; scale.py's runs count their FLOPs)")
curves_parser.add_argument("--part", default=None, help="the data set whose records a joint run (train.py --task joint) contributes "
                           "(its log holds qm9/val_loss, perov5/val_loss, ...); its steps are its total steps, both parts'")
curves_parser.add_argument("--metric", default=None, help="the sample metric the runs are compared by (default: the first "
                           "of the periodic check's, such as mol_stability; atom_stability where no run makes stable molecules yet)")
curves_parser.add_argument("--reference", default=None, metavar="RUN", help="the directory name of one of the runs: every run is "
                           "measured against this run's last headline sample metric (instead of half the best) and, where the "
                           "losses share a scale, its last validation loss: how soon a fine-tuned or joint run reaches what "
                           "training from scratch ends at")
curves_parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first run's parent)")

spread_parser = commands.add_parser("spread", help="one sweep's runs over several seeds: mean, spread and each seed's value",
                                    description="Print, as markdown, each run of the sweeps' results.json files (one per seed of "
                                    "the same command) with every metric's mean +- sample standard deviation over the seeds and "
                                    "the seeds' values.")
spread_parser.add_argument("results", nargs="+", type=Path, help="results.json files of one sweep command run with other --seed values")
spread_parser.add_argument("--metrics", nargs="+", default=None, help="metrics to show (default: val_loss and the sample metrics "
                           "of the data set's table)")

fit_parser = commands.add_parser("fit", help="fit scaling laws to sweep results", description="Fit L(N), L(D), L(C) "
                                 "and L(N, D) with bootstrap intervals; write fit.json, fit.md, fit.png and fit.log.")
fit_parser.add_argument("results", nargs="+", type=Path, help="results JSON files of the sweeps")
fit_parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first RESULTS file's directory)")
fit_parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples per law")
fit_parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
fit_parser.add_argument("--loss-key", default="val_loss", help="the record key of the loss to fit: val_loss (the run's last) or "
                        "best_val_loss (its lowest over the --eval-every evaluations: early stopping, for a data sweep whose small "
                        "sets are overfitted by the end)")
fit_parser.add_argument("--window", type=above_one, default=None, help="iso-FLOP: fit each budget's parabola through the sizes "
                        "within this factor of its best size (lowest loss, averaged over seeds) only, e.g. 4; default: every size. A "
                        "parabola holds near a minimum; a sweep reaching far further on one side pulls it off (models/scaling.py)")


# ----------------------------------------------------------------------------------------------
# Figures


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures are written to files, never shown."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> None:
    """The figure as a PNG at path, written atomically, then closed."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    pyplot().close(fig)


# ----------------------------------------------------------------------------------------------
# Sweeps


def setup_log(out: Path, name: str) -> logging.Logger:
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(out / name, mode="a")])
    return logging.getLogger("scale")


def matched_width(domain, arch: str, n_types: int, n_layers: int, target: int, step: int = 4) -> tuple[int, int]:
    """(hidden, parameters) of the width (a multiple of step) whose parameter count is nearest to target, for the
    backbone train.py builds by default (its recipe defaults; --train-args that change the model's size are not
    seen here, but each run's own count is what the tables report)."""
    import torch

    cls, best = domain.arch_class(arch), None
    for hidden in range(step, 4097, step):
        try:
            with torch.device("meta"):  # shapes only: no memory, no initialisation
                config = cls.Config(n_types=n_types, hidden=hidden, n_layers=n_layers, **domain.RECIPE)
                n = sum(p.numel() for p in cls(config).parameters())
        except (ValueError, AssertionError):  # a width the architecture does not allow (heads must divide it)
            continue
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (hidden, n)
        if n > target:
            break
    return best


def width_for_params(domain, arch: str, n_types: int, n_layers: int, target: int, log) -> int:
    """matched_width's width for a parameter target, logged: a multiple of 4 (every published sweep's widths), or any
    width where no multiple of 4 comes within 10 % of the target; exits naming the nearest count when none does."""
    hidden, n = matched_width(domain, arch, n_types, n_layers, target)
    if abs(n - target) > 0.1 * target:  # small models: a step of 4 in width moves the count by more than 10 %
        hidden, n = matched_width(domain, arch, n_types, n_layers, target, step=1)
    if abs(n - target) > 0.1 * target:
        sys.exit(f"scale.py: {arch} cannot be matched to {target:,} parameters within 10 % at depth {n_layers} "
                 f"(nearest: {n:,} at width {hidden}); choose other --params or another --n-layers")
    log.info(f"{arch}: width {hidden}, {n:,} parameters (target {target:,})")
    return hidden


def check_sizes(domain, arch: str, sizes: set[tuple[int, int]]) -> None:
    """Exit naming the first (hidden, n_layers) the backbone cannot be built at (attention heads must divide the
    width, say), before any run of the sweep starts rather than when the sweep reaches it."""
    import torch

    cls = domain.arch_class(arch)
    for hidden, n_layers in sorted(sizes):
        try:
            with torch.device("meta"):
                cls(cls.Config(n_types=1, hidden=hidden, n_layers=n_layers, **domain.RECIPE))
        except (ValueError, AssertionError) as e:
            sys.exit(f"scale.py: --arch {arch} cannot be built at width {hidden} and depth {n_layers}: {e}")


def run_command(cmd: list, log_path: Path, what: str) -> float:
    """Run one script with its output appended to log_path; exit naming the run and showing the log's end if it
    fails. Returns the wall-clock seconds."""
    t0 = time.time()
    with open(log_path, "a") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        code = subprocess.run([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:]
        sys.exit(f"scale.py: {what} failed (exit {code}); the end of {log_path}:\n" + "\n".join(tail))
    return time.time() - t0


def train_launcher(args) -> list:
    """What starts a run's train.py: python, or torchrun with --ranks processes (one thread each: train.py divides
    the cores among a node's ranks)."""
    if args.ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.ranks}"]


def train_flags(args, arch: str, gen: str, hidden: int, n_layers: int, iters: int, n_train: int | None = None) -> list:
    flags = ["--data", args.data, "--arch", arch, "--gen", gen, "--hidden", hidden, "--n-layers", n_layers,
             "--iters", iters, "--batch-size", args.batch_size, "--seed", args.seed, "--eval-samples", 0, "--count-flops"]
    flags += get_domain(args.data).train_flags(args)
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    if n_train:
        flags += ["--n-train", n_train]
    return flags + args.train_args


def finished_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "config.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def run_point(args, run_dir: Path, flags: list, iters: int, log, sample_flags: tuple = (), samples_name: str = "samples") -> dict:
    """Train one run (skip it when finished, resume it when interrupted), sample and evaluate it when asked (into
    run_dir/samples_name, with sample_flags added to sample.py's), and return its record."""
    run_dir.mkdir(parents=True, exist_ok=True)
    # Whether to skip, resume or start over is decided, and the run trained and sampled, under one lock of the run:
    # another sweep on this --out that reaches the run meanwhile waits for it, then finds it done. (train.py's own lock comes
    # too late for this: it is taken seconds after the decision to start over, once train.py has started.)
    with ExclusiveLock(run_dir / "scale", wait=True,
                       on_wait=lambda holder: log.info(f"{run_dir.name}: another scale.py is on this run ({holder}); waiting")):
        check_identity(run_dir, flags, log)
        step = finished_step(run_dir)
        if step >= iters:
            log.info(f"{run_dir.name}: trained ({step} steps), skipped")
        else:
            resume = ["--resume"] if (run_dir / "ckpt.pt").exists() else ["--overwrite"]  # no checkpoint: nothing to keep
            log.info(f"{run_dir.name}: training{' (resuming from step %d)' % step if step else ''}: train.py {shlex.join(map(str, flags))}")
            seconds = run_command([*train_launcher(args), "train.py", *flags, "--out", run_dir, *resume], run_dir / "scale_stdout.log",
                                  f"training {run_dir.name}")
            log.info(f"{run_dir.name}: trained in {seconds:.0f} s")
        record = run_record(run_dir)
        if args.samples:
            record.update(sample_and_evaluate(args, run_dir, record["steps"], log, sample_flags, samples_name))
    return record


def check_identity(run_dir: Path, flags: list, log) -> None:
    """A run is its train.py flags (RUN_FILE): a sweep asking for the run with other flags (another --lr, --batch-size,
    --iters, --train-args) is refused rather than handed the old run as if it were the new one."""
    path, wanted = run_dir / RUN_FILE, [str(f) for f in flags]
    try:
        trained_with = json.loads(path.read_text())
    except FileNotFoundError:
        if finished_step(run_dir):
            log.info(f"{run_dir.name}: trained before scale.py kept its flags; taken to be this run: {shlex.join(wanted)}")
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(wanted)))
        return
    except ValueError as e:
        sys.exit(f"scale.py: {path} is damaged ({e}); delete it if {run_dir} is the run {shlex.join(wanted)}")
    if trained_with != wanted:
        sys.exit(f"scale.py: {run_dir} holds the run of other train.py flags:\n  it has: {shlex.join(trained_with)}\n  "
                 f"this sweep asks for: {shlex.join(wanted)}\ngive another --out, or delete {run_dir}")


def run_record(run_dir: Path) -> dict:
    """What fit and the tables need, from the run's config.json and log.jsonl."""
    config = json.loads((run_dir / "config.json").read_text())
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [r for r in records if "val_loss" in r]
    final = [r for r in evaluated if r["step"] == config["step"]]
    best = min(evaluated, key=lambda r: r["val_loss"], default=None)  # early stopping: what a run on little data is worth
    rates = [v for r in records for k, v in r.items() if k.endswith("_per_s")]
    steps, batch = config["step"], config["args"]["batch_size"]
    return {"run": run_dir.name, "arch": config["arch"], "gen": config["gen"], "hidden": config["model_config"]["hidden"],
            "n_layers": config["model_config"]["n_layers"], "params": config["n_params"], "train_size": config["n_train"],
            "steps": steps, "batch_size": batch, "examples_seen": steps * batch, "seed": config["args"]["seed"],
            "train_flops": config["train_flops_per_step"] * steps, "val_loss": final[-1]["val_loss"] if final else None,
            "best_val_loss": best["val_loss"] if best else None, "best_val_step": best["step"] if best else None,
            "train_per_s": float(np.median(rates)) if rates else None, "hardware": config.get("hardware")}


def sample_and_evaluate(args, run_dir: Path, step: int, log, sample_flags: tuple = (), samples_name: str = "samples") -> dict:
    """sample.py and evaluate.py on the run's EMA weights, unless samples of this checkpoint step with these flags
    exist already; returns the sampling throughput and the metrics."""
    out = run_dir / samples_name
    out.mkdir(exist_ok=True)
    sample_flags = (*args.sample_args, *sample_flags)  # a variant's own flags come last, so they win
    try:
        done = json.loads((out / "sample.json").read_text())
        fresh = done["ckpt_step"] == step and done["structures"] == args.samples and (out / "metrics.json").exists() \
            and json.loads((out / "scale_sample_flags.json").read_text()) == list(sample_flags)
    except (OSError, ValueError, KeyError):
        fresh = False
    if not fresh:
        log.info(f"{run_dir.name}: sampling {args.samples} with {args.sample_steps} steps{' ' + shlex.join(sample_flags) if sample_flags else ''}, then evaluating")
        (out / "scale_sample_flags.json").unlink(missing_ok=True)
        sample_cmd = [sys.executable, "sample.py", "--ckpt", run_dir / "ckpt.pt", "--n", args.samples, "--steps", args.sample_steps,
                      "--out", out, *sample_flags] + (["--data-dir", args.data_dir] if args.data_dir else [])
        run_command(sample_cmd, out / "scale_stdout.log", f"sampling {run_dir.name}")
        (out / "metrics.json").unlink(missing_ok=True)
        eval_cmd = [sys.executable, "evaluate.py", out / "samples.extxyz", "--data", args.data, "--no-progress"] + \
            (["--data-dir", args.data_dir] if args.data_dir else []) + args.eval_args
        run_command(eval_cmd, out / "scale_stdout.log", f"evaluating {run_dir.name}")
        (out / "scale_sample_flags.json").write_text(json.dumps(list(sample_flags)))
    metrics = json.loads((out / "metrics.json").read_text())
    keys = get_domain(args.data).quality_keys(args.csp)
    return {"sample_per_s": json.loads((out / "sample.json").read_text())["per_s"], "samples": args.samples,
            "sample_steps": args.sample_steps, "metrics": {k: metrics[k] for k in keys if isinstance(metrics.get(k), (int, float))}}


def write_results(args, out: Path, sweep: str, runs: list[dict]) -> None:
    """results.json (what fit reads) and results.md (the table), rewritten after every run: this sweep's runs after
    the runs the file holds that this sweep has not run. The file is read and written under its lock, so that two
    sweeps on one --out (other --widths, say) merge their records rather than the last writer's replacing them."""
    with ExclusiveLock(out / "results.json", wait=True):
        runs = earlier_runs(args, out, {r["run"] for r in runs}) + runs
        content = {"sweep": sweep, "data": args.data, "csp": args.csp, "runs": [{**r, "sweep": sweep} for r in runs]}
        atomic_write(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1)))
        domain = get_domain(args.data)
        keys = [k for k in domain.quality_keys(args.csp) if any(k in r.get("metrics", {}) for r in runs)]
        unit = f"{domain.unit}/s"
        lines = [f"| run | params | train size | steps | train {unit} | val loss |" + (f" sample {unit} | " if keys else "")
                 + " | ".join(keys) + (" |" if keys else ""),
                 "|---|---|---|---|---|---|" + "---|" * (len(keys) + 1 if keys else 0)]
        if sweep == "ablate":  # the variant's own flags after its name
            lines = [lines[0].replace("| run |", "| run | variant flags |"), lines[1] + "---|"]
        if sweep == "isoflop":  # the FLOPs each run trained for
            lines = [lines[0].replace("| run |", "| run | train FLOPs |"), lines[1] + "---|"]
        for r in runs:
            cells = [r["run"]] + ([f"`{r['variant']}`" if r["variant"] else "(base)"] if sweep == "ablate" else []) + \
                ([f"{r['train_flops']:.3g}"] if sweep == "isoflop" else []) + [f"{r['params']:,}", f"{r['train_size']:,}", f"{r['steps']:,}",
                     f"{r['train_per_s']:,.0f}" if r["train_per_s"] else "", f"{r['val_loss']:.4f}" if r["val_loss"] is not None else ""]
            if keys:  # a run of the sweep that was never sampled (a later --samples run sampled others) has blanks
                cells.append(f"{r['sample_per_s']:,.1f}" if r.get("sample_per_s") else "")
                cells += [f"{r['metrics'][k]:.4f}" if k in r.get("metrics", {}) else "" for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        title = f"# scale.py {sweep} on {args.data}{' (structure prediction)' if args.csp else ''}"
        note = (f"{args.batch_size} structures per step" + (f"; {args.samples} samples per run, {args.sample_steps} sampling steps"
                                                              if args.samples else "") + f"; command: `python scale.py {shlex.join(sys.argv[1:])}`")
        machines = list(dict.fromkeys(h for r in runs for h in r.get("hardware") or ()))  # runs before it was kept have none
        if machines:
            note += "\n\nTrained on: " + "; ".join(machines)
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text("\n".join([title, "", note, "", *lines, ""])))


class Point(NamedTuple):
    """One record of a sweep: its name, its train.py run (flags, steps, directory) and its samples (sample.py
    flags, directory; an ablation variant's flags as given)."""
    name: str
    flags: list
    iters: int
    run_dir: str = ""  # default: the name
    sample_flags: tuple = ()
    samples_dir: str = "samples"
    variant: str | None = None
    n_train: int | None = None  # a data sweep's training structures asked for
    budget: float | None = None  # an iso-FLOP run's training FLOPs asked for


def sweep_points(args) -> list[Point]:
    domain = get_domain(args.data)
    if args.command == "model":
        check_sizes(domain, args.arch, {(w, d) for d in (args.depths or [args.n_layers]) for w in args.widths})
    else:
        check_sizes(domain, args.arch, {(args.hidden, args.n_layers)})
    if args.command == "model":
        return [Point(f"h{w}-l{d}", train_flags(args, args.arch, args.gen, w, d, args.iters), args.iters)
                for d in (args.depths or [args.n_layers]) for w in args.widths]
    if args.command == "data":
        return [Point(f"n{n}", train_flags(args, args.arch, args.gen, args.hidden, args.n_layers, args.iters, n), args.iters, n_train=n)
                for n in sorted(set(args.sizes))]
    if args.command == "compute":
        return [Point(f"s{n}", train_flags(args, args.arch, args.gen, args.hidden, args.n_layers, n), n) for n in args.iters_list]
    raise ValueError(args.command)


def grid_points(args, out: Path, log) -> list[Point]:
    """Every cell at the width that brings it nearest to --params (refused beyond 10 %), with --iters steps or the
    steps --seconds buys at its backbone's measured speed."""
    domain = get_domain(args.data)
    n_types, points = domain.n_types(args), []
    for arch in args.archs:
        hidden = width_for_params(domain, arch, n_types, args.n_layers, args.params, log)
        iters = args.iters if args.seconds is None else seconds_to_steps(args, out, arch, hidden, log)
        points += [Point(f"{arch}-{gen}", train_flags(args, arch, gen, hidden, args.n_layers, iters), iters) for gen in args.gens]
    return points


def seconds_to_steps(args, out: Path, arch: str, hidden: int, log) -> int:
    """Steps of a --seconds budget for every cell of one backbone: its speed is the median over the probes of its
    processes, which cost the same per step (one network, the same batches), so that one noisy probe does not give
    one process fewer steps than the others."""
    rates = {gen: probe_rate(args, out / f"{arch}-{gen}" / "probe", arch, gen, hidden, log) for gen in args.gens}
    rate = float(np.median(list(rates.values())))
    steps = max(1, int(args.seconds * rate / args.batch_size))
    log.info(f"{arch}: {rate:,.0f} structures/s, the median of {', '.join(f'{g} {r:,.0f}' for g, r in rates.items())}: "
             f"{steps:,} steps in {args.seconds:g} s for each process")
    return steps


def probe_rate(args, probe_dir: Path, arch: str, gen: str, hidden: int, log) -> float:
    """Structures/s of one cell: the median of a 30-step run's progress lines (its first 10 steps, which warm up,
    left out), measured once and kept in the probe's directory."""
    if finished_step(probe_dir) < 30:
        probe_dir.mkdir(parents=True, exist_ok=True)
        flags = train_flags(args, arch, gen, hidden, args.n_layers, 30) + ["--log-every", 5, "--val-size", 16]
        run_command([sys.executable, "train.py", *flags, "--out", probe_dir, "--overwrite"], probe_dir / "scale_stdout.log", f"probing {arch}-{gen}")
    records = [json.loads(line) for line in (probe_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return float(np.median([v for r in records if r.get("step", 0) > 10 for k, v in r.items() if k.endswith("_per_s")]))


def iso_flop_points(args, out: Path, log) -> list[Point]:
    """Every size at every budget that buys it --min-steps steps: steps = budget / the size's FLOPs per step, the
    warm-up a fixed fraction of them. Budgets in increasing order, so that the cheap iso-FLOP curves come first."""
    domain = get_domain(args.data)
    widths = sorted({width_for_params(domain, args.arch, domain.n_types(args), args.n_layers, target, log) for target in args.params}
                    if args.params else set(args.widths))
    check_sizes(domain, args.arch, {(w, args.n_layers) for w in widths})
    per_step = {w: flops_per_step(args, out / "probes" / f"h{w}-l{args.n_layers}", w, log) for w in widths}
    points = []
    for budget in sorted(set(args.budgets)):
        for w in widths:
            mantissa, _, exponent = f"{budget:.3g}".partition("e")  # 4e+08 -> C4e8
            name = f"C{mantissa}{'e%d' % int(exponent) if exponent else ''}-h{w}-l{args.n_layers}"
            iters = round(budget / per_step[w])
            if iters < args.min_steps:
                log.warning(f"{name}: skipped: {budget:.3g} FLOPs buy {iters:,} steps at {per_step[w]:.3g} FLOPs a step, fewer than "
                            f"--min-steps {args.min_steps}")
                continue
            flags = train_flags(args, args.arch, args.gen, w, args.n_layers, iters) + ["--warmup", round(args.warmup_fraction * iters)]
            points.append(Point(name, flags, iters, budget=budget))
    if not points:
        sys.exit(f"scale.py: no size gets --min-steps {args.min_steps} steps from any of the --budgets; raise the budgets")
    return points


def flops_per_step(args, probe_dir: Path, hidden: int, log) -> float:
    """Training FLOPs of one step of a size, counted by a one-step train.py --count-flops run (the count averages
    over the first epoch's batch widths, so it does not depend on the run's length), kept in the probe's
    directory for as long as the sweep's flags are those it was counted with."""
    flags = train_flags(args, args.arch, args.gen, hidden, args.n_layers, 1) + ["--val-size", 16, "--warmup", 0]
    probe_dir.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(probe_dir / "scale", wait=True):
        try:
            counted = json.loads((probe_dir / RUN_FILE).read_text()) == [str(f) for f in flags] and \
                json.loads((probe_dir / "config.json").read_text())["train_flops_per_step"]
        except (OSError, ValueError, KeyError):
            counted = None
        if not counted:
            (probe_dir / RUN_FILE).unlink(missing_ok=True)
            run_command([sys.executable, "train.py", *flags, "--out", probe_dir, "--overwrite"], probe_dir / "scale_stdout.log",
                        f"counting the FLOPs of width {hidden}")
            atomic_write(probe_dir / RUN_FILE, lambda tmp: Path(tmp).write_text(json.dumps([str(f) for f in flags])))
            counted = json.loads((probe_dir / "config.json").read_text())["train_flops_per_step"]
    log.info(f"width {hidden}: {counted:.3g} FLOPs per step")
    return counted


def parse_variants(variants: list[str]) -> list[tuple[str, list, tuple, str]]:
    """NAME=TRAIN_FLAGS[|SAMPLE_FLAGS] -> (name, train flags, sample flags, the flags as given); a malformed or
    repeated name exits."""
    parsed = []
    for spec in variants:
        name, eq, flags = spec.partition("=")
        if not eq or not name.replace("-", "").replace("_", "").isalnum():
            sys.exit(f"scale.py ablate: variant {spec!r} is not NAME=TRAIN_FLAGS[|SAMPLE_FLAGS] (NAME: letters, digits, - and _)")
        if name in (p[0] for p in parsed):
            sys.exit(f"scale.py ablate: variant name {name!r} is given twice")
        train, _, sample = flags.partition("|")
        try:
            parsed.append((name, shlex.split(train), tuple(shlex.split(sample)), flags))
        except ValueError as e:  # an unbalanced quote
            sys.exit(f"scale.py ablate: variant {spec!r}: its flags are not a list a shell could split ({e})")
    return parsed


def ablation_points(args) -> list[Point]:
    """Every variant on every cell. Variants with equal training flags share the run of the first of them; each
    variant with sample flags samples into its own directory."""
    points = []
    for arch in args.archs:
        check_sizes(get_domain(args.data), arch, {(args.hidden, args.n_layers)})
        for gen in args.gens:
            trained = {}
            for name, train, sample, given in parse_variants(args.variants):
                flags = train_flags(args, arch, gen, args.hidden, args.n_layers, args.iters) + train
                run_dir = trained.setdefault(shlex.join(map(str, flags)), f"{arch}-{gen}-{name}")
                points.append(Point(f"{arch}-{gen}-{name}", flags, args.iters, run_dir, sample,
                                    f"samples-{name}" if sample else "samples", given))
    return points


def plot_grid(args, runs: list[dict], path: Path) -> None:
    """Bars of the validation loss and of the headline metric of every cell."""
    plt = pyplot()

    headline = get_domain(args.data).quality_keys(args.csp)[0]
    panels = [("val_loss", "validation loss")] + ([(headline, headline)] if any(headline in r.get("metrics", {}) for r in runs) else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        values = [(r["val_loss"] if key == "val_loss" else r["metrics"].get(key, np.nan)) or np.nan for r in runs]
        ax.bar([r["run"] for r in runs], values, color=[f"C{ARCH_NAMES.index(r['arch'])}" for r in runs])
        ax.set(ylabel=label, title=f"{label} ({args.data})")
        ax.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    save_figure(fig, path)


def earlier_runs(args, out: Path, names: set[str]) -> list[dict]:
    """The runs results.json already holds that this sweep does not run again (another --widths list, say): kept, so
    that results are merged, never replaced. A results.json of another sweep or data set is refused."""
    path = out / "results.json"
    if not path.exists():
        return []
    try:
        results = json.loads(path.read_text())
        if (results["sweep"], results["data"], results["csp"]) != (args.command, args.data, args.csp):
            sys.exit(f"scale.py: {path} holds a {results['sweep']} sweep on {results['data']}{' (csp)' if results['csp'] else ''}, "
                     f"not this {args.command} sweep on {args.data}; give another --out")
        return [r for r in results["runs"] if r["run"] not in names]
    except (ValueError, KeyError, TypeError) as e:
        sys.exit(f"scale.py: {path} is not a results file scale.py can extend ({type(e).__name__}: {e}); move it away or give another --out")


def run_sweep(args) -> None:
    if args.samples is None:
        args.samples = 1000 if args.command == "grid" else 0
    cell = "" if args.command in ("grid", "ablate") else f"-{args.arch}-{args.gen}"
    out = writable_dir(commands.choices[args.command], args.out or Path("out/scale") / f"{args.command}-{args.data}{'-csp' if args.csp else ''}{cell}", "--out")
    log = setup_log(out, "scale.log")
    log.info(f"$ python scale.py {shlex.join(sys.argv[1:])}")
    points = ablation_points(args) if args.command == "ablate" else grid_points(args, out, log) if args.command == "grid" \
        else iso_flop_points(args, out, log) if args.command == "isoflop" else sweep_points(args)
    earlier_runs(args, out, set())  # a results.json of another sweep is refused before any run starts
    t0, runs = time.time(), []
    data_size = None  # a data sweep's training set, once a run has asked for more structures than it holds
    for i, point in enumerate(points):
        if data_size is not None:  # the points come in increasing size: this one and the rest would be the same run again
            log.warning(f"[{i + 1}/{len(points)}] {point.name}: skipped: the training set holds only {data_size:,} structures, "
                        f"so --n-train {point.n_train:,} would train the run {runs[-1]['run']} again")
            continue
        log.info(f"[{i + 1}/{len(points)}] {point.name}")
        record = run_point(args, out / (point.run_dir or point.name), point.flags, point.iters, log, point.sample_flags, point.samples_dir)
        if point.n_train and record["train_size"] < point.n_train:
            data_size = record["train_size"]
            log.warning(f"{point.name}: trained on all {data_size:,} training structures, fewer than the {point.n_train:,} asked for")
        runs.append({**record, "run": point.name, **({"variant": point.variant} if point.variant is not None else {}),
                     **({"budget": point.budget} if point.budget else {})})
        write_results(args, out, args.command, runs)
        if i + 1 < len(points):
            eta = (time.time() - t0) / (i + 1) * (len(points) - i - 1)
            log.info(f"{i + 1} of {len(points)} runs done in {time.time() - t0:.0f} s; ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}")
    if args.command == "grid":
        plot_grid(args, runs, out / "grid.png")
    log.info(f"wrote {out / 'results.json'} and {out / 'results.md'}" + (f" and {out / 'grid.png'}" if args.command == "grid" else "")
             + f"; {len(runs)} runs in {time.time() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------
# Fit


def read_runs(paths: list[Path], loss_key: str) -> list[dict]:
    """Every run of every RESULTS file, each with its sweep, in an order fixed by their contents: the bootstrap's
    resamples depend on the order, and a sweep that merges its records again (sampling them later, say) writes them
    in another. A file or record that cannot be used ends the program with a message naming it."""
    runs = []
    for path in paths:
        try:
            content = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            sys.exit(f"scale.py: cannot read {path}: {e}")
        records = content.get("runs") if isinstance(content, dict) else content
        if not isinstance(records, list):
            sys.exit(f"scale.py: {path} holds neither a list of runs nor {{'runs': [...]}}")
        for i, record in enumerate(records):
            sweep = record.get("sweep", content.get("sweep") if isinstance(content, dict) else None)
            if sweep not in FITTED:
                sys.exit(f"scale.py: {path}, run {i}: sweep {sweep!r} is not one of {sorted(FITTED)}")
            loss = record.get(loss_key)
            if not isinstance(loss, (int, float)) or not np.isfinite(loss) or loss <= 0:
                sys.exit(f"scale.py: {path}, run {i}: {loss_key} = {loss!r}; a fit needs a finite loss > 0")
            runs.append({**record, "sweep": sweep, "loss": float(loss), "source": f"{path}, run {i}"})
    return sorted(runs, key=lambda r: json.dumps({k: v for k, v in r.items() if k != "source"}, sort_keys=True, default=str))


def column(runs: list[dict], key: str) -> np.ndarray:
    for r in runs:
        if not isinstance(r.get(key), (int, float)) or not (np.isfinite(r[key]) and r[key] > 0):
            sys.exit(f"scale.py: {r['source']}: {key} = {r.get(key)!r}; the fit needs a finite number > 0")
    return np.array([float(r[key]) for r in runs])


def interval_text(interval) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def run_spread(args) -> None:
    """The table of `scale.py spread`, on stdout."""
    sweeps = []
    for path in args.results:
        try:
            sweeps.append(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            sys.exit(f"scale.py spread: {path}: not a sweep's results.json ({e})")
    kinds = {(s.get("sweep"), s.get("data"), s.get("csp")) for s in sweeps}
    if len(kinds) > 1:
        sys.exit(f"scale.py spread: the files hold different sweeps ({', '.join(map(str, sorted(kinds, key=str)))}): give one "
                 "sweep command's results over several seeds")
    by_run: dict[str, list[dict]] = {}
    for path, sweep in zip(args.results, sweeps):
        for record in sweep["runs"]:
            if "seed" not in record:  # a sweep older than the seed in its records: the run's own config has it
                try:
                    record["seed"] = json.loads((path.parent / record["run"] / "config.json").read_text())["args"]["seed"]
                except (OSError, ValueError, KeyError):
                    sys.exit(f"scale.py spread: {path}: run {record['run']} names no seed, and its config.json is not here")
            by_run.setdefault(record["run"], []).append(record)
    sweep = sweeps[0]
    metrics = args.metrics or ["val_loss", *get_domain(sweep["data"]).quality_keys(sweep.get("csp", False))]

    def value(record, key):
        return record.get(key, record.get("metrics", {}).get(key))

    lines = ["| run | variant flags | seeds | steps | " + " | ".join(metrics) + " |", "|---" * (4 + len(metrics)) + "|"]
    if sweep["sweep"] in LAWS:  # a one-resource sweep reads in its resource's order, whatever order its runs were made in
        resource = LAWS[sweep["sweep"]][0]
        by_run = dict(sorted(by_run.items(), key=lambda item: item[1][0].get(resource) or 0))
    for run, records in by_run.items():
        records = sorted(records, key=lambda r: r.get("seed", 0))
        cells = []
        for key in metrics:
            values = np.array([v for r in records if (v := value(r, key)) is not None], dtype=float)
            if not len(values):
                cells.append("")
                continue
            cells.append(seed_cell(values, ".4g", ".2g"))
        flags = (records[0].get("variant") or "").replace(f"{Path.cwd()}/", "")  # paths as the README's commands give them
        seeds = ", ".join(str(r["seed"]) for r in records)
        if len(set(seeds.split(", "))) < len(records):
            sys.exit(f"scale.py spread: run {run} appears twice with one seed ({seeds}): give each seed's results.json once")
        lines.append(f"| {run} | {('`' + flags + '`') if flags else '(base)'} | {seeds} | {records[0].get('steps', 0):,} | "
                     + " | ".join(cells) + " |")
    print("\n".join(lines))


def seed_cell(values: np.ndarray, value_format: str, sd_format: str) -> str:
    """One table cell over a run's seeds: 'mean +- sample standard deviation (each seed's value)', or the value alone
    for one seed."""
    if len(values) == 1:
        return f"{values[0]:{value_format}}"
    each = ", ".join(f"{v:{value_format}}" for v in values)
    return f"{values.mean():{value_format}} +- {values.std(ddof=1):{sd_format}} ({each})"


def run_fit(args) -> None:
    from models.scaling import bootstrap, fit_joint_law, fit_power_law

    runs = read_runs(args.results, args.loss_key)
    out = writable_dir(fit_parser, args.out or args.results[0].parent, "--out")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
        logging.StreamHandler(sys.stdout), logging.FileHandler(out / "fit.log", mode="w")])
    log = logging.getLogger("scale")
    t0 = time.time()
    report, plots = {"n_boot": args.n_boot, "loss_key": args.loss_key, "laws": {}}, []
    md = ["# Scaling laws", "", f"{len(runs)} runs from {', '.join(map(str, args.results))}; {args.loss_key}; "
          f"95 % intervals from {args.n_boot} residual-bootstrap resamples (models/scaling.py).", ""]

    for sweep, (key, symbol, what) in LAWS.items():
        chosen = [r for r in runs if r["sweep"] == sweep]
        if len(chosen) < 3:
            log.info(f"L({symbol}): {len(chosen)} {sweep}-sweep run(s), fewer than 3: not fitted")
            continue
        x, loss = column(chosen, key), column(chosen, "loss")
        if len(np.unique(x)) < 3:  # a data sweep past the data set's size trains the same run again, say
            log.info(f"L({symbol}): the {len(chosen)} {sweep}-sweep runs have {len(np.unique(x))} distinct {what} "
                     f"({', '.join(f'{v:g}' for v in sorted(set(x)))}), fewer than 3: not fitted")
            continue
        boot = bootstrap(fit_power_law, [x, loss], args.n_boot, args.seed)
        law = boot["fit"]
        form = f"a {symbol}^-alpha + L_inf" if law.floor else f"a {symbol}^-alpha (fewer than 4 runs: no floor fitted)"
        report["laws"][f"L({symbol})"] = {"form": form, "x": key, "points": {"x": x.tolist(), "loss": loss.tolist()},
                                          "fit": law.params(), "interval": boot["interval"]}
        log.info(f"L({symbol}) = {form}: alpha = {law.alpha:.4f} {interval_text(boot['interval']['alpha'])}, "
                 f"a = {law.a:.4g}" + (f", L_inf = {law.l_inf:.4g} {interval_text(boot['interval']['l_inf'])}" if law.floor else "")
                 + f" ({len(x)} runs)")
        md += [f"## L({symbol}): {what} ({len(x)} {sweep}-sweep runs)", "", f"L = {form}", "",
               "| parameter | fit | 95 % interval |", "|---|---|---|",
               *[f"| {k} | {v:.4g} | {interval_text(boot['interval'][k])} |" for k, v in law.params().items()], ""]
        plots.append((f"L({symbol})", what, x, loss, law, boot["samples"]))

    joint_runs = [r for r in runs if r["sweep"] in ("model", "compute", "isoflop")]
    if len({r.get("params") for r in joint_runs}) >= 2 and len({r.get("examples_seen") for r in joint_runs}) >= 2 and len(joint_runs) >= 5:
        n, d, loss = column(joint_runs, "params"), column(joint_runs, "examples_seen"), column(joint_runs, "loss")
        boot = bootstrap(fit_joint_law, [n, d, loss], args.n_boot, args.seed)
        law, s = boot["fit"], boot["samples"]
        k = float(np.median(column(joint_runs, "train_flops") / (n * d)))
        # N* ~ C^a and D* ~ C^b with a = beta / (alpha + beta), b = alpha / (alpha + beta)
        a_samples = s["beta"] / (s["alpha"] + s["beta"])
        exponent_n = law.beta / (law.alpha + law.beta)
        a_interval = tuple(float(v) for v in np.percentile(a_samples, [2.5, 97.5]))
        budgets = np.logspace(np.log10(column(joint_runs, "train_flops").min()), np.log10(column(joint_runs, "train_flops").max()) + 2, 5)
        n_opt, d_opt = law.compute_optimal(budgets, k)
        report["laws"]["L(N, D)"] = {
            "form": "E + A N^-alpha + B D^-beta (D: examples seen)", "fit": law.params(), "interval": boot["interval"],
            "flops_per_param_example": k, "n_opt_exponent": exponent_n, "n_opt_exponent_interval": a_interval,
            "compute_optimal": [{"flops": float(c), "params": float(p), "examples": float(e)} for c, p, e in zip(budgets, n_opt, d_opt)]}
        log.info(f"L(N, D): alpha = {law.alpha:.4f} {interval_text(boot['interval']['alpha'])}, beta = {law.beta:.4f} "
                 f"{interval_text(boot['interval']['beta'])}, E = {law.e:.4g}; N*(C) ~ C^{exponent_n:.3f} "
                 f"{interval_text(a_interval)}, k = {k:.3g} FLOPs per parameter per example ({len(joint_runs)} runs)")
        md += [f"## L(N, D): parameters and examples seen ({len(joint_runs)} model-, compute- and iso-FLOP-sweep runs)", "",
               "L = E + A N^-alpha + B D^-beta", "", "| parameter | fit | 95 % interval |", "|---|---|---|",
               *[f"| {p} | {v:.4g} | {interval_text(boot['interval'][p])} |" for p, v in law.params().items()], "",
               f"Compute-optimal under C = k N D with k = {k:.3g} (median over the runs): N*(C) ~ C^{exponent_n:.3f} "
               f"{interval_text(a_interval)}, D*(C) ~ C^{1 - exponent_n:.3f}.", "",
               "| C (FLOPs) | N* (parameters) | D* (examples) |", "|---|---|---|",
               *[f"| {c:.3g} | {p:.3g} | {e:.3g} |" for c, p, e in zip(budgets, n_opt, d_opt)], ""]
    else:
        log.info("L(N, D): needs at least 5 model-, compute- or iso-FLOP-sweep runs with 2 distinct N and 2 distinct D: not fitted")
    iso_runs = [r for r in runs if r["sweep"] == "isoflop"]
    if iso_runs:
        md += fit_iso_flop_runs(args, iso_runs, report, out, log)
    if not report["laws"]:
        sys.exit("scale.py: nothing to fit (each law needs runs of its sweep at 3 distinct values of its resource, the iso-FLOP "
                 "study 3 sizes at each of 2 budgets; fit.log says why each was not fitted)")

    if plots:
        plot(plots, out / "fit.png")
    atomic_write(out / "fit.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    atomic_write(out / "fit.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    figures = [out / "fit.png"] * bool(plots) + [out / "isoflop.png"] * ("fit" in report["laws"].get("iso-FLOP", {}))
    log.info(f"wrote {out / 'fit.json'}, {out / 'fit.md'}" + "".join(f", {f}" for f in figures) + f" in {time.time() - t0:.1f} s")


def fit_iso_flop_runs(args, runs: list[dict], report: dict, out: Path, log) -> list[str]:
    """The iso-FLOP study: each budget's best size, N*(C) and D*(C) with bootstrap intervals, the largest budget
    predicted from the smaller ones, and the comparison with the joint law fitted to the same runs. Adds to
    report["laws"], draws OUT/isoflop.png and returns fit.md's section."""
    from models.scaling import bootstrap_iso_flop, held_out_budget, near_best_sizes

    # In one order whatever order the results files list them in (a sweep rerun to sample its runs rewrites its file
    # in another): the bootstrap's resamples are drawn by position, so its intervals would move with the order.
    runs = sorted(runs, key=lambda r: (r["budget"], r["params"], r.get("seed", 0), r["run"]))
    budgets, n, d, loss = (column(runs, key) for key in ("budget", "params", "examples_seen", "loss"))
    fitted = near_best_sizes(budgets, n, loss, args.window) if args.window else np.ones(len(loss), dtype=bool)
    profiles = iso_flop_table(budgets, n, loss, fitted) + sample_tables(runs, budgets, n, loss, fitted)
    window = (f"; each budget's parabola through its sizes within a factor {args.window:g} of its best size ({fitted.sum()} of "
              f"{len(runs)} runs)" if args.window else "")
    try:
        boot = bootstrap_iso_flop(budgets[fitted], n[fitted], d[fitted], loss[fitted], args.n_boot, args.seed)
    except ValueError as e:
        log.info(f"iso-FLOP: not fitted: {e}")
        report["laws"]["iso-FLOP"] = {"not_fitted": str(e)}
        return [f"## Iso-FLOP profiles: {len(runs)} runs at {len(set(budgets))} budgets, not fitted", "", f"Not fitted: {e}.", "",
                *profiles]
    fit, interval = boot["fit"], boot["interval"]
    for c, why in fit.skipped.items():
        log.info(f"iso-FLOP: {c:.3g} FLOPs left out: {why}")
    held_out = held_out_budget(fit, budgets[fitted], n[fitted], d[fitted], loss[fitted])
    report["laws"]["iso-FLOP"] = {
        "form": "N*(C) = n_coef C^a, D*(C) = d_coef C^b (D: examples seen), through each budget's parabola minimum",
        "fit": {"a": fit.a, "b": fit.b, "n_coef": fit.n_coef, "d_coef": fit.d_coef}, "interval": interval,
        "bootstrap": {"n_boot": boot["n_boot"], "failed": boot["failed"]},
        "window": args.window, "budgets": [{"flops": c, "params": p, "examples": e, "loss": v, "runs": int((fitted & (budgets == c)).sum())}
                    for c, p, e, v in zip(fit.budgets, fit.n_opt, fit.d_opt, fit.l_opt)],
        "left_out": {f"{c:.3g}": why for c, why in fit.skipped.items()}, "held_out": held_out}
    noise = "" if boot["n_boot"] else " (3 sizes per budget: the parabolas pass through every run, nothing measures the noise, no interval)"
    log.info(f"iso-FLOP: N*(C) ~ C^{fit.a:.3f} {interval_text(interval['a'])}, D*(C) ~ C^{fit.b:.3f} {interval_text(interval['b'])} "
             f"from {len(fit.budgets)} budgets, {len(runs)} runs{window}{noise}; {boot['failed']} of {boot['n_boot']} resamples moved a minimum "
             "outside its sizes")
    md = [f"## Iso-FLOP profiles: {len(runs)} runs at {len(set(budgets))} budgets", "",
          "Each budget's runs trained for exactly its FLOPs; the minimum of a parabola of log L in log N gives its N*, D* and L* "
          f"(Hoffmann et al. 2022, approach 2){window}. 95 % intervals from {boot['n_boot']} residual-bootstrap resamples of the parabolas"
          f"{noise}; {boot['failed']} resamples moved a minimum outside its sizes and were dropped.", "",
          f"N*(C) = {fit.n_coef:.3g} C^{fit.a:.3f} {interval_text(interval['a'])}; D*(C) = {fit.d_coef:.3g} C^{fit.b:.3f} "
          f"{interval_text(interval['b'])}.", "",
          "| C (FLOPs) | runs | N* (parameters) | N* 95 % interval | D* (examples) | L* |", "|---|---|---|---|---|---|",
          *[f"| {c:.3g} | {int((fitted & (budgets == c)).sum())} | {p:.3g} | {interval_text(interval[f'n_opt@{c:.3g}'])} | {e:.3g} | {v:.4g} |"
            for c, p, e, v in zip(fit.budgets, fit.n_opt, fit.d_opt, fit.l_opt)], "", *profiles]
    md += [f"- {c:.3g} FLOPs left out: {why}" for c, why in fit.skipped.items()] + ([""] if fit.skipped else [])
    if held_out:
        predicted, measured, c = held_out["predicted"], held_out["measured"], held_out["flops"]
        at = budgets == c
        size = n[at][int(np.argmin(np.abs(np.log(n[at] / predicted["params"]))))]
        same = np.flatnonzero(at & (n == size))  # that size's runs, one a seed
        run = {"run": runs[int(same[0])]["run"], "params": float(size), "loss": float(loss[same].mean()), "seeds": len(same)}
        held_out["nearest_run"] = run
        reached = f"reached {run['loss']:.4g}" + (f" (the mean of {len(same)} seeds)" if len(same) > 1 else "")
        line = (f"The largest budget ({c:.3g} FLOPs) predicted from the {len(held_out['from_budgets'])} smaller ones: N* = "
                f"{predicted['params']:.3g} parameters, D* = {predicted['examples']:.3g} examples, L* = {predicted['loss']:.4g}; its own "
                f"runs' parabola: N* = {measured['params']:.3g}, L* = {measured['loss']:.4g}. Its run nearest the predicted N*, "
                f"{run['run']} ({run['params']:.3g} parameters), {reached}"
                + ("." if abs(np.log(run["params"] / predicted["params"])) < np.log(1.15) else
                   f"; no run lies within 15 % of the predicted N*: check it with `scale.py isoflop --budgets {c:.3g} "
                   f"--params {predicted['params']:.0f}` and the sweep's other flags."))
        log.info(f"iso-FLOP: {line}")
        md += [line, ""]
    joint = report["laws"].get("L(N, D)")
    if joint:
        low, high = interval["a"]
        j_low, j_high = joint["n_opt_exponent_interval"]
        agree = max(low, j_low) <= min(high, j_high)
        line = (f"The joint law L(N, D) over the model-, compute- and iso-FLOP-sweep runs gives N*(C) ~ C^{joint['n_opt_exponent']:.3f} "
                f"{interval_text(joint['n_opt_exponent_interval'])}, against the iso-FLOP profiles' {fit.a:.3f} {interval_text(interval['a'])}: "
                + ("the intervals overlap." if agree else "the intervals do not overlap. The joint law assumes its form "
                   "(separable power laws in N and D with one floor) over every run; the profiles assume only a smooth minimum "
                   "near each budget's sizes, so where they differ the joint law's form is the first suspect."))
        log.info(f"iso-FLOP: {line}")
        report["laws"]["iso-FLOP"]["joint_law_agrees"] = bool(agree)
        md += [line, ""]
    plot_iso_flop(runs, fit, budgets, n, loss, fitted, out / "isoflop.png")
    return md


def iso_flop_table(budgets, n, loss, fitted, values=None) -> list[str]:
    """The runs' losses, or another of their `values` (NaN where a run has none), as a budget x size table (markdown
    lines): the profiles the fit reads, shown whether or not it finds their minima. A size run with several seeds
    shows their mean and, after it, how many; each budget's lowest-loss size is in bold, and a size outside the fit's
    window in italics."""
    values = loss if values is None else values
    sizes = sorted(set(n.tolist()))
    lines = ["| C (FLOPs) | " + " | ".join(f"N = {p:,.0f}" for p in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
    for c in sorted(set(budgets.tolist())):
        at = budgets == c
        mean_loss = {p: loss[at & (n == p)].mean() for p in sizes if (at & (n == p)).any()}
        cells = []
        for p in sizes:
            runs = at & (n == p) & np.isfinite(values)
            if not runs.any():
                cells.append("")
                continue
            cell = f"{values[runs].mean():.4g}" + (f" ({runs.sum()})" if runs.sum() > 1 else "")
            cells.append(f"**{cell}**" if mean_loss[p] == min(mean_loss.values()) else cell if fitted[runs].all() else f"*{cell}*")
        lines.append(f"| {c:.3g} | " + " | ".join(cells) + " |")
    return lines + [""]


def sample_metric_keys(runs: list[dict]) -> list[str]:
    """The first two sample metrics (the data set's headline first, as scale.py records them) that any run has."""
    keys = dict.fromkeys(k for r in runs for k, v in (r.get("metrics") or {}).items() if isinstance(v, (int, float)))
    return list(keys)[:2]


def sample_metric(runs: list[dict], key: str) -> np.ndarray:
    """Each run's sample metric `key`, NaN for a run that was not sampled."""
    return np.array([float((r.get("metrics") or {}).get(key, np.nan)) for r in runs])


def sample_tables(runs: list[dict], budgets, n, loss, fitted) -> list[str]:
    """What compute buys in the metrics users read: each sample metric of the sampled runs as a budget x size table
    beside the loss's, the lowest-loss size of each budget in bold (fit.md lines; none when no run was sampled)."""
    lines = []
    for key in sample_metric_keys(runs):
        values = sample_metric(runs, key)
        sampled = runs[int(np.flatnonzero(np.isfinite(values))[0])]
        lines += [f"{key} of {int(np.isfinite(values).sum())} of the {len(runs)} runs ({sampled.get('samples', '?')} samples, "
                  f"{sampled.get('sample_steps', '?')} sampling steps), in bold at each budget's lowest-loss size:", "",
                  *iso_flop_table(budgets, n, loss, fitted, values)]
    return lines


def plot_iso_flop(runs: list[dict], fit, budgets, n, loss, fitted, path: Path) -> None:
    """The loss against N at each budget with its parabola (through the `fitted` runs; the others hollow) and
    minimum; N*(C) and D*(C) with their fits; and, where runs were sampled, the first two sample metrics of those
    against training FLOPs."""
    plt = pyplot()

    from models.scaling import iso_flop_parabola

    metrics = sample_metric_keys(runs)
    fig, axes = plt.subplots(1, 2 + len(metrics), figsize=(4.5 * (2 + len(metrics)), 3.6), squeeze=False)
    ax = axes[0][0]
    for i, c in enumerate(sorted(set(budgets))):
        at = budgets == c
        ax.scatter(n[at & fitted], loss[at & fitted], color=f"C{i}", label=f"{c:.3g} FLOPs")
        ax.scatter(n[at & ~fitted], loss[at & ~fitted], facecolors="none", edgecolors=f"C{i}")
        if c in fit.budgets:
            at = at & fitted
            grid = np.logspace(np.log10(n[at].min()), np.log10(n[at].max()), 50)
            ax.plot(grid, np.exp(np.polyval(iso_flop_parabola(n[at], loss[at]), np.log(grid))), color=f"C{i}")
            j = fit.budgets.index(c)
            ax.scatter([fit.n_opt[j]], [fit.l_opt[j]], color=f"C{i}", marker="*", s=150, edgecolor="k", zorder=3)
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="loss", title="iso-FLOP profiles")
    ax.legend(fontsize=7)
    ax = axes[0][1]
    grid = np.logspace(np.log10(min(fit.budgets)) - 0.2, np.log10(max(fit.budgets)) + 0.5, 50)
    n_line, d_line = fit.predict(grid)
    ax.scatter(fit.budgets, fit.n_opt, color="C0", label=f"N*: C^{fit.a:.2f}")
    ax.plot(grid, n_line, color="C0")
    ax.scatter(fit.budgets, fit.d_opt, color="C1", label=f"D* (examples): C^{fit.b:.2f}")
    ax.plot(grid, d_line, color="C1")
    ax.set(xscale="log", yscale="log", xlabel="training FLOPs", title="compute-optimal allocation")
    ax.legend(fontsize=7)
    flops = np.array([r["train_flops"] for r in runs])
    for ax, key in zip(axes[0][2:], metrics):
        values = sample_metric(runs, key)
        sampled = np.isfinite(values)
        scatter = ax.scatter(flops[sampled], values[sampled], c=np.log10(n[sampled]), cmap="viridis")
        fig.colorbar(scatter, ax=ax, label="log10 parameters")
        ax.set(xscale="log", xlabel="training FLOPs", ylabel=key, title=f"{key} against compute")
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------
# Training-efficiency curves


# train.py flags that do not change what a run learns (where it writes, how often it logs), and the seed
CURVE_BOOKKEEPING = {"seed", "out", "resume", "overwrite", "override", "device", "data_dir", "log_every", "ckpt_every",
                     "stop_after", "wandb"}


def run_curve(run_dir: Path, part: str | None = None) -> dict:
    """One run's evaluations (the last record of each step: a resumed run may log a step twice) with their training
    FLOPs where the run counted them; of a joint run, the records of its `part`. A run that cannot be drawn ends the
    program with a message naming it."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except (OSError, ValueError) as e:
        sys.exit(f"scale.py curves: {run_dir} is not a train.py run directory ({e})")
    per_step = config.get("train_flops_per_step")
    joint = config.get("task") == "joint"
    if joint and part not in config["data"]:
        sys.exit(f"scale.py curves: {run_dir} is a joint run of {' and '.join(config['data'])}: name the part to draw with "
                 f"--part {config['data'][0]}" + (f" (not {part})" if part else ""))
    data = part if joint else config.get("data")
    evaluations = {}
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.strip() else {}
        except ValueError:
            sys.exit(f"scale.py curves: {run_dir / 'log.jsonl'}, line {i + 1}, is not JSON")
        if joint:  # qm9/val_loss -> val_loss, the other part's records dropped
            record = {k.split("/", 1)[1] if k.startswith(part + "/") else k: v for k, v in record.items() if "/" not in k or k.startswith(part + "/")}
        if "val_loss" in record:
            evaluations[record["step"]] = record
    if not evaluations:
        sys.exit(f"scale.py curves: {run_dir / 'log.jsonl'} holds no evaluation yet (train.py --eval-every)")
    points = [{**r, **({"flops": r["step"] * per_step} if per_step else {})} for _, r in sorted(evaluations.items())]
    metrics = [k for k, v in points[-1].items() if k not in ("step", "val_loss", "time", "flops") and isinstance(v, (int, float))]
    args = config.get("args", {})
    # the recipe: every flag but the seed and the bookkeeping, so that runs of one recipe with other seeds are pooled
    recipe = json.dumps({k: v for k, v in args.items() if k not in CURVE_BOOKKEEPING}, sort_keys=True)
    return {"run": run_dir.name, "path": str(run_dir), "arch": config.get("arch"), "gen": config.get("gen"), "data": data,
            "csp": bool(config.get("csp")), "params": config.get("n_params"), "flops_per_step": per_step, "points": points,
            "metrics": metrics, "seed": args.get("seed"), "recipe": recipe}


def first_reaching(points: list[dict], key: str, level: float, below: bool) -> dict | None:
    """The first evaluation whose `key` is at or past `level` (at or below it for a loss)."""
    return next((p for p in points if key in p and (p[key] <= level if below else p[key] >= level)), None)


def run_curves(args) -> None:
    curves = [run_curve(d, args.part) for d in args.runs]
    if len({c["run"] for c in curves}) < len(curves):  # one recipe's seeds in folders of the same name: name those by parent
        names = [c["run"] for c in curves]
        for c, d in zip(curves, args.runs):
            if names.count(d.name) > 1:
                c["run"] = f"{d.resolve().parent.name}/{d.name}"
        if len({c["run"] for c in curves}) < len(curves):
            sys.exit("scale.py curves: two runs have the same directory and parent names: give each run once")
    seed_groups: dict[str, list[dict]] = {}  # one recipe, several seeds
    for c in curves:
        seed_groups.setdefault(c["recipe"], []).append(c)
    for i, group in enumerate(seed_groups.values()):
        for c in group:
            c["group"] = i
    out = writable_dir(curves_parser, args.out or args.runs[0].resolve().parent, "--out")
    x = "flops" if all(c["flops_per_step"] for c in curves) else "step"
    # one data set and process: the losses share a scale, and are compared as they are
    same_loss = len({(c["data"], c["gen"], c["csp"]) for c in curves}) == 1
    metrics = [k for k in curves[0]["metrics"] if all(k in c["metrics"] for c in curves)]
    if args.metric and args.metric not in metrics:
        sys.exit(f"scale.py curves: --metric {args.metric}: not in every run's periodic check ({', '.join(metrics) or 'none'})")
    headline = args.metric or (metrics[0] if metrics else None)
    reference = None
    if args.reference:
        reference = next((c for c in curves if c["run"] == args.reference), None)
        if reference is None:
            sys.exit(f"scale.py curves: --reference {args.reference} is none of the runs ({', '.join(c['run'] for c in curves)})")
        level = reference["points"][-1][headline] if headline else None
    else:
        level = 0.5 * max(c["points"][-1][headline] for c in curves) if headline else None
    if not level:  # no run's samples score yet: no level every run can be measured against
        headline = None
    loss_level = reference["points"][-1]["val_loss"] if reference and same_loss else None
    # The loss: when each run first came within 10 % of its own total drop of its last value. The samples: when each
    # first reached half the best last value of any run, a level every run is measured against.
    md = ["# Training efficiency", "", f"{len(curves)} runs: {', '.join(str(d) for d in args.runs)}. Command: "
          f"`python scale.py {shlex.join(sys.argv[1:])}`.", "",
          ("The runs share a data set and a process, so their validation losses are compared as they are. " if same_loss else
           "Each process's loss has its own scale, so a run's loss is compared only with itself. ")
          + "90 % of its drop is where a run's validation loss first came within 10 % of "
          "the way from its first to its last evaluation. Seconds are the run's wall clock at an evaluation, the earlier "
          "evaluations' included."
          + ("" if x == "flops" else " Not every run counted its FLOPs (train.py --count-flops), so they are drawn against steps.")
          + (f" The samples are compared across runs: the level is {'the last ' + headline + ' of ' + reference['run'] if reference else 'half the best last ' + headline + ' of any run'}."
             if headline else "")
          + (f" The loss level is {reference['run']}'s last validation loss." if loss_level is not None else ""), ""]
    header = f"| run | process | params | steps | FLOPs | seconds | val loss | 90 % of its drop at {'FLOPs' if x == 'flops' else 'step'} | at seconds |"
    if loss_level is not None:
        header += f" val loss <= {loss_level:.4g} at {'FLOPs' if x == 'flops' else 'step'} | at seconds |"
    if headline:
        header += f" {headline} | {headline} >= {level:.3g} at {'FLOPs' if x == 'flops' else 'step'} | at seconds |"
    md += [header, "|" + "---|" * (header.count("|") - 1)]
    for c in curves:
        first, last = c["points"][0], c["points"][-1]
        reached = first_reaching(c["points"], "val_loss", last["val_loss"] + 0.1 * (first["val_loss"] - last["val_loss"]), below=True)
        c["loss_90"] = reached and {x: reached[x], "time": reached.get("time")}
        at = (lambda p: f"{p['flops']:.3g} (step {p['step']:,})") if x == "flops" else (lambda p: f"{p['step']:,}")
        cells = [c["run"], c["gen"], f"{c['params']:,}", f"{last['step']:,}", f"{last['flops']:.3g}" if "flops" in last else "",
                 f"{last.get('time', float('nan')):,.1f}", f"{last['val_loss']:.4f}", at(reached), f"{reached.get('time', float('nan')):,.1f}"]
        if loss_level is not None:
            low = first_reaching(c["points"], "val_loss", loss_level, below=True)
            c["reference_loss_level"] = {"level": loss_level, x: low and low[x], "time": low and low.get("time")}
            cells += [at(low) if low else "not reached", f"{low.get('time', float('nan')):,.1f}" if low else ""]
        if headline:
            good = first_reaching(c["points"], headline, level, below=False)
            c[f"{headline}_level"] = {"level": level, x: good and good[x], "time": good and good.get("time")}
            cells += [f"{last[headline]:.4f}", at(good) if good else "not reached",
                      f"{good.get('time', float('nan')):,.1f}" if good else ""]
        md.append("| " + " | ".join(cells) + " |")
    if headline:  # every evaluation side by side, so the runs can be read at equal steps as well as at one level
        md += ["", f"{headline} at each evaluation ({'training FLOPs, ' if x == 'flops' else ''}seconds):", "",
               "| step | " + " | ".join(c["run"] for c in curves) + " |", "|---|" + "---|" * len(curves)]
        by_step = [{p["step"]: p for p in c["points"]} for c in curves]

        def cell(p: dict | None) -> str:
            if not p or headline not in p:
                return ""
            return f"{p[headline]:.4f} ({f'{p[x]:.3g}, ' if x == 'flops' else ''}{p.get('time', float('nan')):,.0f} s)"

        for step in sorted(set().union(*by_step)):
            md.append(f"| {step:,} | " + " | ".join(cell(points.get(step)) for points in by_step) + " |")
        pooled = [g for g in seed_groups.values() if len(g) > 1]
        if pooled:
            md += seed_spread_table(pooled, headline)
    plot_curves(curves, headline, out / "curves.png", x, relative_loss=not same_loss)
    atomic_write(out / "curves.json", lambda tmp: Path(tmp).write_text(json.dumps(curves, indent=1)))
    atomic_write(out / "curves.md", lambda tmp: Path(tmp).write_text("\n".join(md + [""])))
    print(f"wrote {out / 'curves.png'}, {out / 'curves.md'} and {out / 'curves.json'}")


def seed_spread_table(groups: list[list[dict]], headline: str) -> list[str]:
    """Markdown: the headline metric of each recipe run with several seeds, at every step all its seeds evaluated,
    as mean +- sample standard deviation over the seeds, each seed's value after it."""
    names = [" / ".join(sorted({c["run"].split("/")[-1] for c in g})) for g in groups]
    md = ["", f"{headline} over seeds (mean +- sample standard deviation; each seed's value):", "",
          "| step | " + " | ".join(f"{n} (seeds {', '.join(str(c['seed']) for c in g)})" for n, g in zip(names, groups)) + " |",
          "|---|" + "---|" * len(groups)]
    by_step = [[{p["step"]: p[headline] for p in c["points"] if headline in p} for c in g] for g in groups]
    for step in sorted(set().union(*(s for g in by_step for s in g))):
        cells = []
        for seeds in by_step:
            values = np.array([s[step] for s in seeds if step in s])
            cells.append(seed_cell(values, ".4f", ".4f") if len(values) == len(seeds) else "")
        md.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return md


def plot_curves(curves: list[dict], headline: str | None, path: Path, x_resource: str = "flops", relative_loss: bool = True) -> None:
    """The loss (relative to its own last value where the runs' losses do not share a scale) and the headline sample
    metric, against FLOPs (or steps) and against seconds."""
    plt = pyplot()

    loss_label = "validation loss / its last value" if relative_loss else "validation loss"
    rows = [("val_loss", loss_label)] + ([(headline, headline)] if headline else [])
    fig, axes = plt.subplots(len(rows), 2, figsize=(10, 3.6 * len(rows)), squeeze=False)
    for (key, label), row in zip(rows, axes):
        for ax, (x, xlabel) in zip(row, [(x_resource, "training FLOPs" if x_resource == "flops" else "training steps"),
                                         ("time", "training seconds")]):
            for c in curves:
                points = [p for p in c["points"] if key in p and x in p]
                scale_by = c["points"][-1]["val_loss"] if key == "val_loss" and relative_loss else 1.0
                # one colour per recipe, one line style per seed of it
                style = ["-", "--", ":", "-."][[d["run"] for d in curves if d["group"] == c["group"]].index(c["run"]) % 4]
                ax.plot([p[x] for p in points], [p[key] / scale_by for p in points], marker="o", ms=3, color=f"C{c['group']}",
                        ls=style, label=c["run"])
            # FLOPs and seconds span decades; steps read better evenly spaced, and a loss drawn as it is too
            ax.set(xscale="linear" if x == "step" else "log", xlabel=xlabel, ylabel=label,
                   yscale="log" if key == "val_loss" and relative_loss else "linear")
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot(plots: list, path: Path) -> None:
    """One log-log panel per one-resource law: the runs, the fit and its 95 % bootstrap band."""
    plt = pyplot()

    from models.scaling import PowerLaw

    fig, axes = plt.subplots(1, len(plots), figsize=(4.5 * len(plots), 3.6), squeeze=False)
    for ax, (name, what, x, loss, law, samples) in zip(axes[0], plots):
        grid = np.logspace(np.log10(x.min()) - 0.3, np.log10(x.max()) + 0.3, 100)
        curves = np.array([PowerLaw(a, al, samples["l_inf"][i] if law.floor else 0.0)(grid)
                           for i, (a, al) in enumerate(zip(samples["a"], samples["alpha"]))])
        if len(curves):  # none where no bootstrap resample could be fitted (the interval is then NaN too)
            ax.fill_between(grid, *np.percentile(curves, [2.5, 97.5], axis=0), alpha=0.25, label="95 % band")
        ax.plot(grid, law(grid), label=f"alpha = {law.alpha:.3f}")
        ax.scatter(x, loss, color="k", zorder=3, label="runs")
        ax.set(xscale="log", yscale="log", xlabel=what, ylabel="loss", title=name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


if __name__ == "__main__":
    add_markdown_help(parser)
    arguments = parser.parse_args()
    try:
        {"fit": run_fit, "curves": run_curves, "spread": run_spread}.get(arguments.command, run_sweep)(arguments)
    except DataError as e:  # the data of the runs is missing or unreadable: found before any run starts (grid sizes its cells by it)
        sys.exit(f"scale.py: {e}")
    except KeyboardInterrupt:  # every finished run is in results.json; the same command continues
        sys.exit("scale.py: interrupted; the runs finished so far are in results.json, and the same command resumes the rest")
