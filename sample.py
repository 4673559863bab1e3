"""Sample molecules or crystals from a trained checkpoint (EMA weights) and write them as extxyz and SDF / CIF.

    python sample.py --ckpt out/qm9_gnn_flow_small/ckpt.pt --n 1000 --steps 50
    python sample.py --ckpt out/perov5_csp_gnn_flow_small/ckpt.pt --compositions test   # structure prediction

Molecule and de novo crystal sizes are drawn from the training set's atom-count distribution stored in the
checkpoint, so the checkpoint alone is enough; a structure-prediction model samples for the compositions of a
split of its data set. Writes OUT/samples.extxyz (every structure, ASE reads it), OUT/samples.sdf for molecules
(bonds inferred from geometry, RDKit reads it), OUT/samples.cif for crystals (one data block per crystal;
pymatgen and ASE read it), OUT/sample.log and OUT/sample.json (the counts and the throughput, for scale.py).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from models.checkpoint import CheckpointError, load_checkpoint
from models.cli import PRECISIONS, add_markdown_help, checked_device, nonnegative_float, nonnegative_int, positive_float, positive_int, writable_dir
from models.domains import all_samplers, domain_of
from models.fileio import DataError, DiskFull, atomic_write
from models.precision import backbone_precision, flush_denormals
from models.sampling import sample_structures

def property_value(text: str) -> tuple[str, float]:
    """--condition's PROP=VALUE -> (PROP, VALUE), the value a finite number."""
    name, eq, value = text.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not eq or not name or not np.isfinite(number):
        raise argparse.ArgumentTypeError(f"expected PROP=VALUE with a finite number (alpha=80), got {text!r}")
    return name, number


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py (ckpt.pt, or weights.pt: a finished run's EMA weights alone)")
parser.add_argument("--n", type=positive_int, default=None, help="number of molecules or crystals to sample (default 1000); structure prediction: the first N compositions (default all)")
parser.add_argument("--steps", type=positive_int, default=50, help="integration / denoising steps")
parser.add_argument("--method", choices=all_samplers(), default=None,
                    help="sampler; flow: heun (default; 2nd order, 2 evaluations a step) or euler; diffusion: "
                         "ancestral (default; DDPM / reverse SDE) or ode (DDIM / probability flow, deterministic); interpolant: sde (default; "
                         "molecules only) or ode")
parser.add_argument("--time-power", type=positive_float, default=None, help="the sampler's time grid t_i = 1 - (1 - i / steps)^P: "
                    "1 equal steps, > 1 finer steps near the data end (models/time.py). Default 2 for molecules (the recipe "
                    "ablation's winner), 1 for crystals (on perov-5, P = 2 and 50-200 steps moved validity by under a point: models/EXPERIMENTS.md, Crystals)")
parser.add_argument("--anneal-slope", type=nonnegative_float, default=0.0, help="crystals, flow and interpolant: FlowMM's inference "
                    "anti-annealing, the fractional coordinates' velocity times 1 + SLOPE t (0: off)")
parser.add_argument("--batch-size", type=positive_int, default=None, help="structures sampled at once (default: 100 on a CPU, where larger batches are slower per structure; 1000 on a GPU)")
parser.add_argument("--batching", choices=["size", "random"], default="size", help="size (default): sample the drawn "
                    "sizes (crystals, structure prediction: the compositions) in increasing order, so each batch is "
                    "padded only to its largest, not to about the largest of all; random: in the order drawn (the "
                    "sampler before this option; the same seed gives other structures under each). The output is "
                    "in the order drawn either way")
parser.add_argument("--weights", choices=["ema", "model"], default="ema", help="EMA weights (default) or the raw ones")
parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of sizes and noise")
parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="autocast of the backbone; auto (default): bf16 on CUDA, and "
                    "on a CPU with AMX bf16 only for the backbones kernels/step_bench.py measured faster in it; fp32 on a CPU "
                    "without AMX (models/precision.py)")
parser.add_argument("--compile", action="store_true", help="torch.compile the backbone (inductor; about a minute to compile). On this "
                    "CPU, on one thread, kernels/step_bench.py measured sampling 2.0 x faster for the Transformer (in bf16, its default "
                    "here), and for the EGNN 1.06 x in fp32 (its default), 1.36 x with --precision bf16 (kernels/README.md, "
                    "\"A step on this CPU\"); the samples are the same process's, with other rounding")
