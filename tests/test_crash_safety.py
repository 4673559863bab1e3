"""Kills: the labels writer killed at hundreds of points inside `append` (and at random instants), two writers on
one file, training killed between checkpoints, scale.py sweeps, evaluate.py killed while it writes its relaxed-hull
cache. What was committed survives, nothing appears twice."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from models.labels import LabelsError, LabelWriter, journal_dir, read_labels
from models.teachers import get_teacher

ROOT = Path(__file__).resolve().parents[1]

# A writer in a child process: appends blocks of deterministic rows (energy and positions follow from the key, so a
# row read back can be checked), prints "committed B" after each append returns, and with KILL_AT > 0 SIGKILLs
# itself at the KILL_AT-th Python line executed inside the append of block TARGET (numpy's and h5py's Python code
# included). With KILL_AT = 0 it reports how many lines that append ran.
WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from models.labels import LabelWriter

    path, n_blocks, target, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

    def rows(b):
        out = []
        for i in range(3 + b % 4):
            key = f"b{b}:{i}"
            n = 1 + (b + i) % 5
            x = np.arange(3 * n, dtype=np.float64).reshape(n, 3) + b + 0.25 * i
            out.append(dict(numbers=np.full(n, 6), positions=x, forces=-x, energy=float(100 * b + i), stress=np.full(6, np.nan),
                            cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), source="test", key=key))
        return out

    lines = 0
    def tracer(frame, event, arg):
        global lines
        if event == "line":
            lines += 1
            if lines == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return tracer

    w = LabelWriter(path, "t", "v1", fold_rows=8)
    for b in range(n_blocks):
        if b == target:
            sys.settrace(tracer)
        w.append(rows(b), seconds=1.0)
        sys.settrace(None)
        print("committed", b, flush=True)
        if b == target and kill_at == 0:
            print("lines", lines, flush=True)
    w.close()
""")


def committed_blocks(stdout: str) -> set[int]:
    """The blocks a writer reported whole lines for. A SIGKILL can land inside a print: with unbuffered output (an
    inherited PYTHONUNBUFFERED, `python -u`) each of its pieces is a write of its own, and "committed" may reach the
    pipe without its number. That block was appended all the same; taken as in flight, it is allowed either way."""
    return {int(b) for b in re.findall(r"^committed (\d+)\n", stdout, re.MULTILINE)}


