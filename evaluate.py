"""Evaluate generated molecules against QM9 (EDM protocol plus distribution metrics) or generated crystals against
a CDVAE set (CDVAE protocol), or the real test set; or a student force field against its teacher.

    python evaluate.py out/run/samples.extxyz --data qm9     # metrics of generated molecules
    python evaluate.py --reference qm9                         # the same metrics on the real test set
    python evaluate.py out/csp/samples.extxyz --data perov5    # crystals: structure prediction or de novo
    python evaluate.py --reference perov5                      # the real perov-5 test crystals
    python evaluate.py --task ff --ckpt out/ff/ckpt.pt labels.h5 [more.h5 ...]   # student vs teacher

Writes metrics JSON, figures (property histograms, a grid of sampled molecules, training curves when a
log.jsonl sits next to the samples; for a student: parity plots and MD energy traces) and evaluate.log; prints
the metric table and the throughput. Metric definitions: models/molecule_metrics.py, models/forcefield_eval.py and
models/README.md, "Metrics".
"""
import argparse
import logging
import sys
import time
from pathlib import Path

from models.domains import CRYSTAL_DATA, get_domain
from models.cli import add_markdown_help, checked_device, fraction, nonnegative_float, nonnegative_int, output_file, positive_float, positive_int, writable_dir
from models.fileio import DataError

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("inputs", nargs="*", type=Path, help="--task gen: the generated molecules or crystals: sample.py's samples.extxyz, "
                    "or another model's samples as XYZ / extended XYZ / SDF (molecules), CIF with one data block per crystal "
                    "(crystals), or a directory of such files; --task ff: labels files (.h5) of the student's teacher, scored on the "
                    "structures it did not train on")
parser.add_argument("--task", choices=["gen", "ff"], default="gen", help="gen: generated molecules or crystals; ff: a student force field")
parser.add_argument("--data", default="qm9", choices=["qm9", *CRYSTAL_DATA], help="data set the samples imitate")
parser.add_argument("--reference", choices=["qm9", *CRYSTAL_DATA], help="evaluate the real test set instead of samples "
                    "(the 'Data' row; its distribution metrics are taken against the validation split)")
parser.add_argument("--n-test", type=positive_int, default=None, help="--reference: score a fixed random subset of N test "
                    "structures (seed 0), so that the Data row has the model rows' sample count (default: all)")
parser.add_argument("--data-dir", type=Path, default=None, help="data and cache directory (default $MOLGEN_DATA or "
                    "./data); reference statistics and training SMILES are cached there")
parser.add_argument("--workers", type=positive_int, default=None, help="crystals: processes for StructureMatcher and fingerprints (default: every core)")
parser.add_argument("--n-unique", type=positive_int, default=1000, help="crystals: the first N samples scored for uniqueness and novelty (StructureMatcher against each other and the training split)")
parser.add_argument("--stability", action="store_true", help="crystals: relax the first --n-unique samples with CHGNet and score energy above a CHGNet hull and S.U.N. (minutes to hours on a CPU; the hull is cached in --data-dir)")
parser.add_argument("--relax-steps", type=positive_int, default=500, help="crystals, --stability: FIRE steps at most per relaxation (forces below 0.1 eV/A end it)")
parser.add_argument("--hull", choices=("single-point", "relaxed"), default="single-point", help="crystals, --stability: the training crystals' CHGNet energies on the hull: single points at their DFT geometries (sound for DFT ground states, as MP-20's are), or relaxed like the samples (perov-5's cubic cells lie far above their CHGNet minima). relaxed relaxes only the training crystals inside the scored crystals' chemical systems, and --reference then relaxes the test crystals too; each relaxation is cached in --data-dir as it finishes, so a stopped run resumes")
parser.add_argument("--stable-threshold", type=nonnegative_float, default=0.1, help="crystals, --stability: energy above the hull (eV/atom) at or below which a crystal counts as stable")
parser.add_argument("--structure-timeout", type=positive_float, default=600.0, help="crystals: seconds at most for one structure's CrystalNN fingerprint, primitive cell, StructureMatcher comparison or CHGNet relaxation (a CDVAE crystal's fingerprint takes about a second, a relaxation 4-45 s); a structure past it is stopped, scored as if that work had failed (uncovered, matching nothing, not stable), and counted in the log and the JSON")
parser.add_argument("--no-coverage", action="store_true", help="crystals: skip coverage (CrystalNN fingerprints take minutes per thousand crystals)")
parser.add_argument("--json", type=Path, default=None, help="metrics output (default: SAMPLES' directory/"
                    "metrics.json, or out/reference-<data>/metrics.json; --task ff: the checkpoint's directory/ff_metrics.json, or "
                    "out/<its name>/ff_metrics.json for one shipped in models/pretrained); evaluate.log goes next to it")
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
parser.add_argument("--oracle", type=Path, default=None, help="structures from a conditional checkpoint: the train.py --task oracle "
                    "checkpoint of --data that judges them (QM9's ships: models/pretrained/qm9_oracle.pt). Adds, for each property the structures requested, the mean absolute error between the "
                    "request and the oracle's prediction, beside EDM's baselines computed with the same oracle: its own error on the "
                    "generator's half (L-bound), the property from the atom count alone (#Atoms), shuffled properties (U-bound), and a "
                    "size-only generator's score (#Atoms, sampled: each structure against one of its size from the oracle's half)")
