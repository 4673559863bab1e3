"""kernels/step_bench.py end to end on the QM9 fixture: every variant runs, counts the same FLOPs for the same batches
whatever its precision, and the profile's split covers the step's time. Its times mean nothing here."""
import importlib.util
import json
from pathlib import Path

import torch
from conftest import run_script

ROOT = Path(__file__).resolve().parents[1]


def test_step_bench_times_every_variant_on_the_same_batches(qm9_dir, tmp_path):
    run_script("kernels/step_bench.py", "--archs", "gnn", "transformer", "--sizes", "2x16", "--threads", "1", "--steps", "1",
               "--warmup", "1", "--sample-steps", "1", "--batch", "16", "--profile", "--data-dir", qm9_dir, "--out", tmp_path)
    report = json.loads((tmp_path / "step_bench.json").read_text())
    rows = {(r["arch"], r["precision"]): r for r in report["rows"]}
    assert sorted(rows) == [("gnn", "bf16"), ("gnn", "fp32"), ("transformer", "bf16"), ("transformer", "fp32")]
    for arch in ("gnn", "transformer"):
        assert rows[arch, "fp32"]["flops_per_step"] == rows[arch, "bf16"]["flops_per_step"] > 0
        assert all(rows[arch, p]["train_mol_s"] > 0 and rows[arch, p]["sample_mol_s"] > 0 for p in ("fp32", "bf16"))
        for step in ("training step", "sampling step"):
            split = report["profiles"][f"{arch} 2x16"][step]["split"]
            assert abs(sum(split.values()) - 1) < 1e-9 and split["matrix products"] > 0
    assert set(report["peaks"]) == {"1 fp32", "1 bf16"} and "| transformer | 2x16 |" in (tmp_path / "step_bench.md").read_text()


def test_step_bench_times_crystal_batches(tmp_path):
    """--data perov5: the crystal backbones' steps on the fixture's validation crystals, timed the same way."""
    (tmp_path / "data" / "cdvae" / "perov_5").mkdir(parents=True)
    (tmp_path / "data" / "cdvae" / "perov_5" / "val.csv").write_bytes((ROOT / "tests" / "data" / "perov5_val_sample.csv").read_bytes())
    run_script("kernels/step_bench.py", "--data", "perov5", "--train-split", "val", "--archs", "transformer", "--sizes", "2x16",
               "--threads", "1", "--precisions", "fp32", "--steps", "1", "--warmup", "1", "--sample-steps", "1", "--batch", "16",
               "--data-dir", tmp_path / "data", "--out", tmp_path / "out")
    report = json.loads((tmp_path / "out" / "step_bench.json").read_text())
    (row,) = report["rows"]
    assert row["flops_per_step"] > 0 and row["train_mol_s"] > 0 and row["sample_mol_s"] > 0
    assert "perov5, flow matching" in (tmp_path / "out" / "step_bench.md").read_text()


def test_step_bench_times_trained_checkpoints_with_their_own_weights(qm9_dir, tmp_path):
    """--ckpt: a run's ckpt.pt and its exported weights.pt are timed as their own backbone, size and process; an
    export's EMA weights stand in for the training weights it does not hold; a file that is no checkpoint is refused."""
    run = tmp_path / "run"
    run_script("train.py", "--preset", "tiny", "--arch", "transformer", "--gen", "diffusion", "--hidden", 16, "--n-layers", 2,
               "--iters", 2, "--data-dir", qm9_dir, "--out", run)
    bench = ["kernels/step_bench.py", "--threads", "1", "--precisions", "fp32", "--steps", "1", "--warmup", "0",
             "--sample-steps", "1", "--batch", "8", "--data-dir", str(qm9_dir), "--out", str(tmp_path / "out")]
    run_script(*bench, "--ckpt", run / "ckpt.pt", run / "weights.pt")
    rows = json.loads((tmp_path / "out" / "step_bench.json").read_text())["rows"]
    n_params = json.loads((run / "config.json").read_text())["n_params"]
    assert [r["ckpt"] for r in rows] == [str(run / "ckpt.pt"), str(run / "weights.pt")]
    assert all((r["arch"], r["gen"], r["size"], r["params"]) == ("transformer", "diffusion", "2x16", n_params) for r in rows)
    assert f"{run / 'weights.pt'} (transformer x diffusion, qm9)" in (tmp_path / "out" / "step_bench.md").read_text()

    spec = importlib.util.spec_from_file_location("step_bench", ROOT / "kernels" / "step_bench.py")
    step_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_bench)  # defines its functions; runs nothing
    export = step_bench.trained(run / "weights.pt")
    export["args"]["data_dir"] = str(qm9_dir)
    weights = step_bench.Workload(export, 8, 1).model("model").state_dict()
    assert "model" not in export and all(torch.equal(weights[k], v) for k, v in export["ema"].items())

    (tmp_path / "junk.pt").write_text("not a checkpoint")
    refused = run_script(*bench, "--ckpt", tmp_path / "junk.pt", check=False)
    assert refused.returncode != 0 and f"--ckpt {tmp_path / 'junk.pt'}" in refused.stderr
