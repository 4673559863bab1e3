"""Sampling structures from a checkpoint alone: sample.py and label.py --generate both call this."""
from __future__ import annotations

import sys

import ase
import torch
from tqdm import tqdm

from models.checkpoint import build_model
from models.domains import domain_of
from models.precision import backbone_autocast


def sample_structures(ckpt: dict, n: int, n_steps: int, method: str, batch_size: int, seed: int, device: torch.device,
                      weights: str = "ema", by_size: bool = False, compositions=None, n_per_composition: int = 1,
                      truth_rows: list[int] | None = None, precision: str = "auto", condition: dict | None = None,
                      guidance: float = 1.0, compiled: bool = False, **options) -> tuple[list[ase.Atoms], int]:
    """Molecules or crystals from a loaded checkpoint, in batches, with a progress bar: (the structures with finite
    coordinates (and cell), how many were dropped for NaN / Inf).

    De novo: n structures, sizes drawn from the training histogram; info['sample_index'] is each one's index among
    the n drawn, so dropped ones leave a visible gap. Structure prediction (a crystal --csp checkpoint):
    n_per_composition samples for each crystal of `compositions` (a models.crystals.CrystalSet), with
    info['truth_id'] (its material_id), info['truth_index'] (its row in the split: truth_rows[i] when the
    compositions are a part of it) and info['sample_index'] (0..n_per_composition-1). Either way the structures come
    in that order. by_size: batches of the jobs in increasing size, each padded only to its largest structure rather
    than to about the largest of all (1.4 x the molecules/s on QM9, models/EXPERIMENTS.md; other noise, the same
    distribution). precision: the backbone's autocast (models/precision.py). condition, guidance: a conditional
    checkpoint's request ({property: value}; None: the protocol's draw) and classifier-free guidance weight
    (models/condition.py), the requested values in info['condition_<property>']. compiled: run the backbone through
    torch.compile (the atom and batch axes symbolic, so the batches' sizes compile once). options: the process's sampler
    options (process.OPTIONS: time_power, anneal_slope). A request the checkpoint cannot take raises ValueError."""
    domain = domain_of(ckpt)
    model, process = build_model(ckpt, weights=weights)
    model.to(device).eval()
    step_model = torch.compile(model, dynamic=True) if compiled else model
    process.check_sampling(method, options)
    generator = torch.Generator().manual_seed(seed)
    plan = domain.sampling_plan(ckpt, n, generator, compositions, n_per_composition, condition, guidance)
    jobs = plan.jobs
    order = torch.argsort(plan.sizes, stable=True).tolist() if by_size else list(range(len(jobs)))
    autocast = backbone_autocast(device, precision, domain.arch_class(ckpt["arch"]))
    structures, n_bad = [], 0  # structures: (job index, structure), put back in job order at the end
    unit = "mol" if domain.kind == "molecules" else " crystals"
    with tqdm(total=len(jobs), unit=unit, desc="sampling", mininterval=0.1 if sys.stderr.isatty() else 10) as bar:
        for lo in range(0, len(jobs), batch_size):
            batch_jobs = order[lo:lo + batch_size]
            rows = torch.tensor([jobs[j][0] for j in batch_jobs])
            with autocast:
                out = process.sample(step_model, plan.request(rows, by_size), n_steps, method, generator=generator, **options)
            for j, atoms in zip(batch_jobs, domain.structures(out, ckpt)):
                if atoms is None:
                    n_bad += 1
                    continue
                domain.label(atoms, jobs[j], compositions, truth_rows)
                atoms.info.update({key: values[jobs[j][0]] for key, values in plan.info.items()})
                structures.append((j, atoms))
            bar.update(len(rows))
    return [atoms for _, atoms in sorted(structures, key=lambda pair: pair[0])], n_bad
