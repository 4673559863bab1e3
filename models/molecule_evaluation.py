"""evaluate.py on molecules: generated QM9 molecules, or the real test set as the 'Data' row, scored with the EDM
protocol plus distribution metrics (models/molecule_metrics.py; models/README.md, "Metrics").

`score_molecules` writes the metrics JSON, the figures (property histograms, a grid of sampled molecules, training
curves) and logs the metric table and the throughput, through the `logging` handlers its caller set up.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from models import molecule_metrics
from models.evaluation import read_frames, reference_subset, write_metrics
from models.fileio import DataError
from models.molecules import default_data_dir, load_qm9, split_indices

log = logging.getLogger(__name__)

# The metric table: (head, metrics key, format; "%" prints a fraction as a percentage)
COLUMNS = [("atom stab", "atom_stability", "%"), ("mol stab", "mol_stability", "%"), ("valid", "validity", "%"),
           ("unique", "uniqueness", "%"), ("novel", "novelty", "%"), ("V x U", "validity_x_uniqueness", "%"),
           ("QED", "qed", ".3f"), ("SA", "sa", ".2f"), ("logP", "logp", ".2f"), ("W1 QED", "w1_qed", ".4f"),
           ("W1 SA", "w1_sa", ".3f"), ("W1 logP", "w1_logp", ".3f"), ("W1 atoms", "w1_n_atoms", ".3f"),
           ("W1 bond", "w1_bond_length", ".4f"), ("W1 angle", "w1_bond_angle", ".2f"), ("FCD", "fcd", ".3f"),
           ("recall", "coverage_recall", "%"), ("precision", "coverage_precision", "%")]


def read_samples(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(atomic numbers [n], positions [n, 3] in A) of every structure in an extended XYZ file; DataError naming the
    file, the structure and its line when one cannot be read (evaluation.read_frames) or is periodic."""
    samples = []
    for k, (line, atoms) in enumerate(read_frames(path)):
        if atoms.pbc.any():  # a crystal scored as a molecule would get numbers that mean nothing
            raise DataError(f"{path}: structure {k + 1} ({line}) is periodic (a cell with pbc "
                            f"{atoms.pbc.tolist()}): crystal samples are scored with --data perov5, carbon24 or mp20")
        samples.append((atoms.numbers.copy(), atoms.positions.copy()))
    return samples


def score_molecules(samples: Path | None, out_json: Path, fig_dir: Path, *, data: str = "qm9", n_test: int | None = None,
                    data_dir: Path | None = None, n_ref: int = 0, fcd: bool = True, coverage_threshold: float = 0.4,
                    training_log: Path | None = None, progress: bool = True, started: float | None = None) -> dict:
    """Score the molecules of the extended XYZ file `samples` against the QM9 test set, or, with samples None, the
    test molecules themselves (the first n_test of a fixed random order with n_test) against the validation split.

    Writes the metrics (molecule_metrics.score, plus samples, reference, data, eval_seconds and non_finite) to
    out_json, and properties.png, molecules.png and curves.png (from training_log, a log.jsonl, when it exists) to
    fig_dir; returns the metrics. data: the data set the samples imitate, as recorded; n_ref: reference molecules
    for FCD, coverage and Wasserstein (a fixed random subset; 0: all); started: time.time() when the run began, for
    the total in the last line (default: now). Raises DataError for unreadable samples or data, OSError when the
    metrics cannot be written; a figure that cannot be drawn is skipped with a warning.
    """
    started = time.time() if started is None else started
    molecules = read_samples(samples) if samples is not None else None
    data_dir = data_dir or default_data_dir()
    qm9 = load_qm9(None, data_dir)
    split = split_indices(len(qm9))
    train, test = qm9.subset(split["train"]), qm9.subset(split["test"])
    if samples is None:
        # The Data row: EDM's metrics on the test molecules themselves. Its distribution metrics (FCD, W1,
        # coverage) are taken against the validation split, a disjoint draw of the same distribution, so they
        # show what a perfect generator scores (test against itself would give a meaningless 0).
        name = label = "QM9 test set" + (f" ({min(n_test, len(test))} of {len(test)}, seed 0)" if n_test else "")
        molecules = [test[i] for i in reference_subset(len(test), n_test)]
        ref_set, ref_name, n_ref = qm9.subset(split["valid"]), "QM9 validation split", n_ref or len(test)
    else:
        name, label = str(samples), samples.name
        ref_set, ref_name, n_ref = test, "QM9 test set", n_ref or None
    log.info(f"{name}: {len(molecules)} molecules; stability and validity by EDM's protocol (bond orders from "
             f"distances); novelty against the QM9 training split ({len(train)} molecules); distribution reference: "
             f"{ref_name} ({len(ref_set)} molecules, {n_ref or 'all'} used) from {data_dir}")
    train_smiles = molecule_metrics.training_smiles(train, cache_dir=data_dir, progress=progress)
    ref = molecule_metrics.reference_statistics(ref_set, n_ref=n_ref, cache_dir=data_dir, fcd=fcd, progress=progress)

    t0 = time.time()
    # A structure with NaN / Inf coordinates stays in every denominator (it is neither stable nor valid) and out of
    # the geometry distributions; it is counted, so a sampler that blows up is visible, not silently scored.
    n_non_finite = sum(not np.isfinite(x).all() for _, x in molecules)
    if n_non_finite:
        log.warning(f"warning: {n_non_finite} of {len(molecules)} structures have non-finite (NaN / Inf) coordinates; "
                    f"they count as unstable and invalid")
    # A structure of no atoms is a sample the generator failed to make, like one that blew up: it stays in every
    # denominator, as unstable and invalid (molecule_metrics), with 0 atoms in the atom-count distance. Refusing the
    # file would leave the user to drop it, which would raise the model's rates.
    n_empty = sum(len(z) == 0 for z, _ in molecules)
    if n_empty:
        log.warning(f"warning: {n_empty} of {len(molecules)} structures have no atoms; they count as unstable and invalid")
    stats = molecule_metrics.molecule_statistics(molecules, progress=progress, desc="samples")
    result = molecule_metrics.score(stats, ref, train_smiles, fcd=fcd, coverage_threshold=coverage_threshold)
    t_eval = time.time() - t0
    result.update(samples=name, reference=ref_name, data=data, eval_seconds=t_eval, non_finite=n_non_finite, empty=n_empty)
    write_metrics(out_json, result)
    log.info(f"wrote {out_json}")

    try:
        plot_properties(fig_dir / "properties.png", stats, ref, label, ref_name)
        log.info(f"wrote {fig_dir / 'properties.png'}")
    except OSError as e:  # a full disk: the metrics are written already, and a figure is not worth a traceback
        log.warning(f"skipped properties.png ({e})")
    try:
        if draw_molecules(fig_dir / "molecules.png", stats["smiles"]):
            log.info(f"wrote {fig_dir / 'molecules.png'}")
    except Exception as e:  # a depiction is a nicety: no drawing failure (Pillow, odd molecule) may stop evaluation
        log.warning(f"skipped molecules.png ({type(e).__name__}: {e})")
    if training_log is not None and training_log.is_file():
        try:
            plot_curves(training_log, fig_dir / "curves.png")
            log.info(f"wrote {fig_dir / 'curves.png'} from {training_log}")
        except (ValueError, KeyError, TypeError) as e:  # a malformed log line (JSON or fields): the metrics still count
            log.warning(f"skipped curves.png: {training_log} is not a usable log.jsonl ({type(e).__name__}: {e})")

    for line in metric_table(result):
        log.info(line)
    log.info(f"evaluated {len(molecules)} molecules in {t_eval:.1f} s ({len(molecules) / t_eval:.0f} molecules/s); "
             f"{time.time() - started:.1f} s in all, with loading data and reference statistics")
    return result


