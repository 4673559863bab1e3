"""Joint training on molecules and crystals (train.py --task joint, models/joint.py): one trunk and the shared
elements' type weights are one set of tensors that both domains' losses train; each part exports as a standard
checkpoint that sample.py reads and that computes what the part computes; a resumed joint run takes the steps an
uninterrupted one takes."""
import json
from pathlib import Path

import pytest
import torch

from conftest import QM9_FIXTURE, ROOT, run_script
from models.checkpoint import build_model, load_checkpoint
from models.crystal_backbones import PeriodicTransformer
from models.joint import JointBackbone, part_checkpoint
from models.transformer import Transformer

PEROV_VAL = ROOT / "tests" / "data" / "perov5_val_sample.csv"


@pytest.fixture(scope="module")
def joint_data(tmp_path_factory) -> Path:
    """A data dir with the QM9 fixture's cache and perov-5's validation fixture (train on it with --train-split val)."""
    from models.molecules import read_qm9pack_csv, save_cache

    d = tmp_path_factory.mktemp("joint")
    save_cache(read_qm9pack_csv([QM9_FIXTURE]), d / "qm9.npz")
    (d / "cdvae" / "perov_5").mkdir(parents=True)
    (d / "cdvae" / "perov_5" / "val.csv").write_bytes(PEROV_VAL.read_bytes())
    return d


