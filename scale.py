"""Scaling laws of the benchmark's runs.

    python scale.py fit RESULTS [RESULTS ...] [--out DIR]

RESULTS are JSON files of training runs, each {"sweep": "model" | "data" | "compute", "runs": [...]} (or a bare
list of runs that each name their sweep), one record per finished run:

    {"sweep": "model", "params": 1.2e6, "train_size": 110000, "examples_seen": 3.2e6, "train_flops": 4.1e15,
     "val_loss": 0.42, ...}

`fit` fits L(N) = a N^-alpha + L_inf to the model sweep (N: parameters), L(D) to the data sweep (D: training
structures), L(C) to the compute sweep (C: training FLOPs), and L(N, D) = E + A N^-alpha + B D^-beta (D:
examples seen) to the model and compute sweeps together, with residual-bootstrap intervals for every parameter,
and from the joint law the compute-optimal N*(C) and D*(C) under C = k N D, k measured from the runs (models/
scaling.py says how and why). Writes DIR/fit.json, DIR/fit.md (the report), DIR/fit.png (log-log plots) and
DIR/fit.log; DIR defaults to the first RESULTS file's directory.
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from models.cli import positive_int, writable_dir
from models.fileio import atomic_write

LAWS = {  # one-resource laws: sweep -> (record key of x, symbol, what x is)
    "model": ("params", "N", "parameters"),
    "data": ("train_size", "D", "training structures"),
    "compute": ("train_flops", "C", "training FLOPs"),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
fit_parser = commands.add_parser("fit", help="fit scaling laws to sweep results", description="Fit L(N), L(D), L(C) "
                                 "and L(N, D) with bootstrap intervals; write fit.json, fit.md, fit.png and fit.log.")
fit_parser.add_argument("results", nargs="+", type=Path, help="results JSON files of the sweeps")
fit_parser.add_argument("--out", type=Path, default=None, help="output directory (default: the first RESULTS file's directory)")
fit_parser.add_argument("--n-boot", type=positive_int, default=1000, help="bootstrap resamples per law")
fit_parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
fit_parser.add_argument("--loss-key", default="val_loss", help="the record key of the loss to fit")


def read_runs(paths: list[Path], loss_key: str) -> list[dict]:
    """Every run of every RESULTS file, each with its sweep; a file or record that cannot be used ends the program
    with a message naming it."""
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
            if sweep not in LAWS:
                sys.exit(f"scale.py: {path}, run {i}: sweep {sweep!r} is not one of {sorted(LAWS)}")
            loss = record.get(loss_key)
            if not isinstance(loss, (int, float)) or not np.isfinite(loss) or loss <= 0:
                sys.exit(f"scale.py: {path}, run {i}: {loss_key} = {loss!r}; a fit needs a finite loss > 0")
            runs.append({**record, "sweep": sweep, "loss": float(loss), "source": f"{path}, run {i}"})
    return runs


def column(runs: list[dict], key: str) -> np.ndarray:
    for r in runs:
        if not isinstance(r.get(key), (int, float)) or not r[key] > 0:
            sys.exit(f"scale.py: {r['source']}: {key} = {r.get(key)!r}; the fit needs a number > 0")
    return np.array([float(r[key]) for r in runs])


def interval_text(interval) -> str:
    return f"[{interval[0]:.4g}, {interval[1]:.4g}]"


def main():
    args = parser.parse_args()
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

    joint_runs = [r for r in runs if r["sweep"] in ("model", "compute")]
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
        md += [f"## L(N, D): parameters and examples seen ({len(joint_runs)} model- and compute-sweep runs)", "",
               "L = E + A N^-alpha + B D^-beta", "", "| parameter | fit | 95 % interval |", "|---|---|---|",
               *[f"| {p} | {v:.4g} | {interval_text(boot['interval'][p])} |" for p, v in law.params().items()], "",
               f"Compute-optimal under C = k N D with k = {k:.3g} (median over the runs): N*(C) ~ C^{exponent_n:.3f} "
               f"{interval_text(a_interval)}, D*(C) ~ C^{1 - exponent_n:.3f}.", "",
               "| C (FLOPs) | N* (parameters) | D* (examples) |", "|---|---|---|",
               *[f"| {c:.3g} | {p:.3g} | {e:.3g} |" for c, p, e in zip(budgets, n_opt, d_opt)], ""]
    else:
        log.info("L(N, D): needs at least 5 model- and compute-sweep runs with 2 distinct N and 2 distinct D: not fitted")
    if not report["laws"]:
        sys.exit("scale.py: nothing to fit (each law needs at least 3 runs of its sweep)")

    if plots:
        plot(plots, out / "fit.png")
    atomic_write(out / "fit.json", lambda tmp: Path(tmp).write_text(json.dumps(report, indent=1)))
    atomic_write(out / "fit.md", lambda tmp: Path(tmp).write_text("\n".join(md)))
    log.info(f"wrote {out / 'fit.json'}, {out / 'fit.md'}" + (f", {out / 'fit.png'}" if plots else "") + f" in {time.time() - t0:.1f} s")


def plot(plots: list, path: Path) -> None:
    """One log-log panel per one-resource law: the runs, the fit and its 95 % bootstrap band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.scaling import PowerLaw

    fig, axes = plt.subplots(1, len(plots), figsize=(4.5 * len(plots), 3.6), squeeze=False)
    for ax, (name, what, x, loss, law, samples) in zip(axes[0], plots):
        grid = np.logspace(np.log10(x.min()) - 0.3, np.log10(x.max()) + 0.3, 100)
        curves = np.array([PowerLaw(a, al, samples["l_inf"][i] if law.floor else 0.0)(grid)
                           for i, (a, al) in enumerate(zip(samples["a"], samples["alpha"]))])
        ax.fill_between(grid, *np.percentile(curves, [2.5, 97.5], axis=0), alpha=0.25, label="95 % band")
        ax.plot(grid, law(grid), label=f"alpha = {law.alpha:.3f}")
        ax.scatter(x, loss, color="k", zorder=3, label="runs")
        ax.set(xscale="log", yscale="log", xlabel=what, ylabel="loss", title=name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


if __name__ == "__main__":
    main()
