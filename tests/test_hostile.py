"""Hostile but realistic use of train.py, sample.py, evaluate.py and label.py: the generic table (flags, outputs, disks,
damaged checkpoints and samples). The runner and its conventions are in tests/hostile.py; kills are in
test_crash_safety.py."""
import json

import numpy as np
import pytest
import torch

from conftest import run_script
from hostile import ROOT, TINY, hostile_table
from models.checkpoint import load_checkpoint

# (id, command (placeholders: {w} the prepared world, {data} the QM9 fixture cache dir), exit status, words that the
#  message must contain, mount over {w}/mnt or None)
CASES = [
    # -- a trained run is never overwritten by accident; resume refuses a different run
    ("train: existing run without --resume", "train.py {tiny} --data-dir {data} --out {w}/run", 1, ["holds a checkpoint", "--resume", "--overwrite"], None),
    ("train: --resume with another --lr", "train.py {tiny} --data-dir {data} --out {w}/run --resume --lr 0.1", 1, ["--lr 0.1 (checkpoint: 0.002)", "--override"], None),
    ("train: --resume with another --iters", "train.py {tiny} --data-dir {data} --out {w}/run --resume --iters 9", 1, ["--iters 9 (checkpoint: 4)", "--override"], None),
    ("train: --resume with another --seed", "train.py {tiny} --data-dir {data} --out {w}/run --resume --seed 3", 1, ["--seed 3 (checkpoint: 0)"], None),
    ("train: --resume with another width", "train.py {tiny} --data-dir {data} --out {w}/run --resume --hidden 48", 1, ["--hidden 48 (checkpoint: 32)", "cannot change"], None),
    ("train: --resume with another arch", "train.py {tiny} --data-dir {data} --out {w}/run --resume --arch transformer", 1, ["--arch gnn, not --arch transformer"], None),
    ("train: --resume and --overwrite", "train.py {tiny} --data-dir {data} --out {w}/run --resume --overwrite", 2, ["give one of them"], None),
    ("train: --override without --resume", "train.py {tiny} --data-dir {data} --out {w}/new --override", 2, ["--override applies to --resume only"], None),
    ("train: --resume without a checkpoint", "train.py {tiny} --data-dir {data} --out {w}/empty --resume", 1, ["cannot resume", "no such checkpoint"], None),
    ("train: --resume from a garbage checkpoint", "train.py {tiny} --data-dir {data} --out {w}/garbage_run --resume", 1, ["ckpt.pt: not a readable"], None),
    ("train: --resume from a checkpoint without optimiser", "train.py {tiny} --data-dir {data} --out {w}/noopt_run --resume", 1, ["entries ['optimizer'] are missing"], None),
    # -- NaN / Inf
    ("train: --lr 1e6 diverges", "train.py {tiny} --iters 30 --ckpt-every 100 --data-dir {data} --out {w}/diverge --lr 1e6", 1, ["training diverged", "in a row", "--lr"], None),
    ("sample: checkpoint with NaN weights", "sample.py --ckpt {w}/nan.pt --n 2 --out {w}/s", 1, ["nan.pt", "non-finite", "ema weights"], None),
    ("evaluate: a NaN structure is counted", "evaluate.py {w}/nan/samples.extxyz --data-dir {data} --no-fcd --no-progress", 0, ["1 of 3 structures have non-finite"], None),
    # -- numeric flags, checked when parsed
    ("train: --iters 0", "train.py {tiny} --iters 0 --out {w}/x", 2, ["--iters", "integer > 0", "'0'"], None),
    ("train: --batch-size -4", "train.py {tiny} --batch-size -4 --out {w}/x", 2, ["--batch-size", "integer > 0"], None),
    ("train: --lr nan", "train.py {tiny} --lr nan --out {w}/x", 2, ["--lr", "finite number > 0"], None),
    ("train: --lr inf", "train.py {tiny} --lr inf --out {w}/x", 2, ["--lr", "finite number > 0"], None),
    ("train: --ckpt-every 0", "train.py {tiny} --ckpt-every 0 --out {w}/x", 2, ["--ckpt-every", "integer > 0"], None),
    ("train: --log-every 0", "train.py {tiny} --log-every 0 --out {w}/x", 2, ["--log-every", "integer > 0"], None),
    ("train: --n-train 0", "train.py {tiny} --n-train 0 --out {w}/x", 2, ["--n-train", "integer > 0"], None),
    ("train: --hidden 0", "train.py {tiny} --hidden 0 --out {w}/x", 2, ["--hidden", "integer > 0"], None),
    ("train: --warmup -1", "train.py {tiny} --warmup -1 --out {w}/x", 2, ["--warmup", "integer >= 0"], None),
    ("train: --ema-decay 1.5", "train.py {tiny} --ema-decay 1.5 --out {w}/x", 2, ["--ema-decay", "[0, 1)"], None),
    ("train: --grad-clip -1", "train.py {tiny} --grad-clip -1 --out {w}/x", 2, ["--grad-clip", ">= 0"], None),
    ("train: --stop-after 0", "train.py {tiny} --stop-after 0 --out {w}/x", 2, ["--stop-after", "integer > 0"], None),
    ("train: --iters ten", "train.py {tiny} --iters ten --out {w}/x", 2, ["--iters", "'ten'"], None),
    ("sample: --n 0", "sample.py --ckpt {w}/run/ckpt.pt --n 0", 2, ["--n", "integer > 0"], None),
    ("sample: --steps -1", "sample.py --ckpt {w}/run/ckpt.pt --steps -1", 2, ["--steps", "integer > 0"], None),
    ("sample: --batch-size 0", "sample.py --ckpt {w}/run/ckpt.pt --batch-size 0", 2, ["--batch-size", "integer > 0"], None),
    ("label: --limit -5", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --limit -5", 2, ["--limit", "integer >= 0"], None),
    ("label: --block 0", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --block 0", 2, ["--block", "integer > 0"], None),
    ("label: --commit-seconds -1", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --commit-seconds -1", 2, ["--commit-seconds", ">= 0"], None),
    ("label: --n-generate 0", "label.py --generate {w}/run/ckpt.pt --n-generate 0 --teacher emt --out {w}/l.h5", 2, ["--n-generate", "integer > 0"], None),
    ("label: --min-success 2", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --min-success 2", 2, ["--min-success", "[0, 1]"], None),
    ("label perturb: --scale LOW above HIGH", "label.py perturb {w}/m.xyz --scale 0.9 0.8 --out {w}/p.extxyz", 2,
     ["--scale 0.9 0.8", "LOW must not exceed HIGH"], None),
    ("label perturb: --copies 0", "label.py perturb {w}/m.xyz --copies 0 --out {w}/p.extxyz", 2, ["--copies", "integer > 0"], None),
    ("label perturb: an unreadable input", "label.py perturb {w}/garbage.extxyz --out {w}/p.extxyz", 1,
     ["garbage.extxyz", "record 0", "cannot parse extxyz", "every input structure must be readable"], None),
    ("label perturb: a NaN coordinate", "label.py perturb {w}/nan/samples.extxyz --out {w}/p.extxyz", 1,
     ["samples.extxyz:1", "non-finite coordinates"], None),
    ("label: --shard 3/2", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --shard 3/2", 2, ["--shard 3/2", "0 <= I < N"], None),
    ("label bench: --n 0", "label.py bench {w}/m.xyz --teachers emt --n 0", 2, ["--n", "integer > 0"], None),
    ("evaluate: --n-ref -1", "evaluate.py {w}/nan/samples.extxyz --n-ref -1", 2, ["--n-ref", "integer >= 0"], None),
    ("evaluate: --coverage-threshold 1.5", "evaluate.py {w}/nan/samples.extxyz --coverage-threshold 1.5", 2, ["--coverage-threshold", "[0, 1]"], None),
    ("train: a CDVAE CSV that is not UTF-8", "train.py {tiny} --data perov5 --train-split val --data-dir {w}/latin1 --out {w}/latin1_run", 1, ["val.csv, line 3", "not UTF-8"], None),
    ("train: a CDVAE split that is a directory", "train.py {tiny} --data perov5 --train-split val --data-dir {w}/dirsplit --out {w}/dirsplit_run", 1, ["val.csv", "not a file"], None),
    ("evaluate: crystal samples with --data qm9", "evaluate.py {w}/crystal.extxyz --data qm9", 1, ["crystal.extxyz: structure 1 (line 1) is periodic", "--data perov5"], None),
    ("evaluate: --stable-threshold nan", "evaluate.py {w}/nan/samples.extxyz --data perov5 --stability --stable-threshold nan", 2, ["--stable-threshold", "finite number >= 0"], None),
    # -- devices and output paths
    ("train: --device cuda without a GPU", "train.py {tiny} --device cuda --out {w}/x", 2, ["--device cuda", "no CUDA GPU"], "no-gpu"),
    ("train: --device tpu", "train.py {tiny} --device tpu --out {w}/x", 2, ["--device tpu"], None),
    ("sample: --device cuda without a GPU", "sample.py --ckpt {w}/run/ckpt.pt --device cuda", 2, ["--device cuda", "no CUDA GPU"], "no-gpu"),
    ("label: --device cuda without a GPU", "label.py {w}/m.xyz --teacher emt --out {w}/l.h5 --device cuda", 2, ["--device cuda", "no CUDA GPU"], "no-gpu"),
    ("train: --out is a file", "train.py {tiny} --out {w}/afile", 2, ["--out", "afile is a file"], None),
    ("sample: --out is a file", "sample.py --ckpt {w}/run/ckpt.pt --out {w}/afile", 2, ["--out", "afile is a file"], None),
    ("label: --out is a directory", "label.py {w}/m.xyz --teacher emt --out {w}/run", 2, ["--out", "is a directory"], None),
    ("label: --out inside a file", "label.py {w}/m.xyz --teacher emt --out {w}/afile/l.h5", 2, ["afile is a file"], None),
    ("evaluate: --json is a directory", "evaluate.py {w}/nan/samples.extxyz --json {w}/run", 2, ["--json", "is a directory"], None),
    ("label report: --json is a directory", "label.py report {w}/good.h5 --json {w}/run", 2, ["--json", "is a directory"], None),
    ("train: read-only --out", "train.py {tiny} --data-dir {data} --out {w}/mnt/run", 2, ["--out", "mnt/run", "not writable"], "read-only"),
    ("sample: read-only --out", "sample.py --ckpt {w}/run/ckpt.pt --n 2 --out {w}/mnt", 2, ["--out", "not writable"], "read-only"),
    ("label: read-only --out", "label.py {w}/m.xyz --teacher emt --out {w}/mnt/l.h5", 2, ["--out's directory", "not writable"], "read-only"),
    ("evaluate: read-only --json", "evaluate.py {w}/nan/samples.extxyz --json {w}/mnt/m.json", 2, ["--json's directory", "not writable"], "read-only"),
    ("train: --data-dir is a file", "train.py {tiny} --data-dir {w}/afile --out {w}/x3", 1, ["afile is a file"], None),
    ("train: read-only data dir, cache missing", "train.py {tiny} --data-dir {w}/mnt --out {w}/x1", 1, ["QM9 cache directory", "not writable", "--data-dir"], "read-only"),
    # -- a full disk
    ("train: disk full at the checkpoint", "train.py {tiny} --data-dir {data} --out {w}/mnt", 1, ["no space left", "ckpt.pt", "--resume"], "full"),
    ("label: disk full", "label.py {w}/m.xyz --teacher emt --out {w}/mnt/l.h5", 1, ["no space left", "l.h5"], "full"),
    ("sample: disk full", "sample.py --ckpt {w}/run/ckpt.pt --n 400 --steps 1 --out {w}/mnt", 1, ["no space left", "samples"], "full"),
    # -- corrupt caches and inputs
    ("train: garbage qm9.npz that cannot be rebuilt there", "train.py {tiny} --data-dir {w}/mnt --out {w}/x2", 1, ["qm9.npz", "unreadable QM9 cache", "not writable"], "read-only, garbage qm9.npz"),
    ("label: qm9:test over an unusable cache", "label.py qm9:test --teacher emt --out {w}/q1.h5", 1, ["qm9:test", "cannot load QM9", "qm9.npz"], "read-only, garbage qm9.npz"),
    ("label: unknown QM9 split", "label.py qm9:bogus --teacher emt --out {w}/q2.h5", 1, ["unknown QM9 split 'bogus'"], None),
    ("label: missing input file", "label.py {w}/missing.xyz --teacher emt --out {w}/l.h5", 2, ["missing.xyz", "no such file"], None),
    ("evaluate: missing samples file", "evaluate.py {w}/missing.extxyz", 2, ["missing.extxyz", "no such file"], None),
    ("evaluate: garbage samples", "evaluate.py {w}/garbage.extxyz --data-dir {data} --no-fcd", 1, ["garbage.extxyz", "structure 1", "not valid extended XYZ"], None),
    ("evaluate: empty samples", "evaluate.py {w}/empty.extxyz --data-dir {data} --no-fcd", 1, ["empty.extxyz", "no structures"], None),
    # -- checkpoints
    ("sample: checkpoint without EMA weights", "sample.py --ckpt {w}/noema.pt --n 2 --out {w}/s", 1, ["noema.pt", "entries ['ema'] are missing"], None),
    ("sample: weights that do not fit the config", "sample.py --ckpt {w}/misfit.pt --n 2 --out {w}/s", 1, ["misfit.pt", "weights do not fit"], None),
    ("sample: garbage checkpoint", "sample.py --ckpt {w}/garbage.pt --n 2 --out {w}/s", 1, ["garbage.pt", "not a readable"], None),
    ("sample: missing checkpoint", "sample.py --ckpt {w}/missing.pt --n 2 --out {w}/s", 1, ["missing.pt", "no such checkpoint"], None),
    ("label: --generate with a garbage checkpoint", "label.py --generate {w}/garbage.pt --n-generate 2 --teacher emt --out {w}/g1/l.h5", 1, ["--generate", "garbage.pt", "not a readable"], None),
    ("label: --generate with NaN weights", "label.py --generate {w}/nan.pt --n-generate 2 --teacher emt --out {w}/g2/l.h5", 1, ["--generate", "non-finite"], None),
    ("label: --generate with a missing checkpoint", "label.py --generate {w}/missing.pt --teacher emt --out {w}/g/l.h5", 2, ["--generate", "missing.pt", "no such checkpoint"], None),
    # -- labels files
    ("label report: garbage file", "label.py report {w}/garbage.h5", 1, ["garbage.h5", "not a readable HDF5 labels file"], None),
    ("label report: missing file", "label.py report {w}/missing.h5", 1, ["missing.h5", "no such labels file"], None),
    ("label report: HDF5 of something else", "label.py report {w}/other.h5", 1, ["other.h5", "not a labels file"], None),
    ("label merge: garbage shard", "label.py merge {w}/good.h5 {w}/garbage.h5 --out {w}/merged.h5", 1, ["garbage.h5", "not a readable"], None),
    ("label merge: into one of its inputs", "label.py merge {w}/good.h5 --out {w}/good.h5", 2, ["--out", "also one of the files"], None),
    ("label: another teacher's file", "label.py {w}/m.xyz --teacher xtb --out {w}/good.h5", 1, ["good.h5", "'emt'", "not 'xtb'"], None),
    ("label: another teacher version", "label.py {w}/m.xyz --teacher emt --out {w}/oldversion.h5", 1, ["oldversion.h5", "ase 0.0", "--mixed-versions"], None),
    ("label merge: two teacher versions", "label.py merge {w}/good.h5 {w}/oldversion.h5 --out {w}/mixed.h5", 1, ["different teacher versions", "--mixed-versions"], None),
    # -- conditional generation (a conditional checkpoint's own refusals: tests/test_condition.py)
    ("train: --condition of an unknown property", "train.py {tiny} --condition alpha beta --out {w}/x", 2, ["--condition beta", "qm9 is conditioned on alpha, gap, homo, lumo, mu, Cv"], None),
    ("train: --condition of a QM9 property for crystals", "train.py {tiny} --data perov5 --condition alpha --out {w}/x", 2, ["--condition alpha", "perov5 is conditioned on heat_ref"], None),
    ("train: --condition on one training molecule", "train.py {tiny} --condition alpha --n-train 1 --batching random --batch-size 1 --data-dir {data} --out {w}/one", 1, ["['alpha'] have one value in all 1 training structures"], None),
    ("train: --task oracle on one training molecule", "train.py {tiny} --task oracle --condition mu --n-train 1 --batching random --batch-size 1 --data-dir {data} --out {w}/one_oracle", 1, ["['mu'] have one value in all 1 training structures"], None),
    ("train: --condition with --csp", "train.py {tiny} --data carbon24 --csp --condition energy_per_atom --out {w}/x", 2, ["--condition applies to de novo generation"], None),
    ("train: --condition-dropout without --condition", "train.py {tiny} --condition-dropout 0.2 --out {w}/x", 2, ["--condition-dropout applies to --condition"], None),
    ("train: --resume of an unconditional run with --condition", "train.py {tiny} --data-dir {data} --out {w}/run --resume --condition alpha", 1, ["--condition ['alpha'] (checkpoint: None)", "cannot change"], None),
    ("sample: --condition for an unconditional checkpoint", "sample.py --ckpt {w}/run/ckpt.pt --n 2 --condition alpha=80 --out {w}/sc", 1, ["run/ckpt.pt was trained without train.py --condition", "no --condition"], None),
    ("sample: --guidance for an unconditional checkpoint", "sample.py --ckpt {w}/run/ckpt.pt --n 2 --guidance 2 --out {w}/sc", 1, ["no --guidance"], None),
    ("sample: --condition without a number", "sample.py --ckpt {w}/run/ckpt.pt --condition alpha=big", 2, ["--condition", "PROP=VALUE", "'alpha=big'"], None),
    ("sample: --guidance -1", "sample.py --ckpt {w}/run/ckpt.pt --guidance -1", 2, ["--guidance", "finite number >= 0"], None),
    ("train: --student for a generative model", "train.py {tiny} --student painn --out {w}/x", 2, ["--student", "options of --task ff"], None),
    ("train: --task oracle without --condition", "train.py {tiny} --task oracle --out {w}/x", 2, ["--task oracle needs --condition PROP"], None),
    ("train: --task oracle with --arch", "train.py {tiny} --task oracle --condition mu --arch transformer --out {w}/x", 2, ["--arch", "not options of --task oracle"], None),
    ("train: --task oracle of a property its data set has not", "train.py {tiny} --task oracle --condition mu --data perov5 --out {w}/x", 2, ["--condition mu", "perov5 has heat_ref"], None),
    ("evaluate: --oracle that is a generative model", "evaluate.py {w}/nan/samples.extxyz --data-dir {data} --no-fcd --no-progress --oracle {w}/run/ckpt.pt", 1, ["run/ckpt.pt is a generative model", "not a property oracle"], None),
    ("evaluate: --condition without --oracle", "evaluate.py {w}/nan/samples.extxyz --condition alpha", 2, ["--condition names the properties --oracle scores"], None),
    ("evaluate: --oracle with --reference", "evaluate.py --reference qm9 --oracle {w}/run/ckpt.pt", 2, ["--oracle scores the structures a conditional checkpoint sampled"], None),
    ("evaluate: a missing --oracle", "evaluate.py {w}/nan/samples.extxyz --oracle {w}/missing.pt", 2, ["--oracle", "missing.pt: no such checkpoint file"], None),
]


@pytest.fixture(scope="module")
def world(qm9_dir, tmp_path_factory):
    """Files the cases act on: a trained tiny run, damaged checkpoints, samples with a NaN, labels files."""
    from models.checkpoint import save_checkpoint
    from models.labels import LabelWriter

    w = tmp_path_factory.mktemp("world")
    run_script("train.py", *TINY, "--data-dir", qm9_dir, "--out", w / "run")
    ckpt = load_checkpoint(w / "run" / "ckpt.pt")
    ckpt.pop("format")
    save_checkpoint(w / "nan.pt", {**ckpt, "ema": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                                   for k, v in ckpt["ema"].items()}})
    save_checkpoint(w / "misfit.pt", {**ckpt, "model_config": {**ckpt["model_config"], "hidden": 48}})
    save_checkpoint(w / "noema.pt", {k: v for k, v in ckpt.items() if k != "ema"})
    save_checkpoint(w / "noopt_run" / "ckpt.pt", {k: v for k, v in ckpt.items() if k != "optimizer"})
    (w / "garbage_run").mkdir()
    for name in ("garbage.pt", "garbage_run/ckpt.pt", "garbage.h5"):
        (w / name).write_bytes(b"\x00\x01 this is not what it claims to be \xff")
    (w / "garbage.extxyz").write_text("this is not\nan extended XYZ file\n")
    (w / "empty.extxyz").write_text("")
    (w / "afile").write_text("a file, not a directory")
    (w / "empty").mkdir()
    (w / "mnt").mkdir()
    (w / "m.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.74\n")
    perov = (ROOT / "tests" / "data" / "perov5_val_sample.csv").read_bytes().split(b"\n")
    (w / "latin1" / "cdvae" / "perov_5").mkdir(parents=True)  # a material_id with a Latin-1 byte on line 3
    (w / "latin1" / "cdvae" / "perov_5" / "val.csv").write_bytes(b"\n".join(perov[:2] + [perov[2] + b" caf\xe9"] + perov[3:]))
    (w / "dirsplit" / "cdvae" / "perov_5" / "val.csv").mkdir(parents=True)
    (w / "crystal.extxyz").write_text('2\nLattice="3 0 0 0 3 0 0 0 3" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
                                      'Na 0 0 0\nCl 1.5 1.5 1.5\n')
    (w / "nan").mkdir()
    (w / "nan" / "samples.extxyz").write_text("3\nProperties=species:S:1:pos:R:3\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n"
                                               "2\nProperties=species:S:1:pos:R:3\nH nan 0 0\nH 0 0 0.74\n"
                                               "2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.74\n")
    row = dict(numbers=[1, 1], positions=[[0, 0, 0], [0, 0, 0.74]], forces=np.zeros((2, 3)), energy=1.0, stress=np.full(6, np.nan),
               cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), source="s")
    from models.teachers import get_teacher
    with LabelWriter(w / "good.h5", "emt", get_teacher("emt").version) as lw:
        lw.append([{**row, "key": "a"}])
    with LabelWriter(w / "oldversion.h5", "emt", "ase 0.0") as lw:
        lw.append([{**row, "key": "b"}])
    import h5py
    with h5py.File(w / "other.h5", "w") as f:
        f["x"] = np.zeros(3)
    return w




def _run_intact(w):
    """The trained run is as it was: no refused command overwrote or extended it."""
    assert load_checkpoint(w / "run" / "ckpt.pt")["step"] == 4
    steps = [json.loads(line)["step"] for line in (w / "run" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4


def _no_checkpoint_written(w):
    assert not (w / "diverge" / "ckpt.pt").exists()  # its first checkpoint was due at step 100


def _nan_counted(w):
    assert json.loads((w / "nan" / "metrics.json").read_text())["non_finite"] == 1


def _labels_untouched(w):
    from models.labels import read_labels
    assert read_labels(w / "good.h5")["key"].tolist() == ["a"] and read_labels(w / "oldversion.h5")["key"].tolist() == ["b"]


def _no_perturbed_file(w):
    assert not (w / "p.extxyz").exists()  # refused before anything is written


THEN = {  # what must hold on disk after a case, beyond its exit status and message
    "train: existing run without --resume": _run_intact, "train: --resume with another --lr": _run_intact,
    "train: --resume with another width": _run_intact, "train: --resume and --overwrite": _run_intact,
    "train: --lr 1e6 diverges": _no_checkpoint_written, "evaluate: a NaN structure is counted": _nan_counted,
    "label: another teacher's file": _labels_untouched, "label: another teacher version": _labels_untouched,
    "label perturb: an unreadable input": _no_perturbed_file, "label perturb: a NaN coordinate": _no_perturbed_file,
}


outcomes, test_hostile_case = hostile_table(CASES, THEN)
