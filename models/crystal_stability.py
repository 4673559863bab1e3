"""A stability proxy for generated crystals: CHGNet relaxation and the energy above a CHGNet convex hull.

DFT is out of reach here, so CHGNet (its weights ship in its wheel; it runs offline on a CPU) stands in for it,
as in DiffCSP++'s and MatterGen-style S.U.N. rates computed with a universal potential:
  - every sample is relaxed (positions and cell, FIRE, until the largest force is below `fmax` or `steps`
    are spent) and keeps CHGNet's energy per atom;
  - the hull is built from CHGNet energies of the data set's own crystals and of relaxed elemental phases. The
    data's crystals enter as single points at their DFT geometries (sound where those are ground states, as in
    MP-20) or, with evaluate.py --hull relaxed, relaxed as the samples are: perov-5's cubic perovskites lose a
    median 0.17 eV/atom on relaxation, so a single-point hull is too high there. Elemental phases are not in
    the CDVAE files, and offline there is no Materials Project, so each element's reference is the lowest
    energy per atom among relaxed prototypes built from its covalent radius: fcc, bcc, hcp, simple cubic,
    diamond, and a dimer in a 10 A box (the ground state of the gaseous and molecular elements). These are
    upper bounds on the true elemental energies, so a hull built on them can only be too high where a missed
    allotrope lies lower;
  - a crystal is stable when its energy above that hull is at most `threshold` (0.1 eV/atom by default, the
    metastability cut MatterGen uses; 0 is the strict hull).
S.U.N.: stable, unique and novel (models/crystal_metrics.py), over the same samples.

`chgnet_hull` builds the hull of a data split and caches its CHGNet energies in the data directory.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np

from models.bounded import Stopped, bounded_imap, describe
from models.crystal_metrics import NOT_WELL_FORMED, well_formed
from models.threads import one_torch_thread

_MODEL = None
DIMER_BOX = 10.0  # A: a dimer's distance to its images
FMAX = 0.1  # eV/A: a relaxation ends when no force is larger

log = logging.getLogger(__name__)


def _chgnet():
    """CHGNet, loaded once per process, on the CPU."""
    global _MODEL
    if _MODEL is None:
        from chgnet.model import CHGNet

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _MODEL = CHGNet.load(verbose=False)
    return _MODEL


def chgnet_version() -> str:
    from importlib.metadata import version

    return f"chgnet {version('chgnet')} model {getattr(_chgnet(), 'version', 'unknown')}"


def _structure(crystal):
    from pymatgen.core import Lattice, Structure

    numbers, frac, lengths, angles = crystal
    return Structure(Lattice.from_parameters(*lengths, *angles), [int(z) for z in numbers], frac)


def relax_one(job):
    """(crystal, steps, fmax) -> (relaxed crystal as arrays, energy per atom eV, FIRE steps, converged) or None when
    CHGNet fails on it (a degenerate cell, an isolated atom)."""
    import contextlib
    import io

    from chgnet.model import StructOptimizer

    crystal, steps, fmax = job
    try:
        with one_torch_thread(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            result = StructOptimizer(model=_chgnet(), use_device="cpu").relax(_structure(crystal), fmax=fmax, steps=steps,
                                                                           verbose=False)
    except Exception:
        return None
    final, trajectory = result["final_structure"], result["trajectory"]
    forces = np.abs(np.asarray(trajectory.forces[-1])).max() if len(trajectory.forces) else np.inf
    energy = float(trajectory.energies[-1]) / len(final)
    if not np.isfinite(energy):
        return None
    relaxed = (np.array(final.atomic_numbers), final.frac_coords % 1.0, np.array(final.lattice.abc), np.array(final.lattice.angles))
    return relaxed, energy, len(trajectory.energies), bool(forces <= fmax)


def _imap(fn, jobs: list, workers: int | None, progress: bool, desc: str, unit: str):
    """Yields fn(job) in order, computed on `workers` forked processes (in this process when 1). Forked before this
    process runs any torch computation, so no OpenMP pool is inherited half-initialised; CHGNet loads in each
    worker."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = dict(total=len(jobs), desc=desc, unit=unit, disable=not progress, mininterval=1)
    if workers == 1 or len(jobs) < 2:
        yield from (fn(j) for j in tqdm(jobs, **bar))
        return
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        yield from tqdm(pool.imap(fn, jobs), **bar)