parser.add_argument("--condition", nargs="+", default=None, metavar="PROP", help="with --oracle: the properties to score (default: "
                    "every one the oracle predicts that the structures requested)")
ff = parser.add_argument_group("--task ff (a student force field against its teacher)")
ff.add_argument("--ckpt", type=Path, default=None, help="the student: a train.py --task ff checkpoint")
ff.add_argument("--labels", nargs="+", type=Path, default=[], help="labels files of the student's teacher (the same as giving them as INPUTS)")
ff.add_argument("--teacher", default=None, help="teacher to time the student against (default: the one whose labels it learned)")
ff.add_argument("--device", default="cpu", help="device of the student and of a torch teacher (cpu / cuda), for accuracy and speed")
ff.add_argument("--speed-structures", type=positive_int, default=24, help="structures per size group in the speed benchmark")
ff.add_argument("--md-structures", type=nonnegative_int, default=3, help="held-out structures of each kind (molecules, crystals) run by NVE MD with the student")
ff.add_argument("--md-steps", type=positive_int, default=2000, help="velocity-Verlet steps per MD run")
ff.add_argument("--md-timestep", type=positive_float, default=0.5, help="MD time step (fs)")
ff.add_argument("--md-temperature", type=positive_float, default=300.0, help="initial Maxwell-Boltzmann temperature of MD (K)")
ff.add_argument("--no-teacher", action="store_true", help="skip the teacher's speed (no speed-up); accuracy needs only the labels")
ff.add_argument("--compile", action="store_true", help="run the student through torch.compile (ForceField.compile_inference): "
                "the same numbers, faster once compiled (kernels/student_bench.py); compiling takes tens of seconds")


def fail(message: str):
    sys.exit(f"evaluate.py: error: {message}")


add_markdown_help(parser)
args = parser.parse_args()
started = time.time()
if args.task == "ff":
    args.inputs += args.labels
    if args.reference or args.ckpt is None or not args.inputs:
        parser.error("--task ff takes --ckpt STUDENT and labels files: evaluate.py --task ff --ckpt out/ff/ckpt.pt labels.h5")
    for path in [args.ckpt, *args.inputs]:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    checked_device(parser, args.device)
    if args.teacher is not None:
        from models.teachers import teacher_name
        try:
            teacher_name(args.teacher)
        except argparse.ArgumentTypeError as e:
            parser.error(f"--teacher: {e}")
    domain = None
    # Beside the checkpoint, except one that ships in models/pretrained: its report goes to out/<its name>/, so that
    # scoring a shipped student leaves the package as it was and the two students' reports apart.
    shipped = args.ckpt.resolve().parent == Path(__file__).resolve().parent / "models" / "pretrained"
    out_json = output_file(parser, args.json or (Path("out") / args.ckpt.stem if shipped else args.ckpt.parent) / "ff_metrics.json",
                           "--json")
else:
    if args.ckpt or args.labels or args.teacher or args.compile:
        parser.error("--ckpt, --labels, --teacher and --compile are options of --task ff")
    if len(args.inputs) > 1:
        parser.error(f"one SAMPLES file at a time ({len(args.inputs)} given)")
    args.samples = args.inputs[0] if args.inputs else None
    if (args.samples is None) == (args.reference is None):
        parser.error("give either SAMPLES or --reference qm9|perov5|carbon24|mp20")
    if args.samples is not None and not args.samples.exists():
        parser.error(f"SAMPLES {args.samples}: no such file or directory")
    if args.n_test and not args.reference:
        parser.error("--n-test is an option of --reference (a model row's count is the number of samples in SAMPLES)")
    domain = get_domain(args.reference or args.data)
    if args.condition and not args.oracle:
        parser.error("--condition names the properties --oracle scores: give --oracle ORACLE.pt")
    if args.oracle and args.reference:
        parser.error("--oracle scores the structures a conditional checkpoint sampled: SAMPLES, not --reference")
    if args.oracle and not args.oracle.is_file():
        parser.error(f"--oracle {args.oracle}: no such checkpoint file")
    beside = args.samples if args.samples is not None and args.samples.is_dir() else args.samples.parent if args.samples else None
    out_json = output_file(parser, args.json or (beside / "metrics.json" if beside else
                                                 Path(f"out/reference-{args.reference}/metrics.json")), "--json")