def metric_table(result: dict) -> list[str]:
    """The headline metrics as two aligned lines, heads over values (COLUMNS)."""
    heads = [h + " (%)" if f == "%" else h for h, _, f in COLUMNS]
    cells = [f"{100 * result[k]:.1f}" if f == "%" else f"{result[k]:{f}}" for _, k, f in COLUMNS]
    widths = [max(len(h), len(c)) for h, c in zip(heads, cells)]
    return ["  ".join(h.rjust(w) for h, w in zip(heads, widths)), "  ".join(c.rjust(w) for c, w in zip(cells, widths))]


# ----------------------------------------------------------------------------------------------
# Figures: matplotlib's Figure without pyplot, so that drawing them leaves the process's backend alone


def plot_properties(path: Path, stats: dict, ref: dict, label: str, ref_name: str) -> None:
    """Histograms of properties and geometry of molecule_statistics `stats` (a line) over the reference `ref`
    (filled)."""
    from matplotlib.figure import Figure

    valid, ref_valid = stats["smiles"] != "", ref["smiles"] != ""
    panels = [("QED", "qed", valid, ref_valid), ("SA score", "sa", valid, ref_valid),  # valid molecules only
              ("logP", "logp", valid, ref_valid), ("atoms per molecule", "n_atoms", ..., ...),  # ...: all
              ("bond length (A)", "bond_length", ..., ...), ("bond angle (deg)", "bond_angle", ..., ...)]
    fig = Figure(figsize=(13, 7))
    for ax, (title, key, sel, ref_sel) in zip(fig.subplots(2, 3).flat, panels):
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


def draw_molecules(path: Path, smiles: np.ndarray, n: int = 24) -> bool:
    """2D depictions of the first n valid molecules (non-empty SMILES); False, and no file, when there are none."""
    from rdkit import Chem
    from rdkit.Chem import Draw

    shown = smiles[smiles != ""][:n].tolist()
    if shown:
        Draw.MolsToGridImage([Chem.MolFromSmiles(s) for s in shown], molsPerRow=6, subImgSize=(220, 180),
                             legends=shown).save(path)
    return bool(shown)


def plot_curves(log_path: Path, path: Path) -> None:
    """Loss (and validation loss) of a training log.jsonl against step; molecule / atom stability in a second panel
    when logged."""
    from matplotlib.figure import Figure

    records = [r for r in map(json.loads, filter(str.strip, log_path.read_text().splitlines())) if "step" in r]
    curves = [k for k in ("mol_stability", "atom_stability") if any(k in r for r in records)]
    fig = Figure(figsize=(6 + 5 * bool(curves), 4))
    axes = fig.subplots(1, 1 + bool(curves), squeeze=False)
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
