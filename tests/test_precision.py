"""bf16 autocast against float64: the backbones' coordinate paths and the samplers' state.

train.py and sample.py run the model and the sampler under torch.autocast(bfloat16) on CUDA; CPU
autocast rounds the same ops to bf16, so these tests run it on the CPU. The inputs are real QM9
molecules (the fixture) slightly noised, as late in sampling, and every error is in Angstrom. The bar,
0.005 A, is a sixth of the stability metric's tightest bond margin (0.03 A). See models/precision.py.
"""
import pytest
import torch
from torch import nn

from conftest import QM9_FIXTURE
from models.domains import Molecules

ARCHS, PROCESSES = Molecules("qm9").archs(), Molecules("qm9").processes()
from models.geometry import remove_mean
from models.molecules import PaddedMolecules, read_qm9pack_csv

TOLERANCE = 0.005  # A

bf16_autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def molecules():
    """16 fixture molecules (12 to 23 atoms): h [B, N, 5] continuous types, x_t [B, N, 3] = x1 plus
    0.1 A of noise, t [B] = 0.9, mask [B, N]; all float64."""
    data = PaddedMolecules(read_qm9pack_csv([QM9_FIXTURE]).subset(range(16)))
    mask = data.mask
    g = torch.Generator().manual_seed(0)
    x_t = data.pos.double() + 0.1 * remove_mean(torch.randn(*data.pos.shape, generator=g, dtype=torch.float64), mask)
    h = torch.nn.functional.one_hot(data.types, 5).double() * 0.25 * mask.unsqueeze(-1)
    return h, x_t, torch.full((len(mask),), 0.9, dtype=torch.float64), mask