parser.add_argument("--condition", nargs="+", type=property_value, default=None, metavar="PROP=VALUE", help="a conditional "
                    "checkpoint (train.py --condition): sample every molecule for these values, one for each of its properties, "
                    "in its unit (alpha=80 gap=6000); sizes from the training histogram. Default: EDM's protocol, each molecule an "
                    "(atom count, properties) pair drawn from the generator's training half. The requested values go into each "
                    "molecule's extxyz info (condition_<property>), which evaluate.py --oracle reads")
parser.add_argument("--guidance", type=nonnegative_float, default=1.0, help="a conditional checkpoint: classifier-free guidance "
                    "weight W, output = unconditional + W (conditional - unconditional): 1 the conditional model (default), 0 the "
                    "unconditional one, > 1 further towards the condition (two backbone passes a step)")
parser.add_argument("--compositions", choices=["test", "val", "train"], default="test", help="structure prediction: the split of the checkpoint's data set whose compositions are sampled")
parser.add_argument("--n-per-composition", type=positive_int, default=1, help="structure prediction: samples for each composition")
parser.add_argument("--data-dir", default=None, help="structure prediction: where the crystal data lives (default: ./data or $MOLGEN_DATA)")
parser.add_argument("--out", default=None, help="output directory (default: the checkpoint's directory)")


def compositions_to_predict(args, ckpt: dict):
    """Structure prediction: (the compositions of args.compositions, first --n, whose elements the model knows;
    their rows in the split)."""
    from models.crystals import load_crystals

    compositions = load_crystals(ckpt["data"], args.compositions, args.data_dir)
    unknown = [i for i in range(len(compositions)) if set(compositions.numbers[compositions.atoms_of(i)]) - set(ckpt["elements"])]
    if unknown:  # the model has no embedding for an element it never saw: those compositions cannot be sampled
        print(f"sample.py: {len(unknown)} {args.compositions} compositions hold elements outside the model's vocabulary; "
              f"skipped (evaluate.py counts them as not matched), e.g. {compositions.ids[unknown[0]]}")
    skipped = set(unknown)
    keep = [i for i in range(len(compositions)) if i not in skipped][: args.n or None]
    return compositions.subset(keep), keep


