"""Evaluate generated molecules against QM9 (EDM protocol plus distribution metrics), or the real test set.

    python evaluate.py out/run/samples.extxyz --data qm9     # metrics of generated molecules
    python evaluate.py --reference qm9                         # the same metrics on the real test set

Writes metrics JSON, figures (property histograms, a grid of sampled molecules, training curves when a
log.jsonl sits next to the samples) and evaluate.log; prints a one-row metric table and the throughput.
Metric definitions: models/metrics.py and README.md, "Design", "Metrics".
"""
import argparse
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

from models.cli import fraction, nonnegative_int, output_file, writable_dir

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("samples", nargs="?", type=Path, help="extended XYZ file of generated molecules (ASE reads it)")
parser.add_argument("--data", default="qm9", choices=["qm9"], help="data set the samples imitate")
parser.add_argument("--reference", choices=["qm9"], help="evaluate the real test set instead of samples "
                    "(the 'Data' row; its distribution metrics are taken against the validation split)")
parser.add_argument("--data-dir", type=Path, default=None, help="QM9 cache directory (default $MOLGEN_DATA or "
                    "./data); reference statistics and training SMILES are cached there")
parser.add_argument("--json", type=Path, default=None, help="metrics output (default: SAMPLES' directory/"
                    "metrics.json, or out/reference-qm9/metrics.json); evaluate.log goes next to it")
parser.add_argument("--figures", type=Path, default=None,
                    help="directory for the PNG figures (default: next to --json)")
parser.add_argument("--log", type=Path, default=None, help="training log.jsonl to plot (default: log.jsonl next to "
                    "SAMPLES; no curves figure without one)")
parser.add_argument("--no-fcd", action="store_true", help="skip the Frechet ChemNet Distance")
parser.add_argument("--n-ref", type=nonnegative_int, default=0,
                    help="reference molecules (a fixed random subset) for FCD, coverage and Wasserstein; 0 = all")
parser.add_argument("--coverage-threshold", type=fraction, default=0.4,
                    help="Tanimoto similarity at which a molecule counts as covered (coverage recall / precision)")
parser.add_argument("--no-progress", action="store_true", help="no progress bars")
args = parser.parse_args()
if (args.samples is None) == (args.reference is None):
    parser.error("give either SAMPLES or --reference qm9")
if args.samples is not None and not args.samples.is_file():
    parser.error(f"SAMPLES {args.samples}: no such file")
t_start = time.time()

# The heavy imports once the flags are known to be good: a bad flag fails at once.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from models import metrics  # noqa: E402
from models.data import DataError, default_data_dir, load_qm9, split_indices  # noqa: E402
from models.fileio import atomic_write  # noqa: E402

plt.switch_backend("Agg")  # figures go to files; no display needed


def fail(message: str):
    sys.exit(f"evaluate.py: error: {message}")


# ----------------------------------------------------------------------------------------------
# Inputs: the samples (or the test set itself), the training SMILES for novelty, the reference


