"""One model trained on molecules and crystals at once (train.py --task joint --data qm9 perov5): both domains run
through one trunk, with one element vocabulary.

The model is two backbones of one arch, one per data set (the first --data set is part 0), built as
single-domain runs build them, whose shared modules are the same module objects:
  - the trunk and the heads' shared parts, models/transfer.py's SHARED_PREFIXES (attention blocks, the
    pair-from-atoms maps, the displacement's pair-weight MLP, the type head's norm), which --init-trunk copies;
  - the elements both vocabularies hold (N, O and F between QM9 and perov-5, C between QM9 and carbon-24): part 1's type-embedding
    column and type-logit row of such an element are part 0's (a parametrisation, so the gradients of both
    domains reach one tensor), while the elements one domain alone has keep their own.
What stays each domain's own is what --init-trunk leaves new: the geometry and time embeddings, and the crystal
heads of the lattice and of each atom's own shift.

Training alternates batches: step s trains part s mod 2 on a batch of its own data set (each set with its own
size-grouped schedule, each with its own process: molecules and crystals do not mix in a batch). The validation
record holds both domains' losses and quick checks, each key prefixed with its data set. A finished run also
writes each domain's EMA model alone as a standard checkpoint (OUT/weights_<data>.pt), which sample.py and
evaluate.py read like any other.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.utils.parametrize as parametrize
from torch import nn

from models.transfer import SHARED_PREFIXES, TYPE_COLUMNS, TYPE_ROWS


class SharedElements(nn.Module):
    """Parametrisation of part 1's type weights W: the slices of the shared elements (`mine`, along `dim`) are
    part 0's at `theirs`. The source module sits in a list, so it is not a submodule (its weights are part 0's,
    saved once, under part 0) and a deep copy (the EMA) points at the copy's part 0."""

    def __init__(self, source: nn.Module, name: str, mine: list[int], theirs: list[int], dim: int):
        super().__init__()
        self._source, self.name, self.dim = [source], name, dim
        self.register_buffer("mine", torch.tensor(mine, dtype=torch.long), persistent=False)
        self.register_buffer("theirs", torch.tensor(theirs, dtype=torch.long), persistent=False)

    def forward(self, weight):
        shared = getattr(self._source[0], self.name).index_select(self.dim, self.theirs)
        return weight.index_copy(self.dim, self.mine, shared.to(weight.dtype))


@dataclass
class JointConfig:
    parts: list = field(default_factory=list)  # each part's backbone config (a dict)
    symbols: list = field(default_factory=list)  # each part's element vocabulary


@dataclass
class JointProcessConfig:
    parts: list = field(default_factory=list)  # each part's process config (a dict)


