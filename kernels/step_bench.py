"""Where a training step and a sampling step spend their time, on this machine's CPU.

    python kernels/step_bench.py                                   # every backbone at 6 x 128, fp32 and bf16, 1 and 2 threads
    python kernels/step_bench.py --archs gnn --sizes 6x128 9x256 --compile --profile
    python kernels/step_bench.py --data perov5 --compile                  # crystals (de novo): the same, per crystal
    python kernels/step_bench.py --ckpt models/pretrained/qm9_gnn_flow.pt   # a trained model's own weights

For each backbone x size x thread count x precision (x eager / torch.compile): the flow-matching training
step as train.py takes it (size-grouped batches of --batch molecules, or crystals with --data, from the training split, the recipe's
defaults, AdamW, gradient clipping) and the sampler's network evaluations as sample.py makes them. Every
variant runs the same batches and the same noise. Reported:
  - training molecules/s over --steps steps after --warmup (compilation, allocator and caches warm), and the
    FLOPs those steps count (matrix products, forward and backward, torch's FlopCounterMode, as train.py
    --count-flops), as GFLOP/s and as a fraction of this machine's matrix-product peak;
  - sampling molecules/s at 50 steps of the process's default sampler, timed over --sample-steps steps on a
    batch of --batch molecules of typical sizes (a sampler's steps cost the same, so 50 steps take 50 /
    --sample-steps times as long);
  - the matrix-product peak: the best of a few torch.mm of 2048 x 2048 at each thread count and precision
    (smaller where one product takes over a quarter of a second: bf16 on a CPU that emulates it);
  - with --profile, torch.profiler's split of eager fp32 training steps' and sampler steps' CPU time into matrix
    products, elementwise work, reductions and indexing, and the rest, and the ten most expensive operators.

Each (backbone, size) starts from a one-step train.py run (its recipe, its checkpoint), so what is timed is the
model train.py builds. Young weights time differently from trained ones (a trained network's small activations
and gradients reach float32's denormal range, which this machine's CPU handles slowly unless flushed, as the scripts
do): --ckpt times checkpoints instead, each with its own backbone, size, process, data and weights (the EMA weights
for the training step too where the file holds only those, as an exported weights.pt does). Writes OUT/step_bench.md and OUT/step_bench.json. Times are this machine's: the table
names its CPU and torch version. Run it on idle cores.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
from models.domains import DATA_SETS  # noqa: E402
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
SAMPLE_STEPS_REPORTED = 50
# torch.profiler operator names, by the kind of work they do
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_mkldnn",
              "aten::mkldnn", "aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention")
INDEX_OPS = ("aten::index", "aten::scatter", "aten::gather", "aten::sum", "aten::mean", "aten::cumsum", "aten::max",
             "aten::min", "aten::sort", "aten::argsort", "aten::masked", "aten::where", "aten::nonzero", "aten::norm",
             "aten::linalg_vector_norm", "aten::softmax", "aten::_softmax", "aten::_log_softmax", "aten::amax")
ELEMENTWISE_OPS = ("aten::add", "aten::sub", "aten::mul", "aten::div", "aten::silu", "aten::sigmoid", "aten::tanh", "aten::exp",
                   "aten::log", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::neg", "aten::clamp", "aten::copy_",
                   "aten::fill_", "aten::zero_", "aten::cos", "aten::sin", "aten::abs", "aten::native_layer_norm",
                   "aten::layer_norm", "aten::relu", "aten::gelu", "aten::erf", "aten::_to_copy", "aten::lerp",
                   "aten::_foreach", "aten::addcmul", "aten::addcdiv", "aten::threshold", "aten::cat", "aten::stack")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def matmul_peak(threads: int, dtype: torch.dtype) -> tuple[float, int]:
    """GFLOP/s of the best of five n x n matrix products (after one to warm up), and n: 2048, or the first size from 256
    up whose product takes a quarter of a second. A CPU without native bf16 (no AVX-512 BF16 or AMX) emulates it at
    about 1 GFLOP/s, where one 2048 x 2048 product takes 20 s; its peak is as flat at 512."""
    torch.set_num_threads(threads)
    n = 256
    while True:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)
        if n == 2048 or time.perf_counter() - t0 > 0.25:
            break
        n *= 2
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9, n


def seed_run(arch: str, hidden: int, n_layers: int, data: str, train_split: str, batch: int, data_dir: str | None, workdir: Path) -> dict:
    """The checkpoint of a one-step train.py run of the backbone on `data`: its model, recipe and training-set
    arguments."""
    out = workdir / f"{arch}-{hidden}x{n_layers}"
    cmd = [sys.executable, "train.py", "--data", data, "--arch", arch, "--gen", "flow", "--hidden", str(hidden), "--n-layers",
           str(n_layers), "--iters", "1", "--batch-size", str(batch), "--eval-samples", "0", "--val-size", "8", "--out", str(out),
           "--overwrite"]
    cmd += ["--data-dir", data_dir] if data_dir else []
    cmd += ["--train-split", train_split] if data != "qm9" else []
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        sys.exit(f"step_bench: train.py failed for {arch} {hidden} x {n_layers}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    from models.checkpoint import load_checkpoint
    return load_checkpoint(out / "ckpt.pt")


def trained(path: Path) -> dict:
    """A train.py checkpoint (ckpt.pt or an exported weights.pt) of a generative model, to time with its weights."""
    from models.checkpoint import CheckpointError, load_checkpoint
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        sys.exit(f"step_bench: --ckpt {e}")
    return {**ckpt, "path": path}


class Workload:
    """The batches and noise every variant of one (backbone, size) runs: train.py's size-grouped batches of the
    training split, and the noise of its (seed, step) generators."""

    def __init__(self, ckpt: dict, batch: int, n_steps: int):
        from models.checkpoint import build_model
        from models.domains import domain_of
        from models.training import BatchSchedule, step_generator

        self.ckpt, self.batch = ckpt, batch
        args = argparse.Namespace(**{**ckpt["args"], "n_train": None})
        self.data = domain_of(ckpt).load_training(args, ckpt, progress=False)
        _, self.process = build_model(ckpt)  # the process needs no weights; every checkpoint holds the EMA ones
        schedule = BatchSchedule(len(self.data.train), batch, 0, self.data.train.mask.sum(1))
        self.steps = []
        for step in range(n_steps):
            idx = schedule.indices(step)
            width = schedule.width(idx)
            noise = self.process.draw_noise(batch, width, step_generator(0, step))
            self.steps.append((self.data.train.batch(idx, "cpu", width=width), noise))
        sizes = torch.sort(domain_of(ckpt).draw_sizes(ckpt, 32 * batch, torch.Generator().manual_seed(0))).values
        self.sample_sizes = sizes[16 * batch - batch // 2: 16 * batch + batch - batch // 2]  # a typical size-sorted batch

    def model(self, weights: str):
        """The backbone with the checkpoint's 'model' or 'ema' weights; an export holds only the EMA ones, which then
        stand in for the training weights (the same network, trained)."""
        from models.checkpoint import build_model
        return build_model(self.ckpt, weights=weights if weights in self.ckpt else "ema")[0]


def autocast(precision: str):
    return torch.autocast("cpu", dtype=PRECISIONS[precision], enabled=PRECISIONS[precision] is not None)


def time_training(work: Workload, precision: str, compiled: bool, warmup: int) -> dict:
    """Molecules/s and GFLOP/s of train.py's step over the workload's steps after the first `warmup`."""
    from models.training import train_step_flops

    model = work.model("model").train()
    # Size-grouped batches change the atom axis from step to step: compile with that axis symbolic, and run the
    # workload once untimed so that no timed step pays for a (re)compilation.
    step_model = torch.compile(model, dynamic=True) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for batch, noise in (work.steps + work.steps if compiled else work.steps):
        t0 = time.perf_counter()
        with autocast(precision):
            loss = work.process.loss(step_model, batch, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - t0)
    timed = times[-len(work.steps) + warmup:]
    widths = {}
    for batch, _ in work.steps[warmup:]:
        widths[batch["mask"].shape[1]] = widths.get(batch["mask"].shape[1], 0) + 1
    by_width = {b["mask"].shape[1]: (b, n) for b, n in work.steps}
    flops = train_step_flops(model, work.process, lambda w: (by_width[w][0], dict(by_width[w][1])),  # it sets the noise's coin
                             list(widths.items()), autocast(precision), 1)
    seconds = sum(timed) / len(timed)
    return {"train_mol_s": work.batch / seconds, "train_ms": 1e3 * seconds, "train_gflops": flops / seconds / 1e9,
            "flops_per_step": flops}


@torch.no_grad()
def time_sampling(work: Workload, precision: str, compiled: bool, n_steps: int) -> dict:
    """Molecules/s at SAMPLE_STEPS_REPORTED steps of the default sampler, from n_steps timed steps (after a
    two-step warm-up call, which compiles both of the self-conditioned network calls)."""
    model = work.model("ema").eval()
    step_model = torch.compile(model, dynamic=True) if compiled else model
    method = work.process.SAMPLERS[0]
    request = {"n_atoms": work.sample_sizes}
    with autocast(precision):  # two untimed steps: the first network call has no self-conditioning estimate, later ones do
        work.process.sample(step_model, request, 2, method, torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        work.process.sample(step_model, request, n_steps, method, torch.Generator().manual_seed(0))
        seconds = (time.perf_counter() - t0) * SAMPLE_STEPS_REPORTED / n_steps
    return {"sample_mol_s": len(work.sample_sizes) / seconds, "sample_method": method}


def split_by_kind(prof) -> dict:
    """Self CPU time of a profile by kind of operator, and its ten most expensive operators, as fractions."""
    events = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in events)
    kinds = {"matrix products": 0.0, "elementwise": 0.0, "reductions, indexing, softmax": 0.0, "other": 0.0}
    for key, t in events:
        kind = "matrix products" if key.startswith(MATMUL_OPS) else "reductions, indexing, softmax" if key.startswith(INDEX_OPS) \
            else "elementwise" if key.startswith(ELEMENTWISE_OPS) else "other"
        kinds[kind] += t
    top = sorted(events, key=lambda e: -e[1])[:10]
    return {"split": {k: v / total for k, v in kinds.items()}, "top": [(k, t / total) for k, t in top]}


def profile_steps(work: Workload) -> dict:
    """torch.profiler's split of three eager fp32 training steps, and of three sampler steps, by operator kind."""
    from torch.profiler import ProfilerActivity, profile

    model = work.model("model").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with profile(activities=[ProfilerActivity.CPU]) as train_prof:
        for batch, noise in work.steps[:3]:
            loss = work.process.loss(model, batch, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model = work.model("ema").eval()
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as sample_prof:
        work.process.sample(model, {"n_atoms": work.sample_sizes}, 3, work.process.SAMPLERS[0], torch.Generator().manual_seed(0))
    return {"training step": split_by_kind(train_prof), "sampling step": split_by_kind(sample_prof)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["gnn", "transformer", "pairformer"], help="backbones")
    parser.add_argument("--sizes", nargs="+", default=["6x128"], help="depth x width of each backbone, e.g. 6x128 9x256")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch thread counts")
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"], help="autocast dtypes")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the backbone (inductor)")
    parser.add_argument("--batch", type=int, default=64, help="molecules per training step and per sampling batch")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2, help="training steps run before timing (compilation, caches)")
    parser.add_argument("--sample-steps", type=int, default=5, help="timed sampler steps (molecules/s is reported at 50)")
    parser.add_argument("--profile", action="store_true", help="add torch.profiler's split of fp32 training and sampling steps' time by operator kind")
    parser.add_argument("--data", default="qm9", choices=DATA_SETS, help="the data set whose batches are timed: qm9, or a CDVAE "
                        "crystal set (de novo generation)")
    parser.add_argument("--train-split", choices=["train", "val"], default="train", help="crystals: the CDVAE split to draw "
                        "batches from (val where the train file is not at hand)")
    parser.add_argument("--data-dir", default=None, help="data directory (default ./data or $MOLGEN_DATA)")
    parser.add_argument("--ckpt", nargs="+", type=Path, default=None, help="train.py checkpoints to time instead of one-step "
                        "runs of --archs x --sizes: each its own backbone, size, process and data, with its trained weights")
    parser.add_argument("--out", type=Path, default=Path("out/bench"), help="where step_bench.md and step_bench.json go")
    args = parser.parse_args()
    if any(t < 1 for t in args.threads) or min(args.batch, args.steps, args.sample_steps) < 1 or args.warmup < 0:
        parser.error("--threads, --batch, --steps and --sample-steps take integers > 0, --warmup >= 0")
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        assert all(len(s) == 2 and min(s) > 0 for s in sizes)
    except (ValueError, AssertionError):
        parser.error(f"--sizes: {' '.join(args.sizes)}: each is DEPTHxWIDTH, e.g. 6x128")

    machine = f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"
    print(f"step_bench: {machine}", flush=True)
    peaks = {(t, p): matmul_peak(t, PRECISIONS[p] or torch.float32) for t in args.threads for p in args.precisions}
    rows, profiles = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = (map(trained, args.ckpt) if args.ckpt else
                       (seed_run(arch, hidden, n_layers, args.data, args.train_split, args.batch, args.data_dir, Path(workdir))
                        for arch in args.archs for n_layers, hidden in sizes))
        for ckpt in checkpoints:
            ckpt["args"]["data_dir"] = args.data_dir  # this machine's data, not the directory the checkpoint was trained from
            work = Workload(ckpt, args.batch, args.warmup + args.steps)
            arch, size = ckpt["arch"], f"{ckpt['model_config']['n_layers']}x{ckpt['model_config']['hidden']}"
            if args.profile:
                torch.set_num_threads(max(args.threads))
                profiles[f"{arch} {size}"] = profile_steps(work)
            for threads in args.threads:
                torch.set_num_threads(threads)
                for precision in args.precisions:
                    for compiled in (False, True) if args.compile else (False,):
                        row = {"arch": arch, "size": size, "params": ckpt["n_params"], "threads": threads, "precision": precision,
                               "compiled": compiled, "gen": ckpt["gen"], "data": ckpt["data"],
                               "ckpt": str(ckpt["path"]) if "path" in ckpt else None}
                        row.update(time_training(work, precision, compiled, args.warmup))
                        row.update(time_sampling(work, precision, compiled, args.sample_steps))
                        row["of_peak"] = row["train_gflops"] / peaks[threads, precision][0]
                        rows.append(row)
                        print(format_row(row), flush=True)
    write(args, machine, peaks, rows, profiles)


