"""Property-conditional generation (models/condition.py, train.py --condition, sample.py --condition / --guidance): the
EDM protocol's halves, what a backbone sees of a condition, classifier-free guidance, and a conditional run end to
end on the QM9 fixture."""
import json
from dataclasses import asdict

import ase.io
import numpy as np
import pytest
import torch

from conftest import run_script
from models.checkpoint import build_model, load_checkpoint
from models.condition import condition_features, guide, protocol_halves
from models.domains import get_domain
from models.molecules import PROPERTIES, load_qm9

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
QM9 = get_domain("qm9")


def test_protocol_halves_are_disjoint_fixed_and_cover_the_split():
    halves = protocol_halves(100_000)
    generator, oracle = halves["generator"], halves["oracle"]
    assert len(generator) == len(oracle) == 50_000 and not np.intersect1d(generator, oracle).size
    assert np.array_equal(np.union1d(generator, oracle), np.arange(100_000))
    again = protocol_halves(100_000)
    assert all(np.array_equal(halves[k], again[k]) for k in halves)
    assert generator[:5].tolist() != list(range(5))  # a permutation, not the split's first half


def test_the_molecule_domain_conditions_on_the_properties_it_reads():
    assert QM9.CONDITIONS == tuple(PROPERTIES)


def test_condition_features_flag_dropped_properties():
    condition = torch.tensor([[0.5, float("nan")], [float("nan"), float("nan")]])
    features = condition_features(condition, 2, 2, torch.float32, "cpu")
    assert features.tolist() == [[0.5, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert torch.equal(condition_features(None, 2, 2, torch.float32, "cpu"), torch.zeros(2, 4))  # None: all dropped
    with pytest.raises(ValueError, match="a backbone of 2 properties"):
        condition_features(torch.zeros(2, 3), 2, 2, torch.float32, "cpu")


def molecule_inputs(n_atoms=(7, 5, 6), T=5, seed=0):
    """A backbone's inputs for molecules of n_atoms atoms: h [B, N, T], pos [B, N, 3], t [B], mask [B, N]."""
    g = torch.Generator().manual_seed(seed)
    B, N = len(n_atoms), max(n_atoms)
    mask = torch.arange(N)[None] < torch.tensor(n_atoms)[:, None]
    return torch.randn(B, N, T, generator=g), torch.randn(B, N, 3, generator=g) * mask[..., None], torch.rand(B, generator=g), mask


@pytest.mark.parametrize("arch", ["gnn", "transformer", "pairformer"])
def test_every_backbone_sees_its_condition_and_refuses_one_it_was_not_built_for(arch):
    cls = QM9.arch_class(arch)
    torch.manual_seed(0)
    model = cls(cls.Config(n_types=5, hidden=32, n_layers=2, n_conditions=2)).eval()
    h, pos, t, mask = molecule_inputs()
    dropped = model(h, pos, t, mask)
    assert all(torch.equal(a, b) for a, b in zip(dropped, model(h, pos, t, mask, condition=torch.full((3, 2), float("nan")))))
    for condition in (torch.tensor([[1.0, -1.0]] * 3), torch.tensor([[-2.0, 0.5]] * 3)):
        out = model(h, pos, t, mask, condition=condition)
        assert not torch.allclose(out[1], dropped[1])  # the type logits (a zero-initialised coordinate head may not move yet)
    plain = cls(cls.Config(n_types=5, hidden=32, n_layers=2))
    with pytest.raises(ValueError, match="built without properties"):
        plain(h, pos, t, mask, condition=torch.zeros(3, 2))


@pytest.mark.parametrize("arch", ["gnn", "transformer", "pairformer"])
def test_every_crystal_backbone_sees_its_condition(arch):
    cls = get_domain("perov5").arch_class(arch)
    torch.manual_seed(0)
    model = cls(cls.Config(n_types=4, hidden=32, n_layers=2, n_conditions=1)).eval()
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(5)[None] < torch.tensor([5, 3])[:, None]
    inputs = (torch.randn(2, 5, 4, generator=g), torch.rand(2, 5, 3, generator=g), torch.full((2, 3), 4.0),
              torch.full((2, 3), 90.0), torch.rand(2, generator=g), mask)
    dropped = model(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(dropped, model(*inputs, condition=torch.full((2, 1), float("nan")))))
    assert not torch.allclose(model(*inputs, condition=torch.tensor([[1.0], [-1.0]]))[2], dropped[2])  # the type logits


@pytest.mark.parametrize("gen", ["flow", "diffusion", "interpolant"])
def test_guidance_zero_samples_a_crystal_models_unconditional_model(gen):
    domain = get_domain("perov5")
    model_cls, process_cls = domain.arch_class("gnn"), domain.process_class(gen)
    torch.manual_seed(0)
    model = model_cls(model_cls.Config(n_types=4, hidden=32, n_layers=2, n_conditions=1)).eval()
    with torch.no_grad():  # the coordinate and lattice heads start at zero: give them something to say
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    process = process_cls(process_cls.Config(n_types=4, condition_dropout=0.1))
    n_atoms, condition = torch.tensor([5, 3]), torch.tensor([[1.5], [-1.0]])

    def draw(**request):
        return process.sample(model, {"n_atoms": n_atoms, **request}, 3, process.SAMPLERS[0], generator=torch.Generator().manual_seed(3))

    unconditional, guided_zero, conditional = draw(), draw(condition=condition, guidance=0.0), draw(condition=condition)
    assert all(torch.equal(guided_zero[k], unconditional[k]) for k in ("frac", "lengths", "types"))
    assert not torch.allclose(conditional["lengths"], unconditional["lengths"])


@pytest.mark.parametrize("gen", ["flow", "diffusion", "interpolant"])
def test_guidance_zero_samples_the_unconditional_model_and_two_extrapolates(gen):
    model_cls, process_cls = QM9.arch_class("gnn"), QM9.process_class(gen)
    torch.manual_seed(0)
    model = model_cls(model_cls.Config(n_types=5, hidden=32, n_layers=2, n_conditions=1, self_condition=True)).eval()
    process = process_cls(process_cls.Config(n_types=5, self_condition=True, condition_dropout=0.1))
    n_atoms, condition = torch.tensor([6, 9]), torch.tensor([[1.5], [-1.0]])
    method = process.SAMPLERS[0]

    def draw(**request):
        return process.sample(model, {"n_atoms": n_atoms, **request}, 4, method, generator=torch.Generator().manual_seed(3))

    unconditional = draw()
    guided_zero = draw(condition=condition, guidance=0.0)
    conditional = draw(condition=condition)
    assert torch.equal(guided_zero["pos"], unconditional["pos"]) and torch.equal(guided_zero["types"], unconditional["types"])
    assert not torch.allclose(conditional["pos"], unconditional["pos"])
    # one backbone call at guidance 2: u + 2 (c - u)
    h, pos, t, mask = molecule_inputs(n_atoms.tolist())
    c = process.backbone(model, h, pos, t, mask, condition=condition)
    u = process.backbone(model, h, pos, t, mask)
    g = process.backbone(model, h, pos, t, mask, condition=condition, guidance=2.0)
    for gi, ci, want in zip(g, c, guide(c, u, 2.0)):
        torch.testing.assert_close(gi, want)
    assert not torch.allclose(g[1], c[1])


def test_condition_dropout_trains_the_unconditional_model_in_the_same_weights(qm9_dir):
    """With every structure dropped, the loss is the unconditional one; with none dropped, the condition enters."""
    model_cls, process_cls = QM9.arch_class("gnn"), QM9.process_class("flow")
    torch.manual_seed(0)
    model = model_cls(model_cls.Config(n_types=5, hidden=32, n_layers=2, n_conditions=1))
    from models.molecules import PaddedMolecules
    mols = load_qm9("train", qm9_dir).subset(range(8))
    batch = PaddedMolecules(mols, condition=torch.randn(8, 1)).batch(torch.arange(8))
    unconditional_batch = {k: v for k, v in batch.items() if k != "condition"}
    losses = {}
    for dropout in (1.0, 0.0):
        process = process_cls(process_cls.Config(n_types=5, condition_dropout=dropout))
        noise = process.draw_noise(8, batch["types"].shape[1], torch.Generator().manual_seed(0))
        losses[dropout] = (process.loss(model, batch, noise).item(), process.loss(model, unconditional_batch, noise).item())
    assert losses[1.0][0] == losses[1.0][1]
    assert losses[0.0][0] != losses[0.0][1]


def run(script, *args):
    proc = run_script(script, *args, check=False)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def conditional_run(qm9_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("conditional") / "run"
    code, message = run("train.py", "--preset", "tiny", "--iters", 4, "--eval-samples", 0, "--condition", "alpha", "gap",
                        "--data-dir", qm9_dir, "--out", out)
    assert code == 0, message[-3000:]
    return out


def test_a_conditional_run_trains_on_the_generator_half_and_keeps_its_pairs(conditional_run, qm9_dir):
    ckpt = load_checkpoint(conditional_run / "ckpt.pt")
    train = load_qm9("train", qm9_dir)
    half = train.subset(protocol_halves(len(train))["generator"])
    assert ckpt["n_train"] == len(half) and ckpt["condition"]["half"] == "generator"
    values = np.stack([half.property_values("alpha"), half.property_values("gap")], 1)
    assert ckpt["condition"]["properties"] == ["alpha", "gap"] and ckpt["condition"]["units"] == ["Bohr^3", "meV"]
    np.testing.assert_allclose(ckpt["condition"]["mean"], values.mean(0)) and np.testing.assert_allclose(ckpt["condition"]["std"], values.std(0))
    pairs = ckpt["condition_pairs"].numpy()
    assert np.array_equal(pairs[:, 0], half.n_atoms) and np.allclose(pairs[:, 1:], values, rtol=1e-6)
    model, process = build_model(ckpt)
    assert model.config.n_conditions == 2 and process.config.condition_dropout == 0.1
    assert "condition_pairs" not in json.loads((conditional_run / "config.json").read_text())  # tensors stay in the checkpoint


def test_sampling_draws_the_protocols_pairs_or_the_values_asked(conditional_run):
    ckpt = load_checkpoint(conditional_run / "ckpt.pt")
    pairs = {tuple(np.round(row, 3)) for row in ckpt["condition_pairs"].double().numpy()}
    code, message = run("sample.py", "--ckpt", conditional_run / "ckpt.pt", "--n", 12, "--steps", 2, "--out", conditional_run / "protocol")
    assert code == 0, message[-3000:]
    drawn = ase.io.read(conditional_run / "protocol" / "samples.extxyz", ":")
    assert len(drawn) == 12 and all(a.info["guidance"] == 1.0 for a in drawn)
    for atoms in drawn:  # each molecule's size and properties are one molecule's of the generator's half
        assert (len(atoms), round(atoms.info["condition_alpha"], 3), round(atoms.info["condition_gap"], 3)) in pairs
    code, message = run("sample.py", "--ckpt", conditional_run / "ckpt.pt", "--n", 4, "--steps", 2, "--condition", "gap=7000",
                        "alpha=80.5", "--guidance", 2, "--out", conditional_run / "fixed")
    assert code == 0 and "conditioned on alpha = 80.5, gap = 7000, guidance 2" in message, message[-3000:]
    fixed = ase.io.read(conditional_run / "fixed" / "samples.extxyz", ":")
    assert all(a.info["condition_alpha"] == 80.5 and a.info["condition_gap"] == 7000 and a.info["guidance"] == 2 for a in fixed)
    assert json.loads((conditional_run / "fixed" / "sample.json").read_text())["condition"] == {"alpha": 80.5, "gap": 7000}


@pytest.mark.parametrize("flags, words", [
    (["--condition", "alpha=80"], "conditioned on alpha, gap: give a value for each of them, not for alpha"),
    (["--condition", "alpha=80", "alpha=70"], "--condition names a property twice"),
])
def test_a_conditional_checkpoint_refuses_an_incomplete_request(conditional_run, flags, words):
    code, message = run("sample.py", "--ckpt", conditional_run / "ckpt.pt", "--n", 2, "--steps", 2, *flags, "--out", conditional_run / "bad")
    assert code == 1 and words in message and "Traceback" not in message, message[-3000:]


def test_the_oracle_is_invariant_and_overfits_a_few_molecules(qm9_dir):
    from models.molecules import PaddedMolecules
    from models.oracle import OracleConfig, OracleObjective, OracleObjectiveConfig, PropertyRegressor

    torch.manual_seed(0)
    mols = load_qm9("train", qm9_dir).subset(range(8))
    targets = torch.from_numpy((mols.properties[:, :2] - mols.properties[:, :2].mean(0)) / mols.properties[:, :2].std(0)).float()
    batch = PaddedMolecules(mols, condition=targets).batch(torch.arange(8))
    model, objective = PropertyRegressor(OracleConfig(n_outputs=2, hidden=32, n_layers=2)), OracleObjective(OracleObjectiveConfig(2))
    # a rotated, translated molecule with its atoms in another order has the same properties
    rotation = torch.linalg.qr(torch.randn(3, 3))[0]
    n = int(batch["mask"][0].sum())
    perm = torch.randperm(n)
    moved = batch["pos"][:1, :n][:, perm] @ rotation.T + torch.tensor([1.0, -2.0, 3.0])
    torch.testing.assert_close(model({"types": batch["types"][:1, :n][:, perm], "pos": moved, "mask": batch["mask"][:1, :n]}),
                               model({k: batch[k][:1, :n] for k in ("types", "pos", "mask")}), atol=1e-4, rtol=1e-4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = objective.loss(model, batch).item()
    for _ in range(300):
        optimizer.zero_grad()
        loss = objective.loss(model, batch)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_the_size_only_baseline_draws_each_value_from_its_own_size():
    from models.condition_evaluation import size_matched_draw
    pool_sizes = np.array([3, 3, 5, 5, 5, 9])
    pool_values = pool_sizes * 100.0 + np.arange(6)  # each value names its size
    sizes = np.array([5, 3, 5, 7, 3, 9, 5])  # 7: no member of that size, drawn from the whole pool
    drawn = size_matched_draw(sizes, pool_values, pool_sizes, np.random.default_rng(0))
    assert all(v in pool_values for v in drawn)
    known = sizes != 7
    assert (drawn[known] // 100 == sizes[known]).all()
    many = size_matched_draw(np.full(2000, 7), pool_values, pool_sizes, np.random.default_rng(1))
    assert set(many) == set(pool_values)  # the fallback draws from every member


def test_the_oracle_trains_on_its_half_and_judges_conditional_samples(conditional_run, qm9_dir, tmp_path):
    oracle = tmp_path / "oracle"
    code, message = run("train.py", "--task", "oracle", "--condition", "alpha", "--preset", "tiny", "--iters", 6, "--data-dir", qm9_dir,
                        "--out", oracle)
    assert code == 0, message[-3000:]
    ckpt = load_checkpoint(oracle / "ckpt.pt", task="oracle")
    train = load_qm9("train", qm9_dir)
    assert ckpt["n_train"] == len(protocol_halves(len(train))["oracle"]) and ckpt["condition"]["half"] == "oracle"
    assert "val_mae_alpha" in (oracle / "log.jsonl").read_text()
    code, message = run("sample.py", "--ckpt", conditional_run / "ckpt.pt", "--n", 6, "--steps", 2, "--out", tmp_path / "s")
    assert code == 0, message[-3000:]
    code, message = run("evaluate.py", tmp_path / "s" / "samples.extxyz", "--data-dir", qm9_dir, "--no-fcd", "--no-progress",
                        "--oracle", oracle / "ckpt.pt")
    assert code == 0 and "| alpha | Bohr^3 | 6 |" in message, message[-3000:]
    scored = json.loads((tmp_path / "s" / "metrics.json").read_text())
    alpha = scored["condition"]["properties"]["alpha"]  # gap was requested too, but this oracle does not predict it
    assert set(scored["condition"]["properties"]) == {"alpha"} and "mol_stability" in scored
    from models.condition import Normalisation
    from models.condition_evaluation import predict
    from models.molecules import ATOMIC_NUMBERS
    from models.oracle import build_oracle
    half = train.subset(protocol_halves(len(train))["generator"])
    own = predict(build_oracle(ckpt)[0].eval(), [half[i] for i in range(len(half))], Normalisation.from_state(ckpt["condition"]),
                  "molecules", list(ATOMIC_NUMBERS))
    assert alpha["l_bound"] == pytest.approx(np.abs(own[:, 0] - half.property_values("alpha")).mean())
    assert alpha["n_generator_half"] == len(half) and all(np.isfinite(alpha[k]) for k in ("mae", "mae_se", "n_atoms", "u_bound"))
    assert alpha["n_atoms_sampled"] > alpha["n_atoms"]  # the median has no scatter; a size-only generator's draws do
    # the oracle's baselines alone, from the command line, beside EDM's published ones: the numbers evaluate.py gave
    code, message = run("-m", "models.condition_evaluation", oracle / "ckpt.pt", "--data-dir", qm9_dir)
    assert code == 0, message[-3000:]
    row = (f"| alpha | Bohr^3 | {alpha['l_bound']:.4g} (0.1) | {alpha['n_atoms']:.4g} (3.86) | {alpha['n_atoms_sampled']:.4g} | "
           f"{alpha['u_bound']:.4g} (9.01) |")
    assert row in message and f"on the {len(half):,} structures of the generator's half" in message, message[-3000:]
    # a structure with non-finite coordinates is left out of the MAE and counted
    frames = ase.io.read(tmp_path / "s" / "samples.extxyz", ":")
    frames[0].positions[0, 0] = float("nan")
    ase.io.write(tmp_path / "nan.extxyz", frames, format="extxyz")
    code, message = run("evaluate.py", tmp_path / "nan.extxyz", "--data-dir", qm9_dir, "--no-fcd", "--no-progress",
                        "--oracle", oracle / "ckpt.pt", "--json", tmp_path / "nan.json")
    assert code == 0, message[-3000:]
    with_nan = json.loads((tmp_path / "nan.json").read_text())["condition"]["properties"]["alpha"]
    assert (with_nan["n_samples"], with_nan["n_non_finite"]) == (5, 1)
    # a property the oracle does not predict: a clear error, naming the oracle
    code, message = run("evaluate.py", tmp_path / "s" / "samples.extxyz", "--data-dir", qm9_dir, "--no-fcd", "--no-progress",
                        "--oracle", oracle / "ckpt.pt", "--condition", "gap")
    assert code == 1 and "predicts alpha, not gap" in message and "Traceback" not in message, message[-3000:]
    # molecules that requested nothing (an unconditional model's): a clear error, naming the file
    plain = tmp_path / "plain.extxyz"
    plain.write_text("3\nProperties=species:S:1:pos:R:3\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    code, message = run("evaluate.py", plain, "--data-dir", qm9_dir, "--no-fcd", "--no-progress", "--oracle", oracle / "ckpt.pt")
    assert code == 1 and f"{plain}: the structures request none of the properties" in message, message[-3000:]
    # the generator half's predictions are cached under the oracle file's hash, and read back: a cache that holds the
    # truth gives an L-bound of 0
    from models.condition_evaluation import score_condition
    from models.fileio import git_blob_sha1, save_npz
    cache = qm9_dir / f"oracle_qm9_train_{git_blob_sha1(oracle / 'ckpt.pt')[:16]}_generator_half.npz"
    assert cache.is_file() and np.load(cache)["predictions"][:, 0] == pytest.approx(own[:, 0])
    save_npz(cache, {"predictions": half.property_values("alpha")[:, None]})
    try:
        assert score_condition(tmp_path / "s" / "samples.extxyz", oracle / "ckpt.pt", ckpt, None, qm9_dir)["properties"]["alpha"]["l_bound"] == 0
    finally:
        cache.unlink()


def test_a_conditional_crystal_run_trains_on_its_half_and_samples_the_protocols_pairs(tmp_path):
    """perov-5's heat_ref, on the fixture's 64 validation-split crystals (--train-split val holds 5 % of them out)."""
    (tmp_path / "data" / "cdvae" / "perov_5").mkdir(parents=True)
    (tmp_path / "data" / "cdvae" / "perov_5" / "val.csv").write_bytes((ROOT / "tests" / "data" / "perov5_val_sample.csv").read_bytes())
    code, message = run("train.py", "--preset", "tiny", "--data", "perov5", "--train-split", "val", "--condition", "heat_ref",
                        "--iters", 4, "--eval-samples", 0, "--data-dir", tmp_path / "data", "--out", tmp_path / "run")
    assert code == 0, message[-3000:]
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert ckpt["condition"]["properties"] == ["heat_ref"] and ckpt["condition"]["units"] == ["eV/atom"]
    assert ckpt["n_train"] == len(ckpt["condition_pairs"]) < 64
    code, message = run("sample.py", "--ckpt", tmp_path / "run" / "ckpt.pt", "--n", 6, "--steps", 2, "--out", tmp_path / "s")
    assert code == 0, message[-3000:]
    pairs = {(int(n), round(float(v), 4)) for n, v in ckpt["condition_pairs"].tolist()}
    for atoms in ase.io.read(tmp_path / "s" / "samples.extxyz", ":"):
        assert (len(atoms), round(atoms.info["condition_heat_ref"], 4)) in pairs and atoms.pbc.all()


def test_crystal_properties_are_read_from_the_cdvae_columns(tmp_path):
    from models.crystals import read_cdvae_csv
    from models.fileio import DataError

    perov = read_cdvae_csv(ROOT / "tests" / "data" / "perov5_sample.csv", progress=False)
    carbon = read_cdvae_csv(ROOT / "tests" / "data" / "carbon24_sample.csv", progress=False)
    assert perov.property_values("heat_ref")[0] == pytest.approx(1.4383314936574307)
    assert carbon.property_values("energy_per_atom")[0] == pytest.approx(-154.546684)
    with pytest.raises(DataError, match="have no energy_per_atom"):  # perov-5 has no such column
        perov.property_values("energy_per_atom")
    bad = tmp_path / "bad.csv"  # the first record's heat_ref replaced by a word
    bad.write_text((ROOT / "tests" / "data" / "perov5_sample.csv").read_text().replace("1.4383314936574307", "hot", 1))
    with pytest.raises(DataError, match="bad.csv, lines 2-.*heat_ref is 'hot', not a finite number"):
        read_cdvae_csv(bad, progress=False)


# ----------------------------------------------------------------------------------------------
# Transfer between molecules and crystals (models/transfer.py, train.py --init-trunk)


@pytest.fixture(scope="module")
def molecule_transformer(qm9_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "qm9"
    code, message = run("train.py", "--preset", "tiny", "--arch", "transformer", "--iters", 3, "--eval-samples", 0,
                        "--data-dir", qm9_dir, "--out", out)
    assert code == 0, message[-3000:]
    return out / "ckpt.pt"


def test_a_crystal_model_starts_from_a_molecule_models_trunk_and_shared_elements(molecule_transformer):
    from models.transfer import transfer_weights

    source = load_checkpoint(molecule_transformer)
    molecule = build_model(source)[0].state_dict()
    cls = get_domain("perov5").arch_class("transformer")
    symbols = ["Ba", "N", "O", "Ti", "F"]
    torch.manual_seed(1)
    crystal = cls(cls.Config(n_types=len(symbols), hidden=32, n_layers=2))
    before = {k: v.clone() for k, v in crystal.state_dict().items()}
    message = transfer_weights(source, molecule_transformer, crystal, "transformer", symbols)
    after = crystal.state_dict()
    assert "3 elements both vocabularies hold (N, O, F)" in message
    for name in after:
        if name.startswith("blocks.") or name.startswith("head.weight."):
            assert torch.equal(after[name], molecule[name]), name
        if name.startswith(("embed.pair_from_geometry", "head.lattice", "head.own")):  # the crystal's own parts stay new
            assert torch.equal(after[name], before[name]), name
    for i, s in enumerate(symbols):  # by element: N O F from QM9's H C N O F, Ba and Ti new
        j = list(source["atom_symbols"]).index(s) if s in source["atom_symbols"] else None
        column = after["embed.atom.weight"][:, i]
        assert torch.equal(column, molecule["embed.atom.weight"][:, j] if j is not None else before["embed.atom.weight"][:, i])
        assert torch.equal(after["head.types.1.weight"][i], molecule["head.types.1.weight"][j] if j is not None
                           else before["head.types.1.weight"][i])


def test_init_trunk_trains_across_domains_and_refuses_what_does_not_fit(molecule_transformer, tmp_path):
    (tmp_path / "data" / "cdvae" / "perov_5").mkdir(parents=True)
    (tmp_path / "data" / "cdvae" / "perov_5" / "val.csv").write_bytes((ROOT / "tests" / "data" / "perov5_val_sample.csv").read_bytes())
    common = ["train.py", "--preset", "tiny", "--data", "perov5", "--train-split", "val", "--iters", 2, "--eval-samples", 0,
              "--data-dir", tmp_path / "data", "--init-trunk", molecule_transformer]
    code, message = run(*common, "--arch", "transformer", "--out", tmp_path / "ok")
    assert code == 0 and "from the EMA weights of" in message and "(molecules, qm9, step 3)" in message, message[-3000:]
    code, message = run(*common, "--arch", "transformer", "--hidden", 48, "--out", tmp_path / "wide")
    assert code == 1 and "--init-trunk" in message and "give the trunk's size (--hidden 32 --n-layers 2)" in message, message[-3000:]
    code, message = run(*common, "--arch", "gnn", "--out", tmp_path / "gnn")
    assert code == 1 and "only the transformer and pairformer share a trunk" in message and "Traceback" not in message, message[-3000:]


def test_a_crystal_oracle_judges_conditional_crystals(tmp_path):
    """perov-5's heat_ref end to end: the generator and the oracle on the two halves of the fixture's training crystals,
    evaluate.py --oracle on the generator's samples; an oracle of another data set is refused."""
    (tmp_path / "data" / "cdvae" / "perov_5").mkdir(parents=True)
    (tmp_path / "data" / "cdvae" / "perov_5").joinpath("val.csv").write_bytes((ROOT / "tests" / "data" / "perov5_val_sample.csv").read_bytes())
    for split in ("train", "test"):  # what evaluate.py's crystal metrics read: the fixture's seven crystals
        (tmp_path / "data" / "cdvae" / "perov_5" / f"{split}.csv").write_bytes((ROOT / "tests" / "data" / "perov5_sample.csv").read_bytes())
    common = ["--preset", "tiny", "--data", "perov5", "--train-split", "val", "--condition", "heat_ref", "--iters", 4,
              "--data-dir", tmp_path / "data"]
    for task, out in (("gen", "generator"), ("oracle", "oracle")):
        code, message = run("train.py", "--task", task, *common, "--eval-samples", 0, "--out", tmp_path / out)
        assert code == 0, message[-3000:]
    generator, oracle = load_checkpoint(tmp_path / "generator" / "ckpt.pt"), load_checkpoint(tmp_path / "oracle" / "ckpt.pt", task="oracle")
    from types import SimpleNamespace
    train, _ = get_domain("perov5").splits(SimpleNamespace(train_split="val", data_dir=tmp_path / "data"), progress=False)
    halves = protocol_halves(len(train))  # the fixture's crystals less the 5 % held out for validation, in two halves
    assert (generator["n_train"], oracle["n_train"]) == (len(halves["generator"]), len(halves["oracle"]))
    code, message = run("sample.py", "--ckpt", tmp_path / "generator" / "ckpt.pt", "--n", 5, "--steps", 2, "--out", tmp_path / "s")
    assert code == 0, message[-3000:]
    code, message = run("evaluate.py", tmp_path / "s" / "samples.extxyz", "--data", "perov5", "--data-dir", tmp_path / "data",
                        "--no-coverage", "--no-progress", "--workers", 1, "--oracle", tmp_path / "oracle" / "ckpt.pt")
    assert code == 0 and "| heat_ref | eV/atom | 5 |" in message, message[-3000:]
    heat = json.loads((tmp_path / "s" / "metrics.json").read_text())["condition"]["properties"]["heat_ref"]
    assert heat["n_generator_half"] == generator["n_train"] and all(np.isfinite(heat[k]) for k in ("mae", "l_bound", "n_atoms", "u_bound"))
    code, message = run("evaluate.py", tmp_path / "s" / "samples.extxyz", "--data", "carbon24", "--data-dir", tmp_path / "data",
                        "--no-coverage", "--no-progress", "--oracle", tmp_path / "oracle" / "ckpt.pt")
    assert code == 1 and "is an oracle of perov5, and the samples are scored as carbon24" in message, message[-3000:]


@pytest.mark.parametrize("data", ["qm9", "perov5"])
def test_a_conditional_model_widened_from_an_unconditional_one_starts_as_it(data):
    """--init-from an unconditional checkpoint with --condition: the embedding gains the condition's inputs with zero
    weights, so the new model's outputs are the source's, whatever the condition asked."""
    from models.transfer import conditional_from_unconditional

    domain = get_domain(data)
    arch_cls, proc_cls = domain.arch_class("transformer"), domain.process_class("flow")
    torch.manual_seed(0)
    n_types = 5 if data == "qm9" else 4
    extra = {"self_condition": True, "time_frequencies": 2} if data == "qm9" else {}
    source = arch_cls(arch_cls.Config(n_types=n_types, hidden=32, n_layers=2, **extra)).eval()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"domain": domain.kind, "data": data, "arch": "transformer", "gen": "flow", "step": 1, "model_config": asdict(source.config),
            "process_config": asdict(proc_cls.Config(n_types=n_types)), "ema": source.state_dict()}
    model, process = conditional_from_unconditional(ckpt, "source.pt", 2, 0.1)
    model.eval()
    assert model.config.n_conditions == 2 and process.config.condition_dropout == 0.1
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(5)[None] < torch.tensor([5, 3])[:, None]
    h, t = torch.randn(2, 5, n_types, generator=g), torch.rand(2, generator=g)
    if data == "qm9":
        inputs = (h, torch.randn(2, 5, 3, generator=g), t, mask)
    else:
        inputs = (h, torch.rand(2, 5, 3, generator=g), torch.full((2, 3), 4.0), torch.full((2, 3), 90.0), t, mask)
    want = source(*inputs)
    for condition in (None, torch.tensor([[1.0, -2.0], [0.5, 3.0]])):
        got = model(*inputs, **({} if condition is None else {"condition": condition}))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_chgnet_judges_carbon24_energies_beside_the_oracle(tmp_path):
    """carbon-24's energy per atom gets a second judge: CHGNet, shifted to the data's energy zero on the oracle's half.
    Scored on the generator half's own crystals, each requesting its own energy, CHGNet's MAE is its L-bound (the same
    crystals and values), and the offset bridges CASTEP's zero (about -154 eV/atom) and CHGNet's (about -9)."""
    from ase import Atoms

    from models.condition_evaluation import score_condition, training_halves

    (tmp_path / "data" / "cdvae" / "carbon_24").mkdir(parents=True)
    (tmp_path / "data" / "cdvae" / "carbon_24" / "val.csv").write_bytes((ROOT / "tests" / "data" / "carbon24_sample.csv").read_bytes())
    code, message = run("train.py", "--task", "oracle", "--preset", "tiny", "--data", "carbon24", "--train-split", "val",
                        "--condition", "energy_per_atom", "--iters", 2, "--batch-size", 2, "--data-dir", tmp_path / "data",
                        "--out", tmp_path / "oracle")
    assert code == 0, message[-3000:]
    oracle = load_checkpoint(tmp_path / "oracle" / "ckpt.pt", task="oracle")
    generator, _ = training_halves(oracle, tmp_path / "data")
    values = generator.property_values("energy_per_atom")
    frames = []
    for (numbers, frac, lengths, angles), value in zip(generator.arrays(), values):
        atoms = Atoms(numbers=numbers, scaled_positions=frac, cell=[*lengths, *angles], pbc=True)
        atoms.info["condition_energy_per_atom"] = float(value)
        frames.append(atoms)
    ase.io.write(tmp_path / "samples.extxyz", frames)
    result = score_condition(tmp_path / "samples.extxyz", tmp_path / "oracle" / "ckpt.pt", oracle, None, tmp_path / "data")
    energy = result["properties"]["energy_per_atom"]
    assert energy["chgnet_failed"] == 0 and -150 < energy["chgnet_offset"] < -140
    # the same crystals, up to the rounding of their trip through the extxyz file: CHGNet's energies of them agree to
    # about 1e-9 on one CPU and 2e-5 on another (AVX2 against AVX-512 kernels), a misaligned value or offset by far more
    assert energy["chgnet_mae"] == pytest.approx(energy["chgnet_l_bound"], rel=1e-3)
    assert 0 < energy["chgnet_mae"] < 1.0 and np.isfinite(energy["mae"])


def test_xtb_judges_qm9_electronic_properties_beside_the_oracle(tmp_path):
    """gap and mu get a second judge: GFN2-xTB, mapped to QM9's values by a line fitted on the oracle's half. Scored on
    the generator half's own molecules, each requesting its own values, xtb's MAE is its L-bound and the judges lie as
    far apart on the samples as on real molecules. xtb's gap (read from its orbital occupations) and dipole follow
    the data's closely on real molecules; a judge that read the wrong orbitals would not. The fixture's first 120
    molecules (46 in each half), since xtb relaxes every molecule it judges."""
    from ase import Atoms

    from conftest import QM9_FIXTURE
    from models.molecules import read_qm9pack_csv, save_cache

    from models.condition import Normalisation
    from models.condition_evaluation import predict, score_condition, training_halves, xtb_properties
    from models.molecules import ATOMIC_NUMBERS
    from models.oracle import build_oracle

    qm9_dir = tmp_path / "qm9"
    qm9_dir.mkdir()
    (qm9_dir / "first.csv").write_text("".join(QM9_FIXTURE.read_text().splitlines(keepends=True)[:121]))
    save_cache(read_qm9pack_csv([qm9_dir / "first.csv"]), qm9_dir / "qm9.npz")
    code, message = run("train.py", "--task", "oracle", "--condition", "gap", "mu", "--preset", "tiny", "--iters", 4,
                        "--data-dir", qm9_dir, "--out", tmp_path / "oracle")
    assert code == 0, message[-3000:]
    oracle = load_checkpoint(tmp_path / "oracle" / "ckpt.pt", task="oracle")
    generator, _ = training_halves(oracle, qm9_dir)
    frames = []
    for i in range(len(generator)):
        numbers, positions = generator[i]
        atoms = Atoms(numbers=numbers, positions=positions)
        atoms.info.update(condition_gap=float(generator.property_values("gap")[i]), condition_mu=float(generator.property_values("mu")[i]))
        frames.append(atoms)
    ase.io.write(tmp_path / "samples.extxyz", frames)
    molecules = [(a.numbers, a.positions) for a in ase.io.read(tmp_path / "samples.extxyz", ":")]
    result = score_condition(tmp_path / "samples.extxyz", tmp_path / "oracle" / "ckpt.pt", oracle, None, qm9_dir)["properties"]
    for name, least_corr in (("gap", 0.8), ("mu", 0.95)):
        judged = result[name]
        assert judged["xtb_failed"] == 0 and judged["xtb_corr_reference"] > least_corr
        assert judged["xtb_mae"] == pytest.approx(judged["xtb_l_bound"], rel=1e-6)  # extxyz rounds the positions
        assert judged["judges_apart_samples"] == pytest.approx(judged["judges_apart_real"], rel=1e-4)
        assert judged["xtb_n_stable"] > 0.9 * len(frames) and abs(judged["xtb_bias"]) < judged["xtb_mae"]
        said = predict(build_oracle(oracle)[0].eval(), molecules, Normalisation.from_state(oracle["condition"]), "molecules",
                       list(ATOMIC_NUMBERS))[:, ["gap", "mu"].index(name)]
        assert judged["oracle_bias"] == pytest.approx(np.mean(said - generator.property_values(name)), rel=1e-4, abs=1e-6)
    assert result["gap"]["xtb_mae"] < 0.7 * np.abs(generator.property_values("gap") - np.median(generator.property_values("gap"))).mean()
    # two atoms on top of each other: xtb fails on that molecule alone, which is counted
    assert np.isnan(xtb_properties([(np.array([6, 6]), np.zeros((2, 3))), generator[0]])).tolist()[0] == [True] * 4


def test_within_size_response_reads_conditioning_beyond_size():
    """A judged property that follows half of each request beyond its size's mean has slope 0.5 and correlation 1;
    one that is a function of size alone (the #Atoms baseline's) has slope 0, whatever the size effect."""
    from models.condition_evaluation import within_size_response

    rng = np.random.default_rng(0)
    n_atoms = rng.integers(9, 20, 400)
    asked = 3.0 * n_atoms + rng.normal(0, 2, 400)
    follows = within_size_response(asked, 0.5 * asked + 10.0 * n_atoms, n_atoms)
    assert follows["within_size_slope"] == pytest.approx(0.5) and follows["within_size_corr"] == pytest.approx(1.0)
    by_size = within_size_response(asked, 3.0 * n_atoms + np.sin(n_atoms), n_atoms)
    assert by_size["within_size_slope"] == pytest.approx(0.0, abs=1e-12) and np.isnan(by_size["within_size_corr"])
    noisy = within_size_response(asked, 0.5 * asked + rng.normal(0, 4, 400), n_atoms)
    assert 0.3 < noisy["within_size_slope"] < 0.7 and 0 < noisy["within_size_corr"] < 0.5
    assert np.isnan(within_size_response(np.ones(3), np.arange(3.0), np.array([9, 10, 11]))["within_size_slope"])