def _module(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(parent module, attribute) of a dotted path such as "head.types.1.weight"."""
    *parents, name = path.split(".")
    for p in parents:
        root = getattr(root, p)
    return root, name


def shared_modules(model: nn.Module) -> list[str]:
    """The dotted names of the model's shared submodules: the shortest module paths under SHARED_PREFIXES."""
    names = []
    for name, _ in model.named_modules():
        if name and (name + ".").startswith(SHARED_PREFIXES) and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


class JointBackbone(nn.Module):
    """parts[i]: data set i's backbone; part 1 runs through part 0's trunk, shared heads and shared elements'
    type weights (module docstring). forward(i, ...) is part i's forward (so torch.compile of the whole model
    compiles both)."""

    def __init__(self, parts: list[nn.Module], symbols: list[list[str]]):
        super().__init__()
        if len(parts) != 2:
            raise ValueError(f"a joint model has two parts, not {len(parts)}")
        self.parts = nn.ModuleList(parts)
        self.config = JointConfig([asdict(p.config) for p in parts], [list(s) for s in symbols])
        first, second = parts
        for name in shared_modules(first):
            mine, theirs = _module(second, name), _module(first, name)
            if [p.shape for p in getattr(*mine).parameters()] != [p.shape for p in getattr(*theirs).parameters()]:
                raise ValueError(f"the parts' {name} differ in shape: the trunk needs one size in both domains")
            setattr(mine[0], mine[1], getattr(*theirs))
        pairs = [(i, symbols[0].index(s)) for i, s in enumerate(symbols[1]) if s in symbols[0]]
        if pairs:
            mine, theirs = [i for i, _ in pairs], [j for _, j in pairs]
            for path, dim in ((TYPE_COLUMNS, 1), *((name, 0) for name in TYPE_ROWS)):
                (target, attr), (source, source_attr) = _module(second, path), _module(first, path)
                parametrize.register_parametrization(target, attr, SharedElements(source, source_attr, mine, theirs, dim))
        self.shared_elements = [symbols[1][i] for i, _ in pairs]

    def forward(self, part: int, *inputs, **options):
        return self.parts[part](*inputs, **options)

    def part_state(self, i: int) -> dict[str, torch.Tensor]:
        """Part i's weights as a standalone backbone's state dict (shared ones included, parametrisations applied)."""
        state = {}
        for name, tensor in self.parts[i].state_dict().items():
            if ".parametrizations." in name:
                if not name.endswith(".original"):
                    continue
                name = name.replace(".parametrizations.", ".").removesuffix(".original")
                parent, attr = _module(self.parts[i], name)
                tensor = getattr(parent, attr)
            state[name] = tensor.detach().clone()
        return state


class JointProcess:
    """The parts' processes side by side: the noise of both is drawn every step (a few small tensors), so a step's
    inputs depend on (seed, step) alone whichever part it trains, and the loss is the part's own."""

    def __init__(self, processes: list):
        self.processes = processes
        self.config = JointProcessConfig([asdict(p.config) for p in processes])

    def draw_noise(self, batch_size: int, n_max: int, generator: torch.Generator | None = None, device="cpu") -> dict:
        return {f"{i}.{k}": v for i, p in enumerate(self.processes) for k, v in p.draw_noise(batch_size, n_max, generator, device).items()}

    def loss(self, model: JointBackbone, batch: dict, noise: dict) -> torch.Tensor:
        i = batch["part"]
        own = {k.split(".", 1)[1]: v for k, v in noise.items() if k.startswith(f"{i}.")}
        return self.processes[i].loss(functools.partial(model, i), {k: v for k, v in batch.items() if k != "part"}, own)


def part_of(idx: torch.Tensor, offsets: list[int]) -> int:
    """The part whose rows of the joint index space (parts end to end, starting at `offsets`) the batch idx holds."""
    return int(idx[0] >= offsets[1])


class JointSet:
    """The parts' training (or validation) sets end to end: index i < len(sets[0]) is part 0's, the rest part 1's.
    A batch holds one part's structures only, with "part" naming it."""

    def __init__(self, sets: list):
        self.sets = sets
        self.offsets = [0, len(sets[0])]

    def __len__(self) -> int:
        return sum(len(s) for s in self.sets)

    def batch(self, idx: torch.Tensor, device, width: int | None = None) -> dict:
        part = part_of(idx, self.offsets)
        local = idx - self.offsets[part]
        if not bool(((local >= 0) & (local < len(self.sets[part]))).all()):
            raise ValueError("a joint batch mixes the two data sets")
        return {"part": part, **self.sets[part].batch(local, device, width=width)}


class AlternatingSchedule:
    """Step s is part s mod 2's step s // 2 of its own schedule (models/training.py's BatchSchedule), its indices
    shifted into the JointSet; the answers train.py asks a schedule for, over both parts."""

    def __init__(self, schedules: list, offsets: list[int]):
        self.schedules, self.offsets = schedules, offsets

    def indices(self, step: int) -> torch.Tensor:
        part = step % len(self.schedules)
        return self.schedules[part].indices(step // len(self.schedules)) + self.offsets[part]

    def width(self, idx: torch.Tensor) -> int | None:
        part = part_of(idx, self.offsets)
        return self.schedules[part].width(idx - self.offsets[part])

    def epoch_widths(self) -> torch.Tensor:
        return torch.cat([s.epoch_widths() for s in self.schedules])


def build_joint(ckpt: dict, weights: str = "ema"):
    """(JointBackbone, JointProcess) of a joint checkpoint; weights 'ema' or 'model'."""
    from models.checkpoint import _load_weights, config_from_dict
    from models.domains import domain_of

    models, processes = [], []
    for part, config in zip(ckpt["parts"], ckpt["model_config"]["parts"]):
        domain = domain_of(part)
        arch_cls, proc_cls = domain.arch_class(part["arch"]), domain.process_class(part["gen"])
        models.append(arch_cls(config_from_dict(arch_cls.Config, config)))
        processes.append(proc_cls(config_from_dict(proc_cls.Config, part["process_config"])))
    model = _load_weights(JointBackbone(models, ckpt["model_config"]["symbols"]), ckpt, weights, f"joint {ckpt['arch']}")
    return model, JointProcess(processes)


def part_checkpoint(state: dict, model: JointBackbone, i: int) -> dict:
    """Part i of a joint checkpoint dict (train.py's state, `model` its EMA backbone) as a standard generative
    checkpoint of its data set, EMA weights only (models/checkpoint.py's export_weights format): sample.py,
    evaluate.py and --init-from / --init-trunk read it like any single-domain run's."""
    part, weights = state["parts"][i], model.part_state(i)
    args = {**state["args"], "task": "gen", "data": part["data"]}
    return {"task": "gen", "step": state["step"], "model_config": state["model_config"]["parts"][i], **part,
            "n_params": sum(t.numel() for t in weights.values()), "args": args,
            "joint": {"data": state["args"]["data"], "shared_elements": model.shared_elements},
            "ema": weights, "run_seconds": state["run_seconds"]}