def main() -> None:
    add_markdown_help(parser)
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    try:
        ckpt = load_checkpoint(Path(args.ckpt))
    except CheckpointError as e:
        raise SystemExit(f"sample.py: {e}")
    out_dir = writable_dir(parser, Path(args.out) if args.out else Path(args.ckpt).parent, "--out")
    domain = domain_of(ckpt)
    process_cls = domain.process_class(ckpt["gen"])
    args.method = args.method or process_cls.SAMPLERS[0]
    if args.method not in process_cls.SAMPLERS:
        raise SystemExit(f"sample.py: --method {args.method} is not a sampler of --gen {ckpt['gen']} for {domain.kind}; "
                         f"choose one of {process_cls.SAMPLERS}")
    options = {"time_power": args.time_power or domain.TIME_POWER}
    if args.anneal_slope:
        if "anneal_slope" not in process_cls.OPTIONS:
            raise SystemExit(f"sample.py: --anneal-slope scales an ODE's velocity: an option of crystal flow and interpolant, "
                             f"not {domain.kind} {ckpt['gen']}")
        options["anneal_slope"] = args.anneal_slope
    try:
        domain.check_checkpoint(ckpt, args.ckpt)
    except ValueError as e:
        raise SystemExit(str(e))
    n = args.n or 1000
    condition = dict(args.condition) if args.condition else None
    if args.condition and len(condition) < len(args.condition):
        raise SystemExit(f"sample.py: --condition names a property twice: {' '.join(f'{k}={v:g}' for k, v in args.condition)}")
    if "condition" not in ckpt and (condition or args.guidance != 1.0):
        raise SystemExit(f"sample.py: {args.ckpt} was trained without train.py --condition: it takes no --condition and no --guidance")
    if "condition" in ckpt and args.guidance != 1.0 and not ckpt["process_config"].get("condition_dropout"):
        print(f"sample.py: warning: {args.ckpt} was trained with --condition-dropout 0, so its unconditional model, which "
              f"--guidance {args.guidance:g} mixes in, was never trained")
    if condition and set(condition) == set(ckpt["condition"]["properties"]):  # in the model's order, as it reports them
        condition = {name: condition[name] for name in ckpt["condition"]["properties"]}
    compositions, truth_rows, what = None, None, ""
    if ckpt.get("csp"):  # structure prediction: the crystals of a split's compositions
        try:
            compositions, truth_rows = compositions_to_predict(args, ckpt)
        except DataError as e:
            raise SystemExit(f"sample.py: {e}")
        what = f"{len(compositions)} {ckpt['data']} {args.compositions} compositions x {args.n_per_composition}: "
    batch_size = args.batch_size or (1000 if device.type == "cuda" else 100)
    precision = backbone_precision(device, args.precision, domain.arch_class(ckpt["arch"]))
    t0 = time.time()
    try:
        structures, n_bad = sample_structures(ckpt, n, args.steps, args.method, batch_size, args.seed, device, args.weights,
                                              args.batching == "size", compositions, args.n_per_composition, truth_rows,
                                              precision, condition, args.guidance, args.compile, **options)
    except (CheckpointError, DataError, ValueError) as e:
        raise SystemExit(f"sample.py: {args.ckpt}: {e}")
    elapsed = time.time() - t0
    n_drawn = len(structures) + n_bad
    if not structures:
        raise SystemExit(f"sample.py: all {n_bad} sampled {domain.kind} have non-finite (NaN / Inf) coordinates; nothing written. "
                         f"The checkpoint {args.ckpt} (step {ckpt['step']}) is not usable; try more --steps or another checkpoint")
    for atoms in structures:
        atoms.info.update(ckpt_step=ckpt["step"], arch=ckpt["arch"], gen=ckpt["gen"], **domain.sample_info(ckpt),
                          steps=args.steps, method=args.method, **options,
                          **({"guidance": args.guidance} if "condition" in ckpt else {}))
    try:
        written = domain.write_samples(out_dir, structures)
    except DiskFull as e:
        raise SystemExit(f"sample.py: {e}")
    sizes = np.array([len(a) for a in structures])
    grid = f"time-grid power {options['time_power']:g}" + (f"; anti-annealing slope {args.anneal_slope:g}" if args.anneal_slope else "")
    if "condition" in ckpt:
        asked = ", ".join(f"{k} = {v:g}" for k, v in condition.items()) if condition else \
            f"{', '.join(ckpt['condition']['properties'])} and sizes drawn from the generator's training half"
        what += f"conditioned on {asked}, guidance {args.guidance:g}: "
    summary = (f"sampled {what}{n_drawn} {domain.kind} ({sizes.mean():.1f} atoms on average) from {args.ckpt} (step "
               f"{ckpt['step']}, {args.weights} weights) with {args.steps} {args.method} steps ({grid}) on {device} ({precision}) in "
               f"{elapsed:.1f} s: {n_drawn / elapsed:,.1f} {domain.kind}/s; wrote {len(structures)} to {written}")
    if n_bad:
        summary += f"; {n_bad} had non-finite (NaN / Inf) coordinates and were not written"
    report(out_dir, summary, {"structures": n_drawn, "written": len(structures), "ckpt_step": ckpt["step"], "steps": args.steps,
                              "method": args.method, **options, "batching": args.batching, "device": str(device), "precision": precision,
                              **({"condition": condition or "protocol", "guidance": args.guidance} if "condition" in ckpt else {}),
                              "seconds": elapsed, "per_s": n_drawn / elapsed})


def report(out_dir: Path, summary: str, stats: dict) -> None:
    """The summary line to the console and sample.log; the numbers (throughput included) to sample.json."""
    print(summary)
    with open(out_dir / "sample.log", "a") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + summary + "\n")
    atomic_write(out_dir / "sample.json", lambda tmp: Path(tmp).write_text(json.dumps(stats, indent=1)))


if __name__ == "__main__":
    flush_denormals()  # a script's choice, not the library's (models/precision.py says why)
    try:
        main()
    except KeyboardInterrupt:  # samples are written only at the end, atomically: nothing half-written
        raise SystemExit("sample.py: interrupted; nothing written") from None
