"""The domain objects the scripts ask (models/domains.py), the one process contract (models/process.py), and what
follows from them: older checkpoints filled in once at load, the vocabulary scale.py counts equal to the one
train.py builds, label.py --generate on a crystal checkpoint."""
import argparse
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import fill_older_defaults, load_checkpoint, save_checkpoint
from models.domains import CRYSTAL_DATA, Crystals, Molecules, domain_of, get_domain

ROOT = Path(__file__).resolve().parents[1]
PEROV_TEST = ROOT / "tests" / "data" / "perov5_sample.csv"
PEROV_VAL = ROOT / "tests" / "data" / "perov5_val_sample.csv"


def test_every_data_set_has_its_domain_and_unknown_names_are_refused():
    assert isinstance(get_domain("qm9"), Molecules)
    assert all(isinstance(get_domain(name), Crystals) and get_domain(name).name == name for name in CRYSTAL_DATA)
    with pytest.raises(ValueError, match="unknown data set 'qm10'"):
        get_domain("qm10")
    with pytest.raises(KeyError, match="unknown backbone 'mace' for molecules"):
        get_domain("qm9").arch_class("mace")


def test_each_domain_refuses_the_other_kinds_flags_only():
    assert set(get_domain("qm9").foreign_flags()) == set(Crystals.FLAGS) - set(Molecules.FLAGS) == {"csp", "train_split", "max_atoms", "lattice_per_atom"}
    assert set(get_domain("perov5").foreign_flags()) == set(Molecules.FLAGS) - set(Crystals.FLAGS)
    assert {"condition", "condition_dropout"} <= set(Molecules.FLAGS) & set(Crystals.FLAGS)  # both domains condition


def test_both_domains_name_the_same_backbones_and_processes_with_their_own_classes():
    molecules, crystals = get_domain("qm9"), get_domain("carbon24")
    assert set(molecules.ARCHS) == set(crystals.ARCHS) and set(molecules.PROCESSES) == set(crystals.PROCESSES)
    for gen in molecules.PROCESSES:
        mol_cls, cry_cls = molecules.process_class(gen), crystals.process_class(gen)
        assert mol_cls is not cry_cls and mol_cls.CHECK_SAMPLER in mol_cls.SAMPLERS and cry_cls.CHECK_SAMPLER in cry_cls.SAMPLERS


def test_a_checkpoint_from_before_domains_is_filled_in_once_at_load(tmp_path):
    """A molecule checkpoint written before crystals has no domain or data, and flags from before size batching,
    time features, self-conditioning, --train-split, --distance-loss, --min-one-minus-t, --condition,
    --discrete-types and --lattice-per-atom: load_checkpoint gives it what it did then."""
    from models.egnn import EGNN, EGNNConfig
    from models.molecule_flow import FlowConfig

    model = EGNN(EGNNConfig(hidden=8, n_layers=1))
    save_checkpoint(tmp_path / "old.pt", {"arch": "gnn", "gen": "flow", "step": 3, "model_config": asdict(model.config),
                                         "process_config": asdict(FlowConfig()), "atom_symbols": list("HCNOF"),
                                         "n_atoms_hist": [0, 1.0], "ema": model.state_dict(), "args": {"lr": 1e-3}})
    ckpt = load_checkpoint(tmp_path / "old.pt")
    assert ckpt["domain"] == "molecules" and ckpt["data"] == "qm9" and isinstance(domain_of(ckpt), Molecules)
    assert ckpt["args"] == {"lr": 1e-3, "batching": "random", "time_frequencies": 0, "self_condition": False,
                            "train_split": "train", "distance_loss": 0.0, "min_one_minus_t": None, "condition": None,
                            "condition_dropout": 0.1, "init_trunk": None, "discrete_types": False, "lattice_per_atom": False}
    newer = {"task": "gen", "domain": "crystals", "data": "perov5", "args": {"batching": "size", "time_frequencies": 2,
                                                                             "self_condition": False, "train_split": "val",
                                                                             "distance_loss": 0.0, "min_one_minus_t": None,
                                                                             "condition": None, "condition_dropout": 0.0,
                                                                             "init_trunk": None, "discrete_types": False,
                                                                             "lattice_per_atom": True}}
    before = {**newer, "args": dict(newer["args"])}
    fill_older_defaults(newer)  # what a checkpoint holds is never overwritten
    assert newer == before and domain_of(newer).name == "perov5"