def format_row(r: dict) -> str:
    return (f"| {r['arch']} | {r['size']} | {r['params'] / 1e6:.2f} M | {r['threads']} | {r['precision']} | "
            f"{'compile' if r['compiled'] else 'eager'} | {r['train_ms']:.0f} | {r['train_mol_s']:.1f} | {r['train_gflops']:.1f} | "
            f"{100 * r['of_peak']:.1f} % | {r['sample_mol_s']:.2f} |")


def write(args, machine: str, peaks: dict, rows: list[dict], profiles: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python kernels/step_bench.py " + " ".join(sys.argv[1:])
    lines = [f"# Training and sampling steps on {machine}", "", f"`{command}`: "
             + (", ".join(f"{r['ckpt']} ({r['arch']} x {r['gen']}, {r['data']})" for r in {r["ckpt"]: r for r in rows}.values())
                + ", their trained weights" if args.ckpt else f"{args.data}, flow matching")
             + f", batches of {args.batch} structures; training timed over {args.steps} steps after {args.warmup}; sampling at {SAMPLE_STEPS_REPORTED} "
             f"steps from {args.sample_steps} timed steps.", "",
             "Matrix-product peak (torch.mm of n x n): " + ", ".join(f"{t} thread(s) {p} {g:.0f} GFLOP/s (n = {n})" for (t, p), (g, n) in peaks.items()),
             "", "| backbone | size | params | threads | precision | mode | train ms/step | train mol/s | GFLOP/s | of peak | "
             "sample mol/s (50 steps) |", "|---|---|---|---|---|---|---|---|---|---|---|", *map(format_row, rows)]
    for name, steps in profiles.items():
        for step, prof in steps.items():
            lines += ["", f"## Where an fp32 {step}'s CPU time goes: {name}", "",
                      ", ".join(f"{k} {100 * v:.0f} %" for k, v in prof["split"].items()), "", "| operator | self CPU time |",
                      "|---|---|", *[f"| {k} | {100 * v:.1f} % |" for k, v in prof["top"]]]
    (args.out / "step_bench.md").write_text("\n".join(lines) + "\n")
    (args.out / "step_bench.json").write_text(json.dumps({"machine": machine, "command": command, "rows": rows,
                                                          "peaks": {f"{t} {p}": g for (t, p), (g, _) in peaks.items()},
                                                          "peak_sizes": {f"{t} {p}": n for (t, p), (_, n) in peaks.items()},
                                                          "profiles": profiles}, indent=1))
    print(f"wrote {args.out / 'step_bench.md'} and {args.out / 'step_bench.json'}")


if __name__ == "__main__":
    from models.precision import flush_denormals
    flush_denormals()  # as train.py and sample.py run
    main()