fig_dir = writable_dir(parser, args.figures or out_json.parent, "--figures")

logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[
    logging.StreamHandler(sys.stdout), logging.FileHandler(out_json.parent / "evaluate.log", mode="w")])
logging.getLogger("evaluate").info("$ python " + " ".join(sys.argv))

# Each domain's module is imported once the flags are known to be good, so that a bad flag fails at once. A failure
# the run can expect (unreadable samples, checkpoint or labels, missing data, a full disk) ends it with one line
# naming the file, not a traceback.
from models.checkpoint import CheckpointError  # noqa: E402
from models.labels import LabelsError  # noqa: E402
from models.precision import flush_denormals  # noqa: E402

flush_denormals()  # a trained oracle's and a student's steps: 3.9 x and 1.35 x on this CPU (kernels/README.md)

try:
    if domain is None:
        from models.student_evaluation import score_student
        score_student(args.ckpt, args.inputs, out_json, fig_dir, teacher=args.teacher, time_teacher=not args.no_teacher,
                      device=args.device, speed_structures=args.speed_structures, md_structures=args.md_structures,
                      md_steps=args.md_steps, md_timestep=args.md_timestep, md_temperature=args.md_temperature,
                      compile=args.compile, started=started)
    else:
        if args.oracle:  # an oracle that cannot judge these samples is refused before the scoring's minutes
            from models.condition_evaluation import load_oracle
            oracle = load_oracle(args.oracle, args.data)
        domain.score(args, out_json, fig_dir, started)
        if args.oracle:  # EDM's conditional metric, added to the metrics the domain wrote
            import json

            from models.condition_evaluation import score_condition
            from models.evaluation import write_metrics
            conditional = score_condition(args.samples, args.oracle, oracle, args.condition, args.data_dir,
                                          progress=not args.no_progress)
            write_metrics(out_json, {**json.loads(out_json.read_text()), "condition": conditional})
            log = logging.getLogger("evaluate")
            log.info(f"conditional generation, judged by the oracle {args.oracle} (step {conditional['oracle_step']}):")
            log.info("| property | unit | samples | MAE | its standard error | L-bound | #Atoms | #Atoms, sampled | U-bound |")
            log.info("|---|---|---|---|---|---|---|---|---|")
            for name, r in conditional["properties"].items():
                log.info(f"| {name} | {r['unit']} | {r['n_samples']:,} | {r['mae']:.4g} | {r['mae_se']:.2g} | {r['l_bound']:.4g} | "
                         f"{r['n_atoms']:.4g} | {r['n_atoms_sampled']:.4g} | {r['u_bound']:.4g} |")
            for name, r in conditional["properties"].items():
                log.info(f"{name}: among samples of one size, the oracle's value follows the requested one with slope "
                         f"{r['within_size_slope']:.3g} (correlation {r['within_size_corr']:.3g}; 1 follows it exactly, the #Atoms "
                         "baseline 0)")
                if "chgnet_mae" in r:
                    log.info(f"{name}, judged by CHGNet instead ({r['chgnet']}; its energies shifted by {r['chgnet_offset']:+.4g} "
                             f"{r['unit']} to the data's zero on the oracle's half): MAE {r['chgnet_mae']:.4g}, CHGNet's own L-bound "
                             f"{r['chgnet_l_bound']:.4g}" + (f"; CHGNet failed on {r['chgnet_failed']} samples" if r["chgnet_failed"] else ""))
                if "xtb_mae" in r:
                    log.info(f"{name}, judged by xtb instead ({r['xtb']}, each sample relaxed with it, its values mapped to the "
                             f"data's by a line fitted on the oracle's half): MAE {r['xtb_mae']:.4g} {r['unit']} on all samples, {r['xtb_mae_stable']:.4g} on the "
                             f"{r['xtb_n_stable']:,} stable ones, mean signed error {r['xtb_bias']:+.4g} (the oracle's "
                             f"{r['oracle_bias']:+.4g}; xtb's on the samples as generated {r['xtb_bias_as_generated']:+.4g}); xtb's own L-bound "
                             f"{r['xtb_l_bound']:.4g}. The two judges lie {r['judges_apart_real']:.4g} apart on real molecules of "
                             f"the generator's half and {r['judges_apart_samples']:.4g} apart on the samples"
                             + (f"; xtb failed on {r['xtb_failed']} samples" if r["xtb_failed"] else ""))
except (CheckpointError, LabelsError, DataError, OSError) as e:
    fail(str(e))
except KeyboardInterrupt:  # metrics are written only at the end; the crystal caches keep what finished
    fail(f"interrupted; {out_json} was not written. Cached work (crystal fingerprints, CHGNet relaxations) is kept, and "
         f"the same command picks it up")
