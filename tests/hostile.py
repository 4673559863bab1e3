"""The runner of the hostile tables (tests/test_hostile*.py): each row is a command, the exit status it must end with
and the words its message must contain. A clear error names the file, record or flag and the problem, and never
shows a traceback.

Read-only and full disks are real: the command runs in a private mount namespace (as `unshare -rm` gives; the forked
child enters it itself, tests/forkserver.py) over a tmpfs mounted read-only, or 64 KiB small, on the world's mnt/
directory."""
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from forkserver import run_python

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--preset", "tiny", "--iters", "4", "--ckpt-every", "2", "--eval-samples", "2"]
HAS_UNSHARE = shutil.which("unshare") is not None and subprocess.run(
    ["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True).returncode == 0
MOUNTS = {  # shell run inside the namespace before the command; {d} is the directory
    "read-only": "mount -t tmpfs -o ro tmpfs {d}",
    "full": "mount -t tmpfs -o size=64k tmpfs {d}",
    "read-only, garbage qm9.npz": "mount -t tmpfs tmpfs {d} && echo garbage > {d}/qm9.npz && mount -o remount,ro {d}",
    "read-only copy of ro/": "mount -t tmpfs tmpfs {d} && cp -a {d}/../ro/. {d} && mount -o remount,ro {d}",  # the world's ro/
}


def run_case(case, world: Path, qm9_dir: Path):
    """(exit status, stdout + stderr) of a case (id, command, status, words, needs), or a reason to skip it. The
    command's placeholders: {w} the world, {data} the QM9 fixture's data directory, {tiny} the tiny training flags."""
    name, command, status, words, needs = case
    if needs == "no-gpu" and torch.cuda.is_available():
        return "a GPU is visible"
    argv = command.format(w=world, data=qm9_dir, tiny=" ".join(TINY)).split()
    mounts = None
    if needs in MOUNTS:
        if not HAS_UNSHARE:
            return "needs `unshare -rm` (a private mount namespace) for a read-only or full disk"
        mounts = MOUNTS[needs].format(d=world / "mnt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOLGEN_DATA": str(world / "mnt" if needs and "qm9" in needs else qm9_dir)}
    proc = run_python(argv, cwd=ROOT, env=env, timeout=300, private_mounts=mounts)  # forked (tests/forkserver.py)
    return proc.returncode, proc.stdout + proc.stderr


def run_selected(cases: list, world: Path, qm9_dir: Path, request) -> dict:
    """{id: outcome} of the cases this pytest session selected (all of them, or those -k keeps), two at a time (most
    of a case is start-up). Cases on the same --out run one after the other, in table order: train.py and label.py
    refuse a second process on an output in use."""
    module = request.module.__name__
    selected = {item.callspec.params["case"][0] for item in request.session.items
                if item.module.__name__ == module and hasattr(item, "callspec") and "case" in item.callspec.params}
    groups = {}
    for case in cases:
        if case[0] in selected:
            words = case[1].split()
            groups.setdefault(words[words.index("--out") + 1] if "--out" in words else case[0], []).append(case)
    with ThreadPoolExecutor(2) as pool:
        done = pool.map(lambda group: [(c[0], run_case(c, world, qm9_dir)) for c in group], groups.values())
        return {name: outcome for group in done for name, outcome in group}


def check_case(case, outcome, world: Path, then: dict) -> None:
    """The case's exit status and words, no traceback, and then[id](world) when the table says what must hold on
    disk afterwards."""
    name, command, status, words, needs = case
    if isinstance(outcome, str):
        pytest.skip(outcome)
    returncode, message = outcome
    assert returncode == status, f"{name}: exit {returncode}, expected {status}\n{message[-3000:]}"
    for word in words:
        assert word in message, f"{name}: {word!r} not in\n{message[-3000:]}"
    assert "Traceback" not in message, message[-3000:]
    if name in then:
        then[name](world)


def hostile_table(cases: list, then: dict, data: str = "qm9_dir"):
    """A table module's module-scoped `outcomes` fixture (every selected case run once) and its parametrized test,
    for the module's end: `outcomes, test_hostile_case = hostile_table(CASES, THEN)`. `data` names the fixture whose
    directory the cases read as {data} and MOLGEN_DATA."""
    @pytest.fixture(scope="module")
    def outcomes(world, request):
        return run_selected(cases, world, request.getfixturevalue(data), request)

    @pytest.mark.parametrize("case", cases, ids=[c[0] for c in cases])
    def test_hostile_case(case, outcomes, world):
        check_case(case, outcomes[case[0]], world, then)

    return outcomes, test_hostile_case