def _map(fn, jobs: list, workers: int | None, progress: bool, desc: str, unit: str) -> list:
    return list(_imap(fn, jobs, workers, progress, desc, unit))


def relax_iter(crystals: list, steps: int = 500, fmax: float = FMAX, workers: int | None = None, progress: bool = True,
               desc: str = "CHGNet relaxation", seconds: float | None = None):
    """Yields (index, relax_one of crystals[index]) as each relaxation finishes, over `workers` processes (always
    forked, so that one can be stopped), so that a caller that saves as results arrive loses at most the
    relaxations in flight when it is stopped. A crystal that is not well formed is not relaxed (CHGNet's graph of
    a cell 1e-4 A thin never completes), and one that runs past `seconds` or whose process dies is stopped: these
    come as bounded.Stopped, naming why."""
    formed = [i for i, c in enumerate(crystals) if well_formed(c)]
    for i in sorted(set(range(len(crystals))) - set(formed)):
        yield i, Stopped(NOT_WELL_FORMED)
    if formed:
        _chgnet()  # loaded here once: every worker, and each one started in place of a stopped one, inherits it
    jobs = [(crystals[i], steps, fmax) for i in formed]
    for k, outcome in bounded_imap(relax_one, jobs, workers, seconds, progress, desc=desc, unit=" crystals"):
        yield formed[k], outcome


def relax(crystals: list, steps: int = 500, fmax: float = FMAX, workers: int | None = None, progress: bool = True,
          seconds: float | None = None) -> list:
    """relax_iter's outcomes in the order of the crystals."""
    out = [None] * len(crystals)
    for i, outcome in relax_iter(crystals, steps, fmax, workers, progress, seconds=seconds):
        out[i] = outcome
    return out


