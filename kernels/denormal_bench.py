"""What denormal floats cost a trained model's step on this CPU, and what flushing them to zero gives back.

    python kernels/denormal_bench.py out/oracle/qm9_all/ckpt.pt models/pretrained/qm9_gnn_flow.pt
    python kernels/denormal_bench.py out/ff/weights.pt --repeats 7          # a student: energy and forces

An x86 core handles an arithmetic operand below float32's smallest normal number (1.2e-38) in microcode, at some 100
cycles. Freshly initialised networks make few such values, trained ones can make many (gates that saturate, radial
bases exp(-gamma d^2) that underflow, and their gradients), so kernels/step_bench.py, which times young models, does
not see them. This times one step of each checkpoint on one thread, alternately with denormals kept and flushed to
zero (torch.set_flush_denormal, which the scripts turn on at startup: models/precision.py), on the same QM9 batch:
  - a generator or property oracle (train.py --task gen | oracle on QM9): forward and backward of its training loss
    on --batch molecules of the training split (size-grouped as train.py takes them, real properties as conditions);
  - a student force field (--task ff): energy and forces of --batch QM9 validation molecules, one flat batch.
Reports the median time of --repeats alternating pairs and the ratio. Run it on idle cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere


def generator_or_oracle_step(ckpt: dict, batch_size: int, seed: int, data_dir: str | None):
    """A closure timing one forward + backward of the checkpoint's training loss on a fixed QM9 batch."""
    from models.condition import Normalisation
    from models.molecules import PaddedMolecules, load_qm9
    from models.tasks import TASKS
    from models.training import step_generator

    if ckpt.get("domain", "molecules") != "molecules" or ckpt.get("data", "qm9") != "qm9":
        raise SystemExit(f"denormal_bench.py: {ckpt.get('data')}: only QM9 checkpoints are timed here")
    model, objective = TASKS[ckpt["task"]].from_checkpoint(ckpt, "ema")
    model.train()
    mols = load_qm9("train", data_dir)
    order = torch.randperm(len(mols), generator=torch.Generator().manual_seed(seed))
    # size-grouped as train.py's batches: molecules of similar size, padded to the largest of them
    pool = order[:batch_size * 16]
    pool = pool[torch.argsort(torch.from_numpy(mols.n_atoms)[pool], stable=True)]
    start = max(0, (len(pool) - batch_size) // 2)
    idx = pool[start:start + batch_size]
    condition = None
    if ckpt.get("condition"):
        norm = Normalisation.from_state(ckpt["condition"])
        condition = norm.normalise(np.stack([mols.property_values(name) for name in norm.names], axis=1))
    data = PaddedMolecules(mols, condition=condition)
    width = int(data.mask[idx].sum(1).max())
    batch = data.batch(idx, width=width)
    noise = objective.draw_noise(len(idx), width, step_generator(seed, 1))

    def step():
        model.zero_grad(set_to_none=True)
        objective.loss(model, batch, noise).backward()
    return step, f"{ckpt['task']} step, {len(idx)} molecules of up to {width} atoms"


def student_step(path: Path, batch_size: int, data_dir: str | None):
    from models.checkpoint import load_student
    from models.forcefield import flat_batch
    from models.molecules import load_qm9

    model, _ = load_student(path)
    mols = load_qm9("valid", data_dir)
    inputs = flat_batch([mols.to_atoms(i) for i in range(min(batch_size, len(mols)))], dtype=next(model.parameters()).dtype)

    def step():
        model(*inputs)
    return step, f"student energy and forces, {len(inputs[2].unique())} molecules in one batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpts", nargs="+", type=Path, help="train.py checkpoints or weights files (--task gen or "
                        "oracle on QM9, or --task ff)")
    parser.add_argument("--batch", type=int, default=64, help="molecules per step")
    parser.add_argument("--repeats", type=int, default=5, help="alternating (kept, flushed) pairs timed; the median counts")
    parser.add_argument("--seed", type=int, default=0, help="which molecules and noise")
    parser.add_argument("--data-dir", default=None, help="data directory (default ./data or $MOLGEN_DATA)")
    args = parser.parse_args()
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats take integers > 0")
    torch.set_num_threads(1)
    from models.checkpoint import CheckpointError, load_checkpoint

    print(f"one thread, torch {torch.__version__}; median of {args.repeats} alternating pairs")
    print("| checkpoint | what is timed | denormals kept (ms) | flushed (ms) | ratio |")
    print("|---|---|---|---|---|")
    for path in args.ckpts:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
            task = raw.get("task", "gen") if isinstance(raw, dict) else "gen"
            if task == "ff":
                step, what = student_step(path, args.batch, args.data_dir)
            else:
                step, what = generator_or_oracle_step(load_checkpoint(path, task=task), args.batch, args.seed, args.data_dir)
        except (CheckpointError, OSError) as e:
            raise SystemExit(f"denormal_bench.py: {path}: {e}")
        times = {False: [], True: []}
        for flush in (False, True):  # one untimed step each: allocator and caches warm
            torch.set_flush_denormal(flush)
            step()
        for _ in range(args.repeats):
            for flush in (False, True):
                torch.set_flush_denormal(flush)
                t = time.perf_counter()
                step()
                times[flush].append(time.perf_counter() - t)
        kept, flushed = (statistics.median(times[f]) * 1e3 for f in (False, True))
        print(f"| `{path}` | {what} | {kept:.0f} | {flushed:.0f} | {kept / flushed:.2f} x |")
    torch.set_flush_denormal(True)


if __name__ == "__main__":
    main()
