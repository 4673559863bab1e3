"""The training loop's parts that are not the loop: the batch schedule, prefetching, the learning-rate schedule,
gradient clipping, EMA, FLOP counting and the run directory. train.py reads top to bottom over these.

Everything a step sees is a function of (seed, step): its batch, its noise, its self-conditioning coin. So a resumed
run sees exactly the batches and noise it would have seen, and DDP ranks slice one global batch.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import queue
import sys
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from models.fileio import Busy, ExclusiveLock, remove_stale_temporaries


def hardware_description(device: torch.device, world: int) -> str:
    """What trains a run, in words: the processor (the GPU on CUDA), the processes and each one's threads, and the
    torch version. A run's speeds (its log's molecules/s, a sweep's tables) mean nothing without it, and a resumed run
    may go on elsewhere, so the checkpoint keeps every description it was trained under."""
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    else:
        processor = platform.processor() or platform.machine()
        try:  # Linux names the model; platform.processor() there is only the architecture
            processor = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                             if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        processor += f" ({os.cpu_count()} cores)"
    return f"{processor}; {world} process(es) x {torch.get_num_threads()} thread(s); torch {torch.__version__}"


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of a step's noise (salt: another stream at the same step, e.g. validation)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 7 + salt)


class BatchSchedule:
    """The global batch of every step, from (seed, step) alone.

    random: a fresh seeded permutation each epoch, cut into consecutive batches (a batch may span two epochs).
    size (atom_counts [S] given): the epoch's permutation is cut into pools of 32 batches; each pool is sorted by
    structure size and cut into batches, and the batches of the epoch are shuffled. Batches hold similar sizes yet
    stay random; the structures left over by the last whole batch sit this epoch out (another set each epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, atom_counts: torch.Tensor | None = None):
        self.n, self.batch_size, self.seed, self.atom_counts = n, batch_size, seed, atom_counts

    @functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
    def permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    @functools.lru_cache(maxsize=2)
    def size_grouped(self, epoch: int) -> torch.Tensor:
        """The epoch's batches [n // batch_size, batch_size]."""
        perm = self.permutation(epoch)
        n_batches, pool = len(perm) // self.batch_size, 32 * self.batch_size
        perm = perm[: n_batches * self.batch_size]
        grouped = torch.cat([p[torch.argsort(self.atom_counts[p], stable=True)] for p in perm.split(pool)])
        order = torch.randperm(n_batches, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch + 50_000))
        return grouped.view(n_batches, self.batch_size)[order]

    def indices(self, step: int) -> torch.Tensor:
        if self.atom_counts is not None:
            n_batches = self.n // self.batch_size
            return self.size_grouped(step // n_batches)[step % n_batches]
        positions = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs, within = positions // self.n, positions % self.n
        return torch.stack([self.permutation(int(e))[i] for e, i in zip(epochs, within)])

    def width(self, idx: torch.Tensor) -> int | None:
        """The padded width of the batch idx under size batching (its largest structure); None otherwise."""
        return int(self.atom_counts[idx].max()) if self.atom_counts is not None else None

    def epoch_widths(self) -> torch.Tensor:
        """The padded width of each of the first epoch's size-grouped batches."""
        return self.atom_counts[self.size_grouped(0)].max(1).values

    def width_counts(self) -> list[tuple[int | None, int]]:
        """[(padded width, how many of the first epoch's batches have it)]: what a step's FLOPs are averaged over
        (one (None, 1): every batch is padded alike)."""
        if self.atom_counts is None:
            return [(None, 1)]
        widths, n_batches = self.epoch_widths().unique(return_counts=True)
        return [(int(w), int(n)) for w, n in zip(widths, n_batches)]


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


def cosine_schedule(warmup: int, iters: int, min_lr_ratio: float):
    """The learning-rate factor of a step: linear warm-up, then cosine decay to min_lr_ratio at `iters`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, iters - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    decay = min(decay, (1 + step) / (10 + step))  # short memory early on, when weights move fast
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - decay)


def train_step_flops(model, objective, inputs, widths: list[tuple[int | None, int]], autocast, world: int) -> float:
    """FLOPs of one global training step (forward and backward of the loss, times the ranks), counted by torch's
    FlopCounterMode: matrix products and convolutions, not elementwise work, the convention of scaling-law papers.
    Kernels outside torch (Triton on CUDA) are not seen. The dense backbones cost the same for every batch of one
    padded width, so this is the mean over `widths` [(width, how many batches have it)], each counted once (None:
    a step's own padding); inputs(width) -> (batch, noise). Self-conditioning adds a no-gradient pass on half the
    batches: both kinds of step are counted. Weights, gradients and the RNG are left as they were, so resuming
    stays exact."""
    from torch.utils.flop_counter import FlopCounterMode

    def count(width: int | None) -> float:
        batch, noise = inputs(width)
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
    flops = sum(n * count(w) for w, n in widths) / sum(n for _, n in widths)
    torch.set_rng_state(rng)
    return flops


class RunDirectory:
    """One run's directory: a lock held until exit (a second train.py on it is refused, naming the first), its
    files, and its logs (train.log, and log.jsonl one JSON record a line). Only the master process writes."""

    FILES = ("ckpt.pt", "ckpt.prev.pt", "config.json", "log.jsonl", "train.log")

    def __init__(self, path: Path, master: bool):
        self.path, self.master = Path(path), master
        try:
            self.lock = ExclusiveLock(self.path / "train", what=f"the run directory {self.path}") if master else None
        except Busy as e:
            raise SystemExit(str(e))
        self.ckpt, self.prev_ckpt = self.path / "ckpt.pt", self.path / "ckpt.prev.pt"
        self.log_file, self.wandb = None, None

    def last_checkpoint(self, load) -> tuple[dict, Path]:
        """(checkpoint, its path) to resume: ckpt.pt, or ckpt.prev.pt where the last one cannot be loaded (it is kept
        beside it for exactly this). load(path) raises models.checkpoint.CheckpointError."""
        from models.checkpoint import CheckpointError

        try:
            return load(self.ckpt), self.ckpt
        except CheckpointError as e:
            if not self.prev_ckpt.exists():
                raise SystemExit(f"cannot resume: {e}")
            try:
                ckpt = load(self.prev_ckpt)
            except CheckpointError as e_prev:
                raise SystemExit(f"cannot resume: {e}; and {e_prev}")
            print(f"warning: {e}; resuming from the previous checkpoint {self.prev_ckpt}", file=sys.stderr)
            return ckpt, self.prev_ckpt

    def holds_a_run(self) -> str | None:
        """What an earlier run left, or None. A run that stopped before its first step (bad data, say) leaves only
        train.log: the next attempt appends to it."""
        if not any((self.path / name).exists() for name in self.FILES if name != "train.log"):
            return None
        return "a checkpoint (ckpt.pt)" if self.ckpt.exists() or self.prev_ckpt.exists() else "the logs of an earlier run"

    def open(self, overwrite: bool, log_bytes: dict | None) -> None:
        """Delete the old run's files (overwrite), or cut the logs back to a resumed checkpoint's sizes (lines logged
        after it would appear twice); remove what a killed checkpoint write left; open train.log."""
        if not self.master:
            return
        if overwrite:
            for name in self.FILES:
                (self.path / name).unlink(missing_ok=True)
        for p in (self.ckpt, self.prev_ckpt, self.path / "config.json"):
            remove_stale_temporaries(p)
        for name, size in (log_bytes or {}).items():
            if (self.path / name).exists() and (self.path / name).stat().st_size > size:
                os.truncate(self.path / name, size)
        self.log_file = open(self.path / "train.log", "a")

    def log_sizes(self) -> dict:
        """The logs' sizes now (a checkpoint keeps them: a resumed run cuts its logs back to them)."""
        self.log_file.flush()
        return {name: (self.path / name).stat().st_size for name in ("train.log", "log.jsonl") if (self.path / name).exists()}

    def log(self, line: str) -> None:
        if self.master:
            tqdm.write(line)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def log_json(self, record: dict) -> None:
        if self.master:
            with open(self.path / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb is not None:
                self.wandb.log(record, step=record["step"])