@pytest.mark.parametrize("gen", ["flow", "diffusion", "interpolant"])
def test_process_contract_refuses_other_requests_samplers_and_options(gen):
    molecules, crystals = get_domain("qm9"), get_domain("perov5")
    mol = molecules.process_class(gen)(molecules.process_class(gen).Config())
    cry = crystals.process_class(gen)(crystals.process_class(gen).Config(n_types=3))
    model = molecules.arch_class("gnn")(molecules.arch_class("gnn").Config(hidden=8, n_layers=1))
    with pytest.raises(ValueError, match="request of atom counts"):
        mol.sample(model, {"types": torch.zeros(1, 2, dtype=torch.long), "mask": torch.ones(1, 2, dtype=bool)}, 2, mol.SAMPLERS[0])
    with pytest.raises(ValueError, match="unknown sampler 'leapfrog'"):
        mol.check_sampling("leapfrog")
    with pytest.raises(ValueError, match="has no sampler option anneal_slope"):
        mol.check_sampling(mol.SAMPLERS[0], {"time_power": 2.0, "anneal_slope": 5.0})
    if gen == "diffusion":  # a stochastic sampler has no velocity to anneal
        with pytest.raises(ValueError, match="has no sampler option anneal_slope"):
            cry.check_sampling("ode", {"anneal_slope": 5.0})
    else:
        cry.check_sampling(cry.SAMPLERS[0], {"anneal_slope": 5.0})
    crystal_model = crystals.arch_class("gnn")(crystals.arch_class("gnn").Config(n_types=3, hidden=8, n_layers=1))
    with pytest.raises(ValueError, match=r"de novo crystal model samples for a request of \['n_atoms'\]"):
        cry.sample(crystal_model, {"types": torch.zeros(1, 2, dtype=torch.long), "mask": torch.ones(1, 2, dtype=bool)}, 2,
                   cry.SAMPLERS[0])


@pytest.fixture()
def perov_dir(tmp_path) -> Path:
    """perov-5's first test rows as the training split and 64 validation rows: the validation set holds elements
    the first training rows do not."""
    (tmp_path / "cdvae" / "perov_5").mkdir(parents=True)
    shutil.copy(PEROV_TEST, tmp_path / "cdvae" / "perov_5" / "train.csv")
    shutil.copy(PEROV_VAL, tmp_path / "cdvae" / "perov_5" / "val.csv")
    return tmp_path


def training_args(data_dir, **flags) -> argparse.Namespace:
    defaults = dict(data="perov5", train_split="train", data_dir=data_dir, n_train=None, val_size=64, csp=False, max_atoms=32,
                    arch="gnn", gen="flow", hidden=16, n_layers=2, time_frequencies=0, self_condition=False, time_tilt=0.0)
    return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.parametrize("flags", [{}, {"n_train": 2, "val_size": 3}, {"train_split": "val", "n_train": 5}])
def test_scale_counts_the_vocabulary_and_parameters_the_run_builds(perov_dir, flags):
    """scale.py matched widths on the whole training split's elements while train.py built its vocabulary from the
    cut training and validation sets: the counts could differ. Both now ask the domain for one vocabulary."""
    domain, args = get_domain("perov5"), training_args(perov_dir, **flags)
    data = domain.load_training(args, progress=False)
    train, valid = domain.splits(args, progress=False)
    assert domain.n_types(args) == data.n_types == len(set(train.elements()) | set(valid.elements()))
    if not flags:  # the validation set brings elements the training split lacks: the old count missed them
        assert data.n_types > len(train.elements())
    model, _ = domain.new_model(args, data)
    cls = domain.arch_class("gnn")
    built = cls(cls.Config(n_types=domain.n_types(args), hidden=16, n_layers=2, **domain.RECIPE))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in built.parameters())


def crystal_checkpoint(path: Path, csp: bool) -> None:
    domain = get_domain("perov5")
    proc_cls, cls = domain.process_class("flow"), domain.arch_class("gnn")
    torch.manual_seed(0)
    model = cls(cls.Config(n_types=3, hidden=16, n_layers=1))
    hist = np.zeros(6)
    hist[5] = 1.0
    save_checkpoint(path, {"domain": "crystals", "data": "perov5", "csp": csp, "arch": "gnn", "gen": "flow", "step": 0,
                           "model_config": asdict(model.config), "process_config": asdict(proc_cls.Config(n_types=3, csp=csp)),
                           "ema": model.state_dict(), "elements": [8, 22, 38], "atom_symbols": ["O", "Ti", "Sr"],
                           "n_atoms_hist": hist.tolist(), "args": {"train_split": "val"}})


def test_label_generate_samples_crystals_from_a_crystal_checkpoint_and_refuses_structure_prediction(tmp_path):
    """label.py --generate assumed a molecule checkpoint (a traceback on a crystal one): a de novo crystal model now
    generates crystals, and a structure-prediction model is refused with what to do instead."""
    import ase.io

    import label

    crystal_checkpoint(tmp_path / "denovo" / "ckpt.pt", csp=False)
    args = ["--generate", str(tmp_path / "denovo" / "ckpt.pt"), "--n-generate", "3", "--steps", "2", "--teacher", "emt",
            "--out", str(tmp_path / "labels.h5"), "--min-dist", "0", "--isolated-dist", "0", "--quiet", "--no-progress"]
    report = label.main(args)
    assert report["labelled"] + report["failed"] == 3
    generated = ase.io.read(next(tmp_path.glob("generated_denovo_*.extxyz")), ":")
    assert len(generated) == 3 and all(a.pbc.all() and len(a) == 5 for a in generated)
    crystal_checkpoint(tmp_path / "csp" / "ckpt.pt", csp=True)
    from models.labels import LabelsError
    with pytest.raises(LabelsError, match="structure-prediction model needs compositions"):
        label.main([*args[:1], str(tmp_path / "csp" / "ckpt.pt"), *args[2:8], "--out", str(tmp_path / "other.h5"), *args[10:]])