def read_samples(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atomic numbers, positions) of every structure in an extended XYZ file; exits naming the file on error.

    Frames are split here (atom count line, comment line, atoms) and parsed one at a time, so an error
    names the structure and line where it is (ASE's own reader indexes the whole file before it parses).
    """
    import ase.io

    try:
        lines = path.read_text().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read ({type(e).__name__}: {e})")
    samples, start = [], 0
    while start < len(lines):
        if not lines[start].strip():  # blank lines between or after frames
            start += 1
            continue
        try:
            n = int(lines[start])
            atoms = ase.io.read(io.StringIO("".join(lines[start:start + n + 2])), format="extxyz")
        except Exception as e:  # ASE raises many exception types for malformed input; all mean "unreadable"
            fail(f"{path}: structure {len(samples) + 1} (line {start + 1}) is not valid extended XYZ "
                 f"({type(e).__name__}: {e})")
        samples.append((atoms.numbers.copy(), atoms.positions.copy()))
        start += n + 2
    if not samples:
        fail(f"{path}: no structures (empty file)")
    return samples


samples = read_samples(args.samples) if args.samples else None
default_json = args.samples.parent / "metrics.json" if args.samples else Path("out/reference-qm9/metrics.json")
out_json = output_file(parser, args.json or default_json, "--json")
fig_dir = writable_dir(parser, args.figures or out_json.parent, "--figures")
logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
    logging.StreamHandler(sys.stdout), logging.FileHandler(out_json.parent / "evaluate.log", mode="w")])
log = logging.getLogger("evaluate")
log.info("$ python " + " ".join(sys.argv))
progress = not args.no_progress

data_dir = args.data_dir or default_data_dir()
try:
    qm9 = load_qm9(None, data_dir)
except DataError as e:
    fail(str(e))
split = split_indices(len(qm9))
train, test = qm9.subset(split["train"]), qm9.subset(split["test"])
if args.reference:
    # The Data row: EDM's metrics on the test molecules themselves. Its distribution metrics (FCD, W1,
    # coverage) are taken against the validation split, a disjoint draw of the same distribution, so they
    # show what a perfect generator scores (test against itself would give a meaningless 0).
    name, label, samples = "QM9 test set", "QM9 test set", [test[i] for i in range(len(test))]
    ref_set, ref_name, n_ref = qm9.subset(split["valid"]), "QM9 validation split", args.n_ref or len(test)
else:
    name, label = str(args.samples), args.samples.name
    ref_set, ref_name, n_ref = test, "QM9 test set", args.n_ref or None
log.info(f"{name}: {len(samples)} molecules; distribution reference: {ref_name} ({len(ref_set)} molecules, "
         f"{n_ref or 'all'} used) from {data_dir}")
train_smiles = metrics.training_smiles(train, cache_dir=data_dir, progress=progress)
ref = metrics.reference_statistics(ref_set, n_ref=n_ref, cache_dir=data_dir, fcd=not args.no_fcd, progress=progress)

# ----------------------------------------------------------------------------------------------
# Metrics

t0 = time.time()
# A structure with NaN / Inf coordinates stays in every denominator (it is neither stable nor valid) and out of
# the geometry distributions; it is counted, so a sampler that blows up is visible, not silently scored.
n_non_finite = sum(not np.isfinite(x).all() for _, x in samples)
if n_non_finite:
    log.warning(f"warning: {n_non_finite} of {len(samples)} structures have non-finite (NaN / Inf) coordinates; they count "
                f"as unstable and invalid")
stats = metrics.molecule_statistics(samples, progress=progress, desc="samples")
result = metrics.score(stats, ref, train_smiles, fcd=not args.no_fcd, coverage_threshold=args.coverage_threshold)
t_eval = time.time() - t0
result.update(samples=name, reference=ref_name, data=args.data, eval_seconds=t_eval, non_finite=n_non_finite)


def nan_to_none(v):
    """JSON has no NaN: undefined metrics are written as null."""
    if isinstance(v, dict):
        return {k: nan_to_none(x) for k, x in v.items()}
    return None if isinstance(v, float) and math.isnan(v) else v


try:
    atomic_write(out_json, lambda tmp: Path(tmp).write_text(json.dumps(nan_to_none(result), indent=2) + "\n"))
except OSError as e:  # models.fileio.DiskFull names the file
    fail(str(e))
log.info(f"wrote {out_json}")

# ----------------------------------------------------------------------------------------------
# Figures


def plot_properties(path: Path):
    """Histograms of properties and geometry, samples (line) over the reference (filled)."""
    valid, ref_valid = stats["smiles"] != "", ref["smiles"] != ""
    panels = [("QED", "qed", valid, ref_valid), ("SA score", "sa", valid, ref_valid),  # valid molecules only
              ("logP", "logp", valid, ref_valid), ("atoms per molecule", "n_atoms", ..., ...),  # ...: all
              ("bond length (A)", "bond_length", ..., ...), ("bond angle (deg)", "bond_angle", ..., ...)]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, key, sel, ref_sel) in zip(axes.flat, panels):
        a, b = np.asarray(stats[key][sel], float), np.asarray(ref[key][ref_sel], float)
        both = np.concatenate([a, b])
        both = both[np.isfinite(both)]
        if len(both):
            bins = np.arange(both.min() - 0.5, both.max() + 1.5) if key == "n_atoms" else \
                np.linspace(both.min(), both.max() + 1e-9, 60)
            ax.hist(b, bins=bins, density=True, histtype="stepfilled", alpha=0.35, label=f"{ref_name} ({len(b)})")
            ax.hist(a, bins=bins, density=True, histtype="step", linewidth=1.5, label=f"{label} ({len(a)})")
            ax.legend(fontsize=8)
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_molecules(path: Path, n: int = 24) -> bool:
    """2D depictions of the first n valid molecules; False when there are none."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    shown = stats["smiles"][stats["smiles"] != ""][:n].tolist()
    if shown:
        Draw.MolsToGridImage([Chem.MolFromSmiles(s) for s in shown], molsPerRow=6, subImgSize=(220, 180),
                             legends=shown).save(path)
    return bool(shown)


def plot_curves(log_path: Path, path: Path):
    """Loss (and validation loss) against step; molecule / atom stability in a second panel when logged."""
    records = [r for r in map(json.loads, filter(str.strip, log_path.read_text().splitlines())) if "step" in r]
    curves = [k for k in ("mol_stability", "atom_stability") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 1 + bool(curves), figsize=(6 + 5 * bool(curves), 4), squeeze=False)
    for col, keys, style in ((0, ("loss", "val_loss"), "-"), (1, curves, "o-")):
        for key in keys:
            axes[0, col].plot(*zip(*[(r["step"], r[key]) for r in records if key in r]), style, label=key)
    axes[0, 0].set(xlabel="step", ylabel="loss", yscale="log")
    axes[0, 0].legend()
    if curves:
        axes[0, 1].set(xlabel="step", ylabel="fraction stable", ylim=(0, 1.02))
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


try:
    plot_properties(fig_dir / "properties.png")
    log.info(f"wrote {fig_dir / 'properties.png'}")
except OSError as e:  # a full disk: metrics.json is written already, and a figure is not worth a traceback
    log.warning(f"skipped properties.png ({e})")
try:
    if draw_molecules(fig_dir / "molecules.png"):
        log.info(f"wrote {fig_dir / 'molecules.png'}")
except Exception as e:  # a depiction is a nicety: no drawing failure (Pillow, odd molecule) may stop evaluation
    log.warning(f"skipped molecules.png ({type(e).__name__}: {e})")
log_path = args.log or (args.samples.parent / "log.jsonl" if args.samples else None)
if log_path is not None and log_path.is_file():
    try:
        plot_curves(log_path, fig_dir / "curves.png")
        log.info(f"wrote {fig_dir / 'curves.png'} from {log_path}")
    except (ValueError, KeyError, TypeError) as e:  # a malformed log line (JSON or fields): metrics still count
        log.warning(f"skipped curves.png: {log_path} is not a usable log.jsonl ({type(e).__name__}: {e})")

# ----------------------------------------------------------------------------------------------
# Table and throughput

columns = [("atom stab", "atom_stability", "%"), ("mol stab", "mol_stability", "%"), ("valid", "validity", "%"),
           ("unique", "uniqueness", "%"), ("novel", "novelty", "%"), ("V x U", "validity_x_uniqueness", "%"),
           ("QED", "qed", ".3f"), ("SA", "sa", ".2f"), ("logP", "logp", ".2f"), ("W1 QED", "w1_qed", ".4f"),
           ("W1 SA", "w1_sa", ".3f"), ("W1 logP", "w1_logp", ".3f"), ("W1 atoms", "w1_n_atoms", ".3f"),
           ("W1 bond", "w1_bond_length", ".4f"), ("W1 angle", "w1_bond_angle", ".2f"), ("FCD", "fcd", ".3f"),
           ("recall", "coverage_recall", "%"), ("precision", "coverage_precision", "%")]
heads = [h + " (%)" if f == "%" else h for h, _, f in columns]
cells = [f"{100 * result[k]:.1f}" if f == "%" else f"{result[k]:{f}}" for _, k, f in columns]
widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
log.info("  ".join(h.rjust(w) for h, w in zip(heads, widths)))
log.info("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
log.info(f"evaluated {len(samples)} molecules in {t_eval:.1f} s ({len(samples) / t_eval:.0f} molecules/s); "
         f"{time.time() - t_start:.1f} s in all, with loading data and reference statistics")
