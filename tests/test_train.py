"""train.py and sample.py end to end on the real QM9 fixture: tiny runs, exact resume, DDP, bad checkpoints."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import ase.io
import pytest
import torch

from conftest import run_script as run
from models.checkpoint import CheckpointError, build_model, load_checkpoint, save_checkpoint
from models.domains import Molecules

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--iters", "24", "--log-every", "1", "--ckpt-every", "8", "--eval-samples", "8"]


def losses(out_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def trained(qm9_dir, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests below."""
    out = tmp_path_factory.mktemp("run") / "full"
    run("train.py", *TINY, "--data-dir", qm9_dir, "--out", out)
    return out


def test_tiny_run_writes_checkpoint_logs_and_evaluates(trained):
    assert (trained / "ckpt.pt").exists() and (trained / "train.log").exists()
    config = json.loads((trained / "config.json").read_text())
    assert config["arch"] == "gnn" and config["step"] == 24 and config["model_config"]["hidden"] == 32
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 25))
    final = [r for r in records if "val_loss" in r][-1]
    # the logged check is the domain's quality check of the final EMA weights: recomputed from the checkpoint alone
    ckpt = load_checkpoint(trained / "ckpt.pt")
    model, process = build_model(ckpt)
    flags = ckpt["args"]
    check = Molecules("qm9").quality(model.eval(), process, SimpleNamespace(meta={"n_atoms_hist": ckpt["n_atoms_hist"]}),
                                     flags["eval_samples"], flags["sample_steps"], flags["seed"] + 17,
                                     torch.autocast("cpu", enabled=False))
    assert check == {k: final[k] for k in ("mol_stability", "atom_stability")}
    assert "mol/s" in (trained / "train.log").read_text()


def test_resume_reproduces_uninterrupted_losses(trained, qm9_dir, tmp_path):
    out = tmp_path / "resumed"
    first = run("train.py", *TINY, "--data-dir", qm9_dir, "--out", out, "--stop-after", "10")
    assert "stopped at step 10" in first.stdout + first.stderr
    assert json.loads((out / "config.json").read_text())["step"] == 10
    run("train.py", *TINY, "--data-dir", qm9_dir, "--out", out, "--resume")
    full, resumed = losses(trained), losses(out)
    assert sorted(resumed) == list(range(1, 25))
    assert [resumed[s] for s in range(11, 25)] == [full[s] for s in range(11, 25)]  # bit-exact on the CPU
    a, b = load_checkpoint(trained / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])
    # the logged time is the run's, over both sessions: it goes on from the checkpoint's, not from 0
    times = [json.loads(line)["time"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert times == sorted(times) and b["run_seconds"] >= times[-1]
    # the machine it trained on is named once: the resumed session ran where the first did
    assert len(a["hardware"]) == 1 and b["hardware"] == a["hardware"] and "process(es)" in a["hardware"][0]


def test_size_grouped_batches_pad_less_resume_exactly_and_match_ddp(qm9_dir, tmp_path):
    size = ["--batching", "size", "--eval-samples", "0"]
    whole = run("train.py", *TINY, *size, "--data-dir", qm9_dir, "--out", tmp_path / "whole")
    padded_to = float(re.search(r"padded to ([\d.]+) atoms on average, not (\d+)", whole.stdout + whole.stderr).group(1))
    assert padded_to < 29
    run("train.py", *TINY, *size, "--data-dir", qm9_dir, "--out", tmp_path / "resumed", "--stop-after", "10")
    run("train.py", *TINY, *size, "--data-dir", qm9_dir, "--out", tmp_path / "resumed", "--resume")
    full, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(11, 25)] == [full[s] for s in range(11, 25)]  # bit-exact on the CPU
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *TINY, *size,
        "--data-dir", qm9_dir, "--out", tmp_path / "ddp")
    ddp = losses(tmp_path / "ddp")
    for step in full:  # both ranks pad to the global batch's largest molecule and draw the same noise
        assert ddp[step] == pytest.approx(full[step], rel=1e-4, abs=1e-5), step