def _static_chunk(crystals: list) -> list[float]:
    model = _chgnet()
    with one_torch_thread(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            predictions = model.predict_structure([_structure(c) for c in crystals], task="e", batch_size=len(crystals))
            return [float(p["e"]) for p in (predictions if isinstance(predictions, list) else [predictions])]
        except Exception:  # one bad structure spoils a batch: score them one by one
            out = []
            for c in crystals:
                try:
                    out.append(float(model.predict_structure(_structure(c), task="e")["e"]))
                except Exception:
                    out.append(np.nan)
            return out


def static_energies(crystals: list, batch_size: int = 64, workers: int | None = None, progress: bool = True) -> np.ndarray:
    """CHGNet energy per atom (eV) of each crystal at its given geometry; NaN where CHGNet fails, and for a crystal
    that is not well formed, which CHGNet is not given (its graph need not be finite)."""
    formed = [i for i, c in enumerate(crystals) if well_formed(c)]
    chunks = [[crystals[i] for i in formed[lo:lo + batch_size]] for lo in range(0, len(formed), batch_size)]
    energies = np.full(len(crystals), np.nan)
    energies[formed] = [e for chunk in _map(_static_chunk, chunks, workers, progress, "CHGNet energies", " batches") for e in chunk]
    return energies


def element_prototypes(z: int) -> list[tuple[str, tuple]]:
    """Candidate elemental phases of element z as (name, crystal arrays), sized by its covalent radius."""
    from ase.build import bulk
    from ase.data import chemical_symbols, covalent_radii

    d = 2 * covalent_radii[z]  # nearest-neighbour distance
    symbol, out = chemical_symbols[z], []
    for name, kw in (("fcc", dict(a=d * 2 ** 0.5)), ("bcc", dict(a=2 * d / 3 ** 0.5)), ("hcp", dict(a=d, c=1.633 * d)),
                     ("sc", dict(a=d)), ("diamond", dict(a=4 * d / 3 ** 0.5))):
        atoms = bulk(symbol, name, **kw)
        cellpar = atoms.cell.cellpar()
        out.append((name, (atoms.numbers, atoms.get_scaled_positions() % 1.0, cellpar[:3], cellpar[3:])))
    frac = np.array([[0.0, 0.0, 0.0], [d / DIMER_BOX, 0.0, 0.0]])
    out.append(("dimer", (np.array([z, z]), frac, np.full(3, DIMER_BOX), np.full(3, 90.0))))
    return out


def elemental_references(elements: list[int], steps: int = 300, fmax: float = FMAX, workers: int | None = None,
                         progress: bool = True, seconds: float | None = None) -> dict[int, tuple[float, str]]:
    """{z: (lowest relaxed CHGNet energy per atom over the prototypes, its prototype's name)}, for the elements of
    which CHGNet relaxed at least one prototype (within `seconds` each); the caller's hull has no reference for the
    others, and a crystal that holds one of them has no energy above it."""
    jobs = [(z, name, crystal) for z in elements for name, crystal in element_prototypes(z)]
    results = relax([c for _, _, c in jobs], steps, fmax, workers, progress, seconds)
    best: dict[int, tuple[float, str]] = {}
    for (z, name, _), r in zip(jobs, results):
        if r is not None and not isinstance(r, Stopped) and (z not in best or r[1] < best[z][0]):
            best[z] = (r[1], name)
    return best


class Hull:
    """The convex hull of CHGNet energies of crystals (arrays, energies per atom) and elemental references, queried
    one chemical system at a time.

    One pymatgen PhaseDiagram over a whole data set's elements (56 for perov-5, 89 for MP-20) would be a convex hull
    in 55+ dimensions, which qhull cannot build in any useful time or memory. A composition's energy above the hull
    depends only on the entries whose elements are a subset of its own, so each query builds the small diagram of
    its chemical system (a few elements, a few dozen entries) and keeps it for the next query of that system."""

    def __init__(self, crystals: list, energies: np.ndarray, references: dict[int, tuple[float, str]]):
        from collections import Counter

        from pymatgen.analysis.phase_diagram import PDEntry
        from pymatgen.core import Composition, Element

        self.entries = [PDEntry(Composition({Element.from_Z(z): 1}), e) for z, (e, _) in references.items()]
        for crystal, e in zip(crystals, energies):
            if np.isfinite(e):
                composition = Composition(Counter(int(z) for z in crystal[0]))
                self.entries.append(PDEntry(composition, e * composition.num_atoms))
        self.entry_elements = [frozenset(el.Z for el in e.composition.elements) for e in self.entries]
        self.elements = {int(z) for z in references}
        self.diagrams = {}  # frozenset of atomic numbers -> PhaseDiagram
        self.not_relaxed: dict[str, int] = {}  # chgnet_hull's relaxed hull: {reason: count} of the crystals it could not relax

    def above(self, crystal, energy_per_atom: float) -> float:
        """E_hull in eV/atom of a crystal with this energy per atom; NaN when one of its elements has no reference."""
        from collections import Counter

        from pymatgen.analysis.phase_diagram import PDEntry, PhaseDiagram
        from pymatgen.core import Composition

        counts = Counter(int(z) for z in crystal[0])
        system = frozenset(counts)
        if not system <= self.elements:
            return float("nan")
        if system not in self.diagrams:
            self.diagrams[system] = PhaseDiagram([e for e, els in zip(self.entries, self.entry_elements) if els <= system])
        composition = Composition(counts)
        entry = PDEntry(composition, energy_per_atom * composition.num_atoms)
        return float(self.diagrams[system].get_e_above_hull(entry, allow_negative=True))


def _writable(data_dir: Path, cache: Path) -> None:
    """Before computing what goes to `cache`: a clear error at once, not after hours, when data_dir cannot take it."""
    from models.fileio import check_writable_dir

    check_writable_dir(data_dir, f"{cache.name} is to be written, but its directory (--data-dir)")


def _write_cache(cache: Path, fields: tuple[str, ...], build) -> None:
    """Save build(on_disk) as a cache under its lock (<cache>.lock), clearing temporary files that a writer killed
    mid-write left. on_disk holds the cache's `fields` as they are now (None when there is no readable cache), so
    that build can fold in what another process wrote since this one read it: two evaluate.py runs on one
    --data-dir must not drop each other's results."""
    from models.fileio import ExclusiveLock, read_npz_cache, remove_stale_temporaries, save_npz

    with ExclusiveLock(cache, wait=True):
        remove_stale_temporaries(cache)
        save_npz(cache, build(read_npz_cache(cache, fields, log)))


def element_cache_record(references: dict[int, tuple[float, str]], version: str) -> dict:
    """The arrays of chgnet_elements.npz: elemental_references' {z: (energy per atom, prototype)} under CHGNet's version."""
    zs = sorted(references)
    return dict(version=version, z=np.array(zs, dtype=int), energy=np.array([references[a][0] for a in zs]),
                prototype=np.array([references[a][1] for a in zs]))


def chgnet_hull(name: str, split: str, training: list, scored: list, data_dir: Path, relaxed_hull: bool = False,
                relax_steps: int = 500, workers: int | None = None, progress: bool = True,
                seconds: float | None = None) -> Hull:
    """The Hull of the crystals of a CDVAE data split (`training`, as arrays) and the elemental references of the
    elements of the `scored` crystals, both cached in data_dir: the split's energies keyed by its CSV's blob id and
    the CHGNet version (relaxed_hull: also by the relaxation's settings), the elements by the version. The split's
    crystals enter as single points at their DFT geometries, or with relaxed_hull relaxed for up to relax_steps FIRE
    steps (relaxed_training_energies), each relaxation for at most `seconds`. A damaged cache is set aside
    (fileio.set_aside) and rebuilt; a cache that must be written to a directory that cannot take it is an error
    before anything is computed. hull.not_relaxed: {reason: count} of the training crystals that relaxed_hull did
    not relax."""
    from models.crystals import split_file
    from models.fileio import git_blob_sha1, read_npz_cache

    version = chgnet_version()
    key = f"{git_blob_sha1(split_file(name, split, data_dir, download_missing=False))} {version}"
    cache = data_dir / f"cdvae_{name}_{split}_chgnet.npz"
    z = read_npz_cache(cache, ("key", "energy"), log)
    if z is not None and str(z["key"]) == key and len(z["energy"]) == len(training):
        energies = z["energy"]
    else:
        _writable(data_dir, cache)
        log.info(f"CHGNet energies of the {len(training)} crystals of {name} {split} (once; cached in {cache})")
        energies = static_energies(training, workers=workers, progress=progress)
        _write_cache(cache, ("key", "energy"), lambda on_disk: dict(key=key, energy=energies))
    not_relaxed = {}
    if relaxed_hull:
        energies, not_relaxed = relaxed_training_energies(name, split, training, energies, scored, data_dir, relax_steps,
                                                          key, workers, progress, seconds)
    # a query reads only its own system's elements; a crystal that is not well formed is not relaxed, nor queried
    elements = sorted({int(z) for c in scored if well_formed(c) for z in c[0]})
    element_cache = data_dir / "chgnet_elements.npz"
    fields = ("version", "z", "energy", "prototype")
    references: dict[int, tuple[float, str]] = {}
    z = read_npz_cache(element_cache, fields, log)
    if z is not None and str(z["version"]) == version:
        references = {int(a): (float(e), str(p)) for a, e, p in zip(z["z"], z["energy"], z["prototype"])}
    if missing := sorted(set(elements) - set(references)):
        _writable(data_dir, element_cache)
        log.info(f"relaxing elemental prototypes of {len(missing)} element(s) with CHGNet (once; cached in {element_cache})")
        references.update(elemental_references(missing, workers=workers, progress=progress, seconds=seconds))
        if failed := sorted(set(missing) - set(references)):
            log.warning(f"warning: CHGNet relaxed no prototype of element(s) {failed}; the crystals that hold them have "
                        f"no energy above the hull (they count as not stable), and a later run tries them again")

        def merge(on_disk):  # the elements another run added meanwhile are kept
            if on_disk is not None and str(on_disk["version"]) == version:
                for a, e, p in zip(on_disk["z"], on_disk["energy"], on_disk["prototype"]):
                    references.setdefault(int(a), (float(e), str(p)))
            return element_cache_record(references, version)

        _write_cache(element_cache, fields, merge)
    hull = Hull(training, energies, references)
    hull.not_relaxed = not_relaxed
    return hull


def relaxed_training_energies(name: str, split: str, training: list, single: np.ndarray, scored: list, data_dir: Path,
                              steps: int, split_key: str, workers: int | None = None, progress: bool = True,
                              seconds: float | None = None) -> tuple[np.ndarray, dict]:
    """The hull energies (eV/atom) [len(training)] of a split's crystals, relaxed as the samples are, and {reason:
    count} of those not relaxed. A crystal's energy above the hull depends only on the entries made of its own
    elements, so only the training crystals whose elements all occur together in one scored crystal are relaxed (414
    of perov-5's 3,787 validation crystals for 400 samples); the others are left off the hull (NaN). Each result is
    the lower of the relaxed energy and the single point `single` (a relaxation that fails keeps the single point),
    and goes to the cache as it arrives, merged with what another run on the same cache added, so a stopped run
    resumes; the cache is keyed by the single points' key `split_key` and the relaxation's settings. A relaxation
    stopped at `seconds` (or whose process died) keeps the single point in this run and is not cached: a later run
    tries it again."""
    from models.fileio import read_npz_cache

    key = f"{split_key} relaxed {steps} steps fmax {FMAX}"

    systems = {frozenset(int(z) for z in c[0]) for c in scored if well_formed(c)}
    needed = np.array([any(frozenset(int(z) for z in c[0]) <= s for s in systems) for c in training], dtype=bool)
    cache = data_dir / f"cdvae_{name}_{split}_chgnet_relaxed.npz"
    fields = ("key", "energy", "done")

    def cached(z) -> bool:
        return z is not None and str(z["key"]) == key and len(z["energy"]) == len(z["done"]) == len(training)

    relaxed, done = np.full(len(training), np.nan), np.zeros(len(training), bool)
    if cached(z := read_npz_cache(cache, fields, log)):
        relaxed, done = z["energy"].astype(float), z["done"].astype(bool)
    todo = np.flatnonzero(needed & ~done)
    stopped: dict[str, int] = {}
    if len(todo):
        _writable(data_dir, cache)
        log.info(f"--hull relaxed: relaxing {len(todo)} of the {int(needed.sum())} {name} {split} crystals in "
                 f"{len(systems)} chemical system(s) scored ({int((needed & done).sum())} cached in {cache})")

        def merge(on_disk):
            if cached(on_disk):
                theirs = on_disk["done"].astype(bool) & ~done
                relaxed[theirs], done[theirs] = on_disk["energy"][theirs], True
            return dict(key=key, energy=relaxed, done=done)

        for k, outcome in relax_iter([training[i] for i in todo], steps, workers=workers, progress=progress,
                                     desc=f"CHGNet relaxation of {name} {split}", seconds=seconds):
            i = todo[k]
            if isinstance(outcome, Stopped):
                stopped[outcome.reason] = stopped.get(outcome.reason, 0) + 1
                if outcome.reason != NOT_WELL_FORMED:
                    continue
            relaxed[i], done[i] = (outcome[1] if outcome and not isinstance(outcome, Stopped) else np.nan), True
            _write_cache(cache, fields, merge)  # milliseconds, against seconds per relaxation
        if stopped:
            log.warning(f"warning: --hull relaxed: {sum(stopped.values())} of the {len(todo)} {name} {split} crystals "
                        f"not relaxed ({describe(stopped, seconds)}); they enter the hull at their single points")
    return np.where(needed, np.fmin(single, relaxed), np.nan), stopped