def run_writer(path, n_blocks, target=-1, kill_at=0):
    proc = subprocess.run([sys.executable, "-c", WRITER, str(path), str(n_blocks), str(target), str(kill_at)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    return proc, committed_blocks(proc.stdout)


def block_keys(b):
    return {f"b{b}:{i}" for i in range(3 + b % 4)}


def check_file(path, committed: set[int], in_flight: set[int]):
    """Reopen (replaying the journal), then: every committed block is there whole, nothing else but possibly the
    block in flight, no key twice, every row intact."""
    LabelWriter(path, "t", "v1").close()
    lab = read_labels(path)
    keys = lab["key"].tolist()
    assert len(keys) == len(set(keys)), "a key appears twice"
    want = set().union(*[block_keys(b) for b in committed]) if committed else set()
    extra = set(keys) - want
    assert want <= set(keys), f"committed rows lost: {sorted(want - set(keys))[:5]}"
    assert extra <= set().union(*[block_keys(b) for b in in_flight]) if in_flight else not extra, sorted(extra)[:5]
    for b in {int(k[1:].split(":")[0]) for k in extra}:
        assert block_keys(b) <= set(keys), "a block in flight was stored in part"
    for s, key in enumerate(keys):
        b, i = (int(v) for v in key[1:].split(":"))
        o, n = lab["offset"][s], lab["n_atoms"][s]
        x = np.arange(3 * n, dtype=np.float64).reshape(n, 3) + b + 0.25 * i
        assert lab["energy"][s] == 100 * b + i and np.array_equal(lab["positions"][o:o + n], x.astype(np.float32))
        assert np.array_equal(lab["forces"][o:o + n], -x.astype(np.float32)) and n == 1 + (b + i) % 5
    assert lab["offset"][-1] + lab["n_atoms"][-1] == len(lab["numbers"])
    return lab


@pytest.mark.parametrize("target", [3, 4], ids=["append-only", "append-and-fold"])
def test_labels_writer_killed_at_many_points_inside_append(tmp_path, target):
    """fold_rows=8: block 3 is journalled only, block 4 also folds the journal into a new HDF5 file. Kill points
    are spread over every Python line the append runs, with random offsets."""
    proc, _ = run_writer(tmp_path / "calibrate.h5", target + 1, target, 0)
    assert proc.returncode == 0, proc.stderr
    n_lines = int(proc.stdout.split("lines")[1].split()[0])
    assert n_lines > 100
    rng = np.random.default_rng(target)
    points = np.unique(np.linspace(1, n_lines, 24).astype(int) + rng.integers(0, max(1, n_lines // 24), 24))
    for k in points:
        path = tmp_path / f"kill{k}.h5"
        proc, committed = run_writer(path, target + 2, target, int(k))
        if proc.returncode == 0:  # k past the last line of this append: nothing was killed
            assert committed == set(range(target + 2))
            continue
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert committed == set(range(target)), (k, committed)
        check_file(path, committed, in_flight={target})


def test_labels_writer_killed_at_random_instants(tmp_path):
    """A writer appending continuously is SIGKILLed at random moments after its first append, 8 times on the same
    file; each restart resumes on what the previous one left."""
    path, rng, committed = tmp_path / "labels.h5", np.random.default_rng(0), set()
    script = WRITER.replace("for b in range(n_blocks):", "for b in range(int(sys.argv[5]), n_blocks):")
    start = 0
    for trial in range(8):
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), "100000", "-1", "0", str(start)], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # blocks through start-up, however loaded the machine: the writer is appending
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        # The rest of stdout is read through the same text stream: readline may have buffered lines past the first,
        # which communicate(), reading the pipe's descriptor, would skip (a "committed" line lost, a block taken as
        # never written).
        out, err = first + proc.stdout.read(), proc.stderr.read()
        proc.wait()
        assert first.startswith("committed"), err[-2000:]
        done = committed_blocks(out)
        committed |= done
        in_flight = {max(done) + 1} if done else {start}
        lab = check_file(path, committed, in_flight)
        start = max(int(k[1:].split(":")[0]) for k in lab["key"]) + 1 if len(lab["key"]) else 0
        committed = {int(k[1:].split(":")[0]) for k in lab["key"]}
    assert len(committed) > 8  # the kills did land among appends
    assert not list(journal_dir(path).glob("*.tmp")) and not list(tmp_path.glob("labels.h5.*.tmp"))


def test_a_block_handed_in_twice_is_stored_once(tmp_path):
    """What a Ctrl-C between label.py's commit and its clearing of the block does: the same rows again."""
    rows = [dict(numbers=[1, 1], positions=np.zeros((2, 3)) + [[0, 0, 0], [0, 0, 0.74]], forces=np.zeros((2, 3)), energy=-1.0,
                 stress=np.full(6, np.nan), cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), source="s", key=f"k{i}") for i in range(3)]
    with LabelWriter(tmp_path / "l.h5", "t", "v1") as w:
        assert w.append(rows, seconds=2.0) == 3
        assert w.append(rows, seconds=2.0) == 3
    lab = read_labels(tmp_path / "l.h5")
    assert lab["key"].tolist() == ["k0", "k1", "k2"] and lab["attrs"]["label_seconds"] == 2.0


def test_second_writer_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "labels.h5"
    (tmp_path / "m.xyz").write_text("2\nProperties=species:S:1:pos:R:3\nH 0 0 0\nH 0 0 0.74\n")
    version = get_teacher("emt").version
    with LabelWriter(out, "emt", version):
        with pytest.raises(LabelsError, match=rf"labels\.h5 is being written by another process \(pid {os.getpid()}"):
            LabelWriter(out, "emt", version)
        for cmd in (["label.py", tmp_path / "m.xyz", "--teacher", "emt", "--out", out],
                    ["label.py", tmp_path / "m.xyz", "--teacher", "emt", "--out", out, "--no-resume"]):
            proc = run_script(*cmd, check=False)
            assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
        assert len(read_labels(out)["key"]) == 0
    proc = run_script("label.py", tmp_path / "m.xyz", "--teacher", "emt", "--out", out, check=False)
    assert proc.returncode == 0 and len(read_labels(out)["key"]) == 1  # the lock went with its holder


def test_training_killed_between_checkpoints_resumes_exactly(qm9_dir, tmp_path):
    """SIGKILL at three points between checkpoints, --resume each time: the logs hold every step once, with the
    losses of an uninterrupted run, and the final weights are equal."""
    import torch

    from models.checkpoint import load_checkpoint

    flags = ["--preset", "tiny", "--iters", "16", "--log-every", "1", "--ckpt-every", "4", "--eval-samples", "4",
             "--eval-every", "0", "--data-dir", str(qm9_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    run_script("train.py", *flags, "--out", full)
    out = tmp_path / "killed"
    for kill_after, resume in ((6, False), (11, True), (14, True)):
        proc = subprocess.Popen([sys.executable, "train.py", *flags, "--out", str(out), *(["--resume"] if resume else [])],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log, deadline = out / "log.jsonl", time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(line)["step"] for line in log.read_text().splitlines()[:-1]] if log.exists() else []
            if steps and steps[-1] >= kill_after:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "finished before the kill"
        proc.kill()
        proc.wait()
        assert load_checkpoint(out / "ckpt.pt")["step"] % 4 == 0
    run_script("train.py", *flags, "--out", out, "--resume")

    def losses(d):
        return [(r["step"], r["loss"]) for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(out) == losses(full) and [s for s, _ in losses(out)] == list(range(1, 17))
    assert [line.split("|")[0].split()[1] for line in (out / "train.log").read_text().splitlines() if line.startswith("step")] \
        == [f"{s}/16" for s in range(1, 17)]
    a, b = load_checkpoint(full / "ckpt.pt"), load_checkpoint(out / "ckpt.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert not list(out.glob("*.tmp"))


def test_second_training_run_on_one_directory_is_refused(qm9_dir, tmp_path):
    from models.fileio import ExclusiveLock

    with ExclusiveLock(tmp_path / "run" / "train"):  # what a running train.py holds
        proc = run_script("train.py", "--preset", "tiny", "--iters", "2", "--data-dir", qm9_dir, "--out", tmp_path / "run",
                          check=False)
    assert proc.returncode == 1 and f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "train.log").exists()


def test_ctrl_c_in_training_keeps_the_last_checkpoint(qm9_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "train.py", "--preset", "tiny", "--iters", "100000", "--log-every", "1",
                             "--ckpt-every", "3", "--eval-samples", "2", "--data-dir", str(qm9_dir), "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            # a suite started as a background job inherits SIGINT ignored; Ctrl-C is what is tested
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "ckpt.pt").exists() and (out / "log.jsonl").exists()
                                          and len((out / "log.jsonl").read_text().splitlines()) > 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted at step" in err and "--resume" in err and "Traceback" not in err
    from models.checkpoint import load_checkpoint
    assert load_checkpoint(out / "ckpt.pt")["step"] % 3 == 0


def test_concurrent_sweeps_one_killed_lose_no_run_and_merge_their_records(qm9_dir, tmp_path):
    """Two scale.py sweeps on one --out with a run in common. The first is killed (with its train.py, as a session's
    end kills them) while it trains that run and the second waits for it. The second takes the run over from its last
    checkpoint; the first sweep's command, run again, skips what is done and trains the rest. Every run is trained
    once, none is deleted, and results.json holds the runs of both sweeps.

    Deterministic: a sitecustomize holds the first sweep's train.py of the shared run at its 8th step (its checkpoint
    of step 5 written), and the kill comes once the second sweep says it is waiting for that run."""
    (tmp_path / "held").mkdir()
    (tmp_path / "held" / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        if sys.argv and sys.argv[0].endswith("train.py") and "40" in sys.argv:
            import time, torch
            step, calls = torch.optim.AdamW.step, [0]
            def held(self, *args, **kwargs):
                calls[0] += 1
                while calls[0] > 7:
                    time.sleep(1)
                return step(self, *args, **kwargs)
            torch.optim.AdamW.step = held
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "scale.py", "compute", "--batch-size", "8", "--n-layers", "2", "--hidden", "16", "--data-dir",
            str(qm9_dir), "--train-args", "--preset tiny --val-size 16 --n-train 64 --log-every 1 --ckpt-every 5",
            "--out", str(tmp_path / "sweep")]
    first_command = base + ["--iters-list", "4", "40", "12"]
    first = subprocess.Popen(first_command, cwd=ROOT, env={**env, "PYTHONPATH": str(tmp_path / "held")},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shared, deadline = tmp_path / "sweep" / "s40", time.time() + 120
    while not ((shared / "log.jsonl").exists() and '"step": 7,' in (shared / "log.jsonl").read_text()):  # held at step 8
        assert first.poll() is None and time.time() < deadline, "the first sweep ended before it was held"
        time.sleep(0.05)
    second = subprocess.Popen(base + ["--iters-list", "6", "40"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "sweep" / "scale.log"
    while "s40: another scale.py is on this run" not in log.read_text():
        assert second.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    again = run_script(*first_command[1:])
    assert "s4: trained (4 steps), skipped" in again.stdout and "s40: trained (40 steps), skipped" in again.stdout

    runs = json.loads((tmp_path / "sweep" / "results.json").read_text())["runs"]
    assert sorted((r["run"], r["steps"]) for r in runs) == [("s12", 12), ("s4", 4), ("s40", 40), ("s6", 6)]
    for name, steps in (("s4", 4), ("s6", 6), ("s12", 12), ("s40", 40)):
        logged = [r["step"] for r in map(json.loads, (tmp_path / "sweep" / name / "log.jsonl").read_text().splitlines()) if "loss" in r]
        assert logged == list(range(1, steps + 1)), (name, logged)  # every step once: resumed, never started over
    assert (shared / "train.log").read_text().count("resumed from") == 1  # taken over from the killed sweep's step 5


# evaluate.py with its writes of one cache file counted: SIGKILLed in the middle of the Nth (its temporary file half
# written) with HOW = mid-write, or with HOW = after right after the Nth is in place. Arguments: the cache's file
# name, N, HOW, then evaluate.py's own.
KILLED_EVALUATE = textwrap.dedent("""
    import os, runpy, signal, sys
    sys.path.insert(0, os.getcwd())  # run from the repository's root, as a file: its own directory is sys.path[0]
    import models.fileio as fileio

    cache, nth, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    sys.argv = ["evaluate.py", *sys.argv[4:]]
    atomic_write, writes = fileio.atomic_write, 0

    def counted(path, write):
        global writes
        if os.path.basename(path) != cache:
            return atomic_write(path, write)
        writes += 1
        if writes == nth and how == "mid-write":
            def half(tmp):
                write(tmp)
                os.truncate(tmp, os.path.getsize(tmp) // 2)
                os.kill(os.getpid(), signal.SIGKILL)
            return atomic_write(path, half)
        atomic_write(path, write)
        if writes == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    fileio.atomic_write = counted
    runpy.run_path("evaluate.py", run_name="__main__")
""")


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line holds `text`: a killed evaluate.py's CHGNet workers, if any outlived it."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (proc / "cmdline").read_bytes() and (proc / "stat").read_text().split(")")[-1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:
            pass
    return found


def test_relaxed_hull_killed_while_writing_its_cache_resumes_to_the_same_result(tmp_path, carbon_reference_cache):
    """evaluate.py --hull relaxed SIGKILLed inside its second write of the relaxed-hull cache (the temporary file half
    written), then, resumed, right after its third write is in place: each run resumes from what the cache holds and
    relaxes only the rest, no CHGNet worker outlives a kill, and the end is the cache and the metrics of a run never
    killed. CHGNet at its cheapest: carbon-24's six fixture crystals as the hull's split, 2 FIRE steps each; the
    elemental references, which are not under test, given to every run (carbon_reference_cache)."""
    relaxed = "cdvae_carbon24_val_chgnet_relaxed.npz"
    template = tmp_path / "template"
    (template / "cdvae" / "carbon_24").mkdir(parents=True)
    for split in ("val", "test"):
        (template / "cdvae" / "carbon_24" / f"{split}.csv").write_bytes((ROOT / "tests" / "data" / "carbon24_sample.csv").read_bytes())
    carbon_reference_cache(template)
    killed_evaluate = tmp_path / "killed_evaluate.py"
    killed_evaluate.write_text(KILLED_EVALUATE)

    def evaluate(name, *killer):
        import shutil

        d = tmp_path / name
        if not d.exists():
            shutil.copytree(template, d)
        # forked from the warm server (tests/forkserver.py): the script kills itself, and CHGNet is loaded already
        return run_script(*([killed_evaluate, relaxed, *killer] if killer else ["evaluate.py"]), "--reference", "carbon24",
                          "--stability", "--hull", "relaxed", "--relax-steps", "2", "--n-unique", "2", "--no-coverage",
                          "--workers", "1", "--no-progress", "--data-dir", d, "--json", tmp_path / f"{name}_out" / "metrics.json",
                          check=False, timeout=300)

    def cache(name):
        with np.load(tmp_path / name / relaxed) as z:
            return z["energy"].copy(), z["done"].copy()

    full = evaluate("full")
    assert full.returncode == 0, full.stdout[-2000:] + full.stderr[-2000:]
    for killer, done, temporaries in ((("2", "mid-write"), 1, 1), (("3", "after"), 4, 0)):
        killed = evaluate("killed", *killer)
        assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
        assert cache("killed")[1].sum() == done
        # the first kill's half-written temporary file is there until the next run's first write clears it
        assert len(list((tmp_path / "killed").glob(f"{relaxed}.*.tmp"))) == temporaries
        deadline = time.time() + 10  # the kernel kills orphaned workers (PR_SET_PDEATHSIG) as their parent goes
        while processes_naming(str(tmp_path / "killed")) and time.time() < deadline:
            time.sleep(0.1)
        assert not processes_naming(str(tmp_path / "killed"))
    resumed = evaluate("killed")
    assert resumed.returncode == 0 and "relaxing 2 of the 6 carbon24 val crystals" in resumed.stdout, resumed.stdout[-2000:]
    assert "(4 cached" in resumed.stdout
    for a, b in zip(cache("full"), cache("killed")):
        assert np.array_equal(a, b)

    def metrics(name):
        m = json.loads((tmp_path / f"{name}_out" / "metrics.json").read_text())
        return {k: v for k, v in m.items() if "seconds" not in k}

    assert metrics("killed") == metrics("full")
    assert not list((tmp_path / "killed").glob("*.tmp"))


def test_two_relaxed_hull_runs_on_one_cache_keep_each_others_relaxations(tmp_path, monkeypatch):
    """Two evaluate.py --hull relaxed on one --data-dir, scoring different chemical systems (carbon, silicon), write
    one cache. The second finishes while the first is relaxing: the first's next write merges it, under the
    cache's lock, where each used to write its own view whole and drop the other's relaxations. CHGNet is replaced
    by fixed energies: what is tested is the cache."""
    from models import crystal_stability

    def crystal(z):
        return np.array([z]), np.zeros((1, 3)), np.full(3, 3.0), np.full(3, 90.0)

    training = [crystal(6)] * 3 + [crystal(14)] * 3
    others_turn = []

    def relax_iter(crystals, steps, workers=None, progress=True, desc="", seconds=None):
        for k, c in enumerate(crystals):
            if k == 1 and not others_turn:  # the silicon run starts, relaxes all it needs and ends, meanwhile
                others_turn.append(True)
                crystal_stability.relaxed_training_energies("carbon24", "val", training, np.zeros(6), [crystal(14)],
                                                            tmp_path, 5, "key", progress=False)
            yield k, (c, -float(c[0][0]), 5, True)

    monkeypatch.setattr(crystal_stability, "relax_iter", relax_iter)
    energies, _ = crystal_stability.relaxed_training_energies("carbon24", "val", training, np.zeros(6), [crystal(6)],
                                                               tmp_path, 5, "key", progress=False)
    assert energies[:3].tolist() == [-6.0] * 3 and np.isnan(energies[3:]).all()  # this run's systems only
    with np.load(tmp_path / "cdvae_carbon24_val_chgnet_relaxed.npz") as z:
        assert z["done"].all() and z["energy"].tolist() == [-6.0] * 3 + [-14.0] * 3