def test_recipe_levers_are_stored_and_resume_exactly(qm9_dir, tmp_path):
    """Adaptive clipping (its history is in the checkpoint), tilted training times, Fourier time features, the
    short-distance loss and the coordinate weight's cap."""
    levers = ["--grad-clip", "adaptive", "--time-tilt", "0.7", "--time-frequencies", "3", "--distance-loss", "0.5", "--min-one-minus-t", "0.1",
              "--eval-samples", "0"]
    run("train.py", *TINY, *levers, "--data-dir", qm9_dir, "--out", tmp_path / "whole")
    run("train.py", *TINY, *levers, "--data-dir", qm9_dir, "--out", tmp_path / "resumed", "--stop-after", "10")
    run("train.py", *TINY, *levers, "--data-dir", qm9_dir, "--out", tmp_path / "resumed", "--resume")
    full, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(11, 25)] == [full[s] for s in range(11, 25)]  # bit-exact on the CPU
    ckpt = load_checkpoint(tmp_path / "whole" / "ckpt.pt")
    assert ckpt["model_config"]["time_frequencies"] == 3 and ckpt["process_config"]["time_tilt"] == 0.7
    assert ckpt["process_config"]["distance_loss"] == 0.5 and ckpt["process_config"]["min_one_minus_t"] == 0.1
    assert len(ckpt["clip_history"]) == 24 and all(n > 0 for n in ckpt["clip_history"])
    norms = [r["grad_norm"] for r in map(json.loads, (tmp_path / "whole" / "log.jsonl").read_text().splitlines()) if "grad_norm" in r]
    history = ckpt["clip_history"]  # each step's norm as clipped: the first is not, none exceeds its step's norm
    assert history[0] == pytest.approx(norms[0], rel=1e-5) and all(h <= n * (1 + 1e-5) for h, n in zip(history, norms))
    assert min(history) > 1.0  # the recent norms, not the fixed clip of 1.0, set the threshold
    proc = run("sample.py", "--ckpt", tmp_path / "whole" / "ckpt.pt", "--n", "6", "--steps", "4", "--time-power", "2",
               "--out", tmp_path / "samples")
    assert json.loads((tmp_path / "samples" / "sample.json").read_text())["time_power"] == 2.0, proc.stdout


def test_recipe_defaults_and_resume_keeps_the_checkpoints_recipe(trained, qm9_dir, tmp_path):
    """Molecules default to Fourier time features and self-conditioning; a run started without them resumes without
    them (the flags are the checkpoint's, not today's defaults, which would be a different model)."""
    config = json.loads((trained / "config.json").read_text())
    assert config["model_config"]["time_frequencies"] == 6 and config["model_config"]["self_condition"]
    assert config["process_config"]["self_condition"] and config["args"]["batching"] == "size"
    old_recipe = ["--time-frequencies", "0", "--no-self-condition", "--batching", "random", "--eval-samples", "0"]
    run("train.py", *TINY, *old_recipe, "--data-dir", qm9_dir, "--out", tmp_path, "--stop-after", "8")
    run("train.py", *TINY[:-2], "--eval-samples", "0", "--data-dir", qm9_dir, "--out", tmp_path, "--resume")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["step"] == 24 and config["model_config"]["time_frequencies"] == 0
    assert not config["model_config"]["self_condition"] and config["args"]["batching"] == "random"


def test_two_process_ddp_matches_one_process(trained, qm9_dir, tmp_path):
    out = tmp_path / "ddp"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *TINY,
        "--data-dir", qm9_dir, "--out", out)
    single, ddp = losses(trained), losses(out)
    assert sorted(ddp) == sorted(single)
    for step in single:  # same global batch and noise; only the gradient all-reduce order differs
        assert ddp[step] == pytest.approx(single[step], rel=1e-4, abs=1e-5), step
    a, b = load_checkpoint(trained / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], rtol=1e-3, atol=1e-5), k


def test_sample_writes_extxyz_and_sdf(trained, tmp_path):
    proc = run("sample.py", "--ckpt", trained / "ckpt.pt", "--n", "12", "--steps", "4", "--batch-size", "5", "--out", tmp_path)
    assert "molecules/s" in proc.stdout
    structures = ase.io.read(tmp_path / "samples.extxyz", ":")
    assert len(structures) == 12
    assert all(set(a.numbers) <= {1, 6, 7, 8, 9} and not a.pbc.any() for a in structures)
    from rdkit import Chem
    sdf = [m for m in Chem.SDMolSupplier(str(tmp_path / "samples.sdf"), sanitize=False)]
    assert len(sdf) + int(proc.stdout.split("(")[-1].split()[0]) == 12
    assert (tmp_path / "sample.log").exists()


def test_size_ordered_sampling_keeps_the_drawn_sizes_in_order(trained, tmp_path):
    """--batching size samples the same drawn sizes in other batches, and writes them in the order drawn."""
    for batching in ("size", "random"):
        run("sample.py", "--ckpt", trained / "ckpt.pt", "--n", "9", "--steps", "3", "--batch-size", "3", "--batching", batching,
            "--out", tmp_path / batching)
    by_size, in_order = (ase.io.read(tmp_path / b / "samples.extxyz", ":") for b in ("size", "random"))
    assert [m.info["sample_index"] for m in by_size] == [m.info["sample_index"] for m in in_order] == list(range(9))
    assert [len(m) for m in by_size] == [len(m) for m in in_order] and len({len(m) for m in by_size}) > 1
    assert any((m.positions != n.positions).any() for m, n in zip(by_size, in_order))  # other batches, other noise
    assert json.loads((tmp_path / "size" / "sample.json").read_text())["batching"] == "size"