def train(data_dir, out, *flags):
    cmd = ["train.py", "--task", "joint", "--data", "qm9", "perov5", "--train-split", "val", "--preset", "tiny",
           "--eval-samples", "0", "--log-every", "1", "--data-dir", str(data_dir), "--out", str(out), *map(str, flags)]
    proc = run_script(*cmd, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def tiny_joint(symbols=(["H", "C", "N", "O", "F"], ["Ba", "O", "Ti", "N"])) -> JointBackbone:
    torch.manual_seed(0)
    molecules = Transformer(Transformer.Config(n_types=len(symbols[0]), hidden=32, n_layers=2, self_condition=True))
    crystals = PeriodicTransformer(PeriodicTransformer.Config(n_types=len(symbols[1]), hidden=32, n_layers=2))
    return JointBackbone([molecules, crystals], [list(s) for s in symbols])


def test_the_trunk_and_the_shared_elements_are_one_set_of_weights_that_both_domains_train():
    model = tiny_joint()
    molecules, crystals = model.parts
    assert crystals.blocks is molecules.blocks and crystals.head.weight is molecules.head.weight
    assert crystals.embed.atom is not molecules.embed.atom and crystals.head.lattice is not None
    assert model.shared_elements == ["O", "N"]
    # the crystal part's O and N columns and logit rows are the molecule part's; Ba and Ti are its own
    assert torch.equal(crystals.embed.atom.weight[:, [1, 3]], molecules.embed.atom.weight[:, [3, 2]])
    assert torch.equal(crystals.head.types[1].bias[[1, 3]], molecules.head.types[1].bias[[3, 2]])
    assert not torch.equal(crystals.embed.atom.weight[:, 0], molecules.embed.atom.weight[:, 0])
    # a crystal loss reaches the molecule part's trunk and its O embedding, not its H (which crystals lack)
    B, N = 2, 4
    h = torch.nn.functional.one_hot(torch.tensor([[0, 1, 2, 1]] * B), 4).float()
    frac_out, lattice_out, logits = model(1, h, torch.rand(B, N, 3), torch.full((B, 3), 4.0), torch.full((B, 3), 90.0),
                                          torch.rand(B), torch.ones(B, N, dtype=torch.bool))
    (frac_out.square().sum() + lattice_out.square().sum() + logits.square().sum()).backward()
    trunk = [p for p in molecules.blocks.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert trunk, "the crystal loss did not reach the shared trunk"
    grad = molecules.embed.atom.weight.grad
    assert grad[:, 3].abs().sum() > 0 and grad[:, 0].abs().sum() == 0  # O yes, H no
    # parameters() counts a shared tensor once
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for part in model.parts for p in part.parameters())


def test_a_joint_model_rejects_parts_of_different_sizes():
    molecules = Transformer(Transformer.Config(n_types=5, hidden=32, n_layers=2))
    crystals = PeriodicTransformer(PeriodicTransformer.Config(n_types=3, hidden=32, n_layers=3))
    with pytest.raises(ValueError, match="the trunk needs one size in both domains"):
        JointBackbone([molecules, crystals], [["H", "C", "N", "O", "F"], ["Ba", "O", "Ti"]])


def test_a_joint_run_trains_both_domains_resumes_and_exports_each_part(joint_data, tmp_path):
    code, message = train(joint_data, tmp_path / "straight", "--iters", 6)
    assert code == 0, message[-3000:]
    code, message = train(joint_data, tmp_path / "resumed", "--iters", 6, "--stop-after", 3)
    assert code == 0, message[-3000:]
    code, message = train(joint_data, tmp_path / "resumed", "--iters", 6, "--resume")
    assert code == 0, message[-3000:]

    def losses(run):
        return [r["loss"] for r in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses("straight") == losses("resumed") and len(losses("straight")) == 6
    evals = [r for r in map(json.loads, (tmp_path / "straight" / "log.jsonl").read_text().splitlines()) if "qm9/val_loss" in r]
    assert evals and "perov5/val_loss" in evals[-1]
    # scale.py curves draws one part of a joint run, against steps (a joint run counts no FLOPs), and asks which part
    run_script("scale.py", "curves", tmp_path / "straight", "--part", "perov5", "--out", tmp_path / "curves")
    drawn = json.loads((tmp_path / "curves" / "curves.json").read_text())[0]
    assert drawn["data"] == "perov5" and [p["step"] for p in drawn["points"]] == [r["step"] for r in evals]
    assert [p["val_loss"] for p in drawn["points"]] == [r["perov5/val_loss"] for r in evals] and "flops" not in drawn["points"][0]
    assert "drawn against steps" in (tmp_path / "curves" / "curves.md").read_text()
    # two runs of one part share a loss: measured against the reference's last loss (the resumed run is the same run)
    run_script("scale.py", "curves", tmp_path / "straight", tmp_path / "resumed", "--part", "qm9", "--reference", "straight",
               "--out", tmp_path / "ref")
    for drawn in json.loads((tmp_path / "ref" / "curves.json").read_text()):
        assert drawn["reference_loss_level"] == {"level": evals[-1]["qm9/val_loss"], "step": 6, "time": drawn["points"][-1]["time"]}
    unnamed = run_script("scale.py", "curves", tmp_path / "straight", check=False)
    assert unnamed.returncode == 1 and "is a joint run of qm9 and perov5: name the part to draw with --part qm9" in unnamed.stderr

    ckpt = load_checkpoint(tmp_path / "straight" / "ckpt.pt", task="joint")
    from models.joint import build_joint
    joint, _ = build_joint(ckpt)
    for i, name in enumerate(("qm9", "perov5")):
        part = load_checkpoint(tmp_path / "straight" / f"weights_{name}.pt")
        assert part["data"] == name and part["step"] == 6 and part["joint"]["data"] == ["qm9", "perov5"]
        standalone, _ = build_model(part)
        assert {k: v.shape for k, v in standalone.state_dict().items()} == {k: v.shape for k, v in joint.part_state(i).items()}
        for k, v in standalone.state_dict().items():
            assert torch.equal(v, joint.part_state(i)[k]), k
        run_script("sample.py", "--ckpt", tmp_path / "straight" / f"weights_{name}.pt", "--n", "3", "--steps", "2",
                   "--out", tmp_path / f"samples_{name}")
        assert (tmp_path / f"samples_{name}" / "samples.extxyz").is_file()
    assert part_checkpoint(ckpt, joint, 0)["args"]["task"] == "gen"


@pytest.mark.parametrize("flags, expected", [
    (["--arch", "gnn"], "--arch gnn has no trunk the two domains share"),
    (["--data", "qm9", "qm9"], "--task joint needs --data MOLECULES CRYSTALS"),
    (["--condition", "alpha"], "--condition: not options of --task joint"),
])
def test_joint_flags_that_cannot_work_are_refused(joint_data, tmp_path, flags, expected):
    code, message = train(joint_data, tmp_path / "run", "--iters", 2, *flags)
    assert code == 2 and expected in message and "Traceback" not in message, message[-3000:]