def coordinate_outputs(model):
    """The last layers of the coordinate MLPs (EGNN: one per layer; Transformer and Pairformer: the
    head's): the only bias-free Linears with one output."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1 and m.bias is None]


def exercised(name, std):
    """A small backbone whose coordinate outputs are re-drawn with this std: at their init (gain 1e-3,
    or zero) the coordinate path carries almost nothing, so rounding in it could not show."""
    torch.manual_seed(0)
    cls = ARCHS[name]
    model = cls(cls.Config(hidden=32, n_layers=2)).eval()
    for layer in coordinate_outputs(model):
        nn.init.normal_(layer.weight, std=std)
    return model


def max_error(a, b, mask):
    return (a.double() - b.double())[mask].norm(dim=-1).max().item()


# The coordinate path is exercised in each backbone's own way:
#  - gnn: std 10 saturates the tanh gates, so every edge steps the full 15 A (coords_range). That is the
#    worst case for bf16, which spaces values in [8, 16) 1/16 A apart; in a trained model such steps
#    nearly cancel. Saturated gates hardly depend on the bf16 features, so this isolates the coordinate
#    path. Measured: 0.61 A before the float32 coordinate path (models/precision.py), 0.0023 A with it.
#  - transformer, pairformer: displacements of 0.46 and 0.12 A rms, like x1_hat - x_t late in sampling.
#    Their head averages over neighbours, so its bf16 rounding was small to begin with (before / after:
#    0.0017 / 0.0006 A and 0.0027 / 0.0027 A). What is left comes from the bf16 trunk and grows with the
#    displacement, the Pairformer's fastest (up to about 2.5 % of it); the head alone is checked below.
@pytest.mark.parametrize("name,std", [("gnn", 10.0), ("transformer", 0.3), ("pairformer", 0.5)])
def test_displacement_under_bf16_autocast_matches_float64(name, std, molecules):
    h, x_t, t, mask = molecules
    model = exercised(name, std)
    with torch.no_grad():
        ref, ref_logits = model.double()(h, x_t, t, mask)
        with bf16_autocast():
            pos_out, logits = model.float()(h.float(), x_t.float(), t.float(), mask)
    assert pos_out.dtype == logits.dtype == torch.float32
    assert ref[mask].norm(dim=-1).mean() > 0.05  # the coordinate path carries a real displacement
    assert max_error(pos_out, ref, mask) < TOLERANCE
    assert (logits - ref_logits).abs().max() < 0.05  # float32 logits of bf16 features


def test_equivariant_head_runs_in_full_precision(molecules):
    """The Transformer's and Pairformer's coordinate head, fed the same trunk outputs, runs in float32
    under autocast: it matches the float64 head to float32 rounding. With large pair weights (a 4.7 A
    displacement), the bf16 head was off by 0.009 A (before models/precision.py)."""
    h, x_t, t, mask = molecules
    model = exercised("transformer", 3.0).double()
    with torch.no_grad():
        s, z, diff, dist = model.embed(h, x_t, t, mask)
        s, z = s.float(), z.to(torch.bfloat16)  # as the trunk hands them to the head under autocast
        ref, _ = model.head(s.double(), z.double(), diff, dist, mask)
        with bf16_autocast():
            dx, logits = model.head.float()(s, z, diff.float(), dist.float(), mask)
    assert dx.dtype == logits.dtype == torch.float32
    assert ref[mask].norm(dim=-1).mean() > 1.0
    assert max_error(dx, ref, mask) < 1e-4


class Float64(nn.Module):
    """The reference for a sampler: the model in float64, its outputs back in float32 as every sampler
    keeps its state, so the two runs differ only in the autocast."""

    def __init__(self, model):
        super().__init__()
        self.model = model.double()

    def forward(self, h, x, t, mask):
        return self.model(h.double(), x.double(), t.double(), mask)


# The samplers of the processes that predict x1. Diffusion's predict the noise, and with an untrained
# model x1_hat = (x_t - sigma_t eps_hat) / alpha_t sends the atoms hundreds of A away (alpha_0 = 0.003).
SAMPLERS = [(gen, method) for gen in ("flow", "interpolant") for method in PROCESSES[gen].SAMPLERS]


@pytest.mark.parametrize("gen,method", SAMPLERS, ids=[f"{g}-{m}" for g, m in SAMPLERS])
def test_sampler_under_bf16_autocast_matches_float64(gen, method):
    """4 steps of a sampler with a small Transformer (head weights exercised, as above): under autocast
    the positions come back float32 and within TOLERANCE of sampling with the float64 model. Measured:
    at most 0.0022 A; flow's state rounded to bf16 after every step would be off by 0.016 A."""
    process = PROCESSES[gen](PROCESSES[gen].Config())
    model = exercised("transformer", 0.3)
    n_atoms = torch.tensor([19, 15, 12, 23])
    sample = lambda m: process.sample(m, {"n_atoms": n_atoms}, 4, method, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with bf16_autocast():
            out = sample(model.float())
        ref = sample(Float64(model))
    assert out["pos"].dtype == torch.float32
    assert max_error(out["pos"], ref["pos"], out["mask"]) < TOLERANCE


def test_flush_denormals_zeroes_denormals_and_nothing_else():
    """The scripts' startup setting (models.precision.flush_denormals), in a fresh interpreter so this process's
    numerics stay as they were: denormals read as zero, the smallest normal numbers do not."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import json, torch\n"
            "from models.precision import flush_denormals\n"
            "x32 = torch.tensor([1e-39, 1.2e-38]); x64 = torch.tensor([1e-310, 2.3e-308], dtype=torch.float64)\n"
            "before = (x32 * 1).tolist() + (x64 * 1).tolist()\n"
            "flush_denormals()\n"
            "print(json.dumps([before, (x32 * 1).tolist() + (x64 * 1).tolist()]))\n")
    before, after = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                              cwd=Path(__file__).resolve().parents[1]).stdout)
    assert before[0] > 0
    assert after[0] == 0.0 and after[2] == 0.0
    assert after[1] == before[1] and after[3] == before[3]


@pytest.mark.parametrize("amx", [True, False])
def test_auto_precision_takes_bf16_on_a_cpu_only_with_amx(amx, monkeypatch):
    """--precision auto: on a CPU, bf16 for the backbones that set CPU_BF16 only where AMX multiplies bf16 (without
    it bf16 products run several times slower than float32); the EGNN stays fp32 either way; explicit choices and
    CUDA are not second-guessed."""
    from models import precision

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    domain = Molecules("qm9")
    transformer, egnn = domain.arch_class("transformer"), domain.arch_class("gnn")
    assert transformer.CPU_BF16 and not egnn.CPU_BF16
    assert precision.backbone_precision(cpu, "auto", transformer) == ("bf16" if amx else "fp32")
    assert precision.backbone_precision(cpu, "auto", egnn) == "fp32"
    assert precision.backbone_precision(cuda, "auto", egnn) == "bf16"
    assert precision.backbone_precision(cpu, "bf16", egnn) == "bf16"
    assert precision.backbone_precision(cpu, "fp32", transformer) == "fp32"