def test_finished_run_exports_ema_weights_that_sample_alike(trained, qm9_dir, tmp_path):
    weights = trained / "weights.pt"
    assert weights.stat().st_size < (trained / "ckpt.pt").stat().st_size / 2  # no optimiser moments, no raw weights
    assert "optimizer" not in load_checkpoint(weights)
    for name in ("ckpt.pt", "weights.pt"):
        run("sample.py", "--ckpt", trained / name, "--n", "6", "--steps", "4", "--out", tmp_path / name)
    a, b = (ase.io.read(tmp_path / name / "samples.extxyz", ":") for name in ("ckpt.pt", "weights.pt"))
    assert [m.numbers.tolist() for m in a] == [m.numbers.tolist() for m in b]
    assert all((m.positions == n.positions).all() for m, n in zip(a, b))
    proc = run("sample.py", "--ckpt", weights, "--n", "2", "--weights", "model", "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "no 'model' weights" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "resume").mkdir()
    (tmp_path / "resume" / "ckpt.pt").write_bytes(weights.read_bytes())
    proc = run("train.py", *TINY, "--data-dir", qm9_dir, "--out", tmp_path / "resume", "--resume", check=False)
    assert proc.returncode != 0 and "missing" in proc.stderr and "Traceback" not in proc.stderr


def test_init_from_starts_a_new_run_from_another_runs_ema_weights(trained, qm9_dir, tmp_path):
    """A second stage: the model (weights and model flags) is the first run's, the optimiser and the step start over,
    and the new run resumes like any other."""
    flags = ["--preset", "small", "--iters", "2", "--lr", "1e-3", "--warmup", "1", "--batch-size", "16", "--n-train", "256",
             "--val-size", "32", "--eval-every", "0", "--eval-samples", "4", "--sample-steps", "2", "--data-dir", qm9_dir]
    out = tmp_path / "stage2"
    run("train.py", *flags, "--init-from", trained / "weights.pt", "--out", out, "--stop-after", "1")
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 1 and config["model_config"]["hidden"] == 32  # the tiny preset's width, not small's 64
    assert "initialised from" in (out / "train.log").read_text()
    source, stage2 = load_checkpoint(trained / "weights.pt")["ema"], load_checkpoint(out / "ckpt.pt")["model"]
    # one AdamW step moves each weight by about the learning rate; a fresh initialisation is nowhere near
    assert max((stage2[k] - source[k]).abs().max().item() for k in source if source[k].is_floating_point()) < 2e-3
    run("train.py", *flags, "--out", out, "--resume")  # --init-from and the width come from the checkpoint
    assert json.loads((out / "config.json").read_text())["step"] == 2
    for extra, message in ((["--hidden", "48"], "--hidden 48 (checkpoint: 32); the model is the checkpoint's"),
                           (["--arch", "transformer"], "trained with --arch gnn, not --arch transformer")):
        proc = run("train.py", *flags, "--init-from", trained / "weights.pt", *extra, "--out", tmp_path / "other", check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    proc = run("train.py", "--task", "ff", "--init-from", trained / "weights.pt", "--out", tmp_path / "ff", check=False)
    assert proc.returncode != 0 and "--init-from applies to --task gen" in proc.stderr
    # fine-tuning with another objective: the loss's levers given on the command line apply, the network is the source's
    run("train.py", *flags, "--init-from", trained / "weights.pt", "--distance-loss", "0.5", "--out", tmp_path / "tuned")
    tuned = load_checkpoint(tmp_path / "tuned" / "ckpt.pt")
    assert tuned["process_config"]["distance_loss"] == 0.5 and tuned["args"]["distance_loss"] == 0.5
    assert tuned["model_config"] == load_checkpoint(trained / "weights.pt")["model_config"]
    assert "the objective's distance_loss 0.0 -> 0.5" in (tmp_path / "tuned" / "train.log").read_text()


def test_tiny_run_trains_samples_and_evaluates_end_to_end(trained, qm9_dir, tmp_path):
    run("sample.py", "--ckpt", trained / "ckpt.pt", "--n", "20", "--steps", "5", "--out", tmp_path)
    proc = run("evaluate.py", tmp_path / "samples.extxyz", "--data", "qm9", "--data-dir", qm9_dir, "--no-fcd",
               "--no-progress", "--log", trained / "log.jsonl")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["n_samples"] == 20 and 0 <= metrics["atom_stability"] <= 1
    assert "mol stab" in proc.stdout and (tmp_path / "properties.png").exists() and (tmp_path / "curves.png").exists()


def test_resume_refuses_other_architecture(trained, qm9_dir, tmp_path):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    ckpt.pop("format")
    save_checkpoint(tmp_path / "ckpt.pt", {**ckpt, "arch": "pairformer"})
    with pytest.raises(CheckpointError, match="trained with --arch pairformer, not --arch gnn"):
        load_checkpoint(tmp_path / "ckpt.pt", arch="gnn")
    proc = run("train.py", *TINY, "--data-dir", qm9_dir, "--out", tmp_path, "--resume", check=False)
    assert proc.returncode != 0 and "--arch pairformer, not --arch gnn" in proc.stderr
    proc = run("sample.py", "--ckpt", tmp_path / "ckpt.pt", "--n", "2", check=False)  # gnn weights, pairformer label
    assert proc.returncode != 0 and "not fields of PairformerConfig" in proc.stderr and "Traceback" not in proc.stderr
    save_checkpoint(tmp_path / "ckpt.pt", {**ckpt, "arch": "made-up"})
    proc = run("sample.py", "--ckpt", tmp_path / "ckpt.pt", "--n", "2", check=False)
    assert proc.returncode != 0 and "unknown architecture 'made-up'" in proc.stderr


def test_bad_checkpoints_give_clear_errors(trained, tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable"):
        load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "molgen-bench-ckpt-v1", "payload": Path("/")}, pickled)  # an arbitrary object
    with pytest.raises(CheckpointError, match="pickled.pt: not a readable"):
        load_checkpoint(pickled)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    ckpt = load_checkpoint(trained / "ckpt.pt")
    with pytest.raises(CheckpointError, match="weights do not fit"):
        build_model({**ckpt, "model_config": {**ckpt["model_config"], "hidden": 48}})
    proc = run("sample.py", "--ckpt", garbage, "--n", "2", check=False)
    assert proc.returncode != 0 and "garbage.pt" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("arch,gen", [("transformer", "flow"), ("pairformer", "flow"), ("gnn", "diffusion"), ("gnn", "interpolant")])
def test_other_combinations_train_resume_exactly_and_sample(arch, gen, qm9_dir, tmp_path):
    """Other backbones and processes through the same loop: a run stopped and resumed matches an
    uninterrupted one, and sample.py uses the process's own default sampler."""
    args = ("train.py", *TINY, "--arch", arch, "--gen", gen, "--iters", "8", "--ckpt-every", "4", "--data-dir", qm9_dir)
    run(*args, "--out", tmp_path / "full")
    run(*args, "--out", tmp_path / "resumed", "--stop-after", "4")
    run(*args, "--out", tmp_path / "resumed", "--resume")
    full, resumed = losses(tmp_path / "full"), losses(tmp_path / "resumed")
    assert sorted(full) == list(range(1, 9)) and full == resumed
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (config["arch"], config["gen"]) == (arch, gen)
    run("sample.py", "--ckpt", tmp_path / "full" / "ckpt.pt", "--n", "3", "--steps", "3", "--out", tmp_path / "samples")
    structures = ase.io.read(tmp_path / "samples" / "samples.extxyz", ":")
    assert len(structures) == 3 and structures[0].info["method"] == {"flow": "heun", "diffusion": "ancestral", "interpolant": "sde"}[gen]


def test_options_of_other_backbones_and_processes_are_refused(qm9_dir, tmp_path):
    for flags, message in ((["--arch", "pairformer", "--cfconv-cutoff", "3"], "--cfconv-cutoff is an option of --arch gnn"),
                           (["--gen", "diffusion", "--ot-align"], "--ot-align is an option of --gen flow"),
                           (["--gen", "diffusion", "--distance-loss", "1"], "--distance-loss is an option of --gen flow and interpolant"),
                           (["--gen", "diffusion", "--min-one-minus-t", "1"], "--min-one-minus-t is an option of --gen flow and interpolant"),
                           (["--min-one-minus-t", "0"], "--min-one-minus-t"),
                           (["--gamma-scale", "0.5"], "--gamma-scale is an option of --gen interpolant")):
        proc = run("train.py", *TINY, *flags, "--data-dir", qm9_dir, "--out", tmp_path, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]


def test_sampler_of_another_process_is_refused(trained, tmp_path):
    proc = run("sample.py", "--ckpt", trained / "ckpt.pt", "--n", "2", "--method", "ancestral", "--out", tmp_path, check=False)
    assert proc.returncode != 0 and "--method ancestral is not a sampler of --gen flow" in proc.stderr
