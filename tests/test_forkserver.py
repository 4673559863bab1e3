"""tests/forkserver.py stands in for a fresh interpreter: a script forked from the warm server and the same script in a
new process end alike (exit status, stdout, stderr), however the script ends."""
import os
import signal
import subprocess
import sys

import pytest

from forkserver import _forkable, run_python
from hostile import HAS_UNSHARE

SCRIPTS = {
    "prints and returns": "import sys\nprint('out', sys.argv[1:])\nprint('err', file=sys.stderr)\n",
    "exits with a message": "import sys\nprint('partial')\nsys.exit('stopped: a clear message')\n",
    "exits with a status": "import sys\nsys.exit(3)\n",
    "raises": "def f():\n    raise ValueError('boom')\nf()\n",
    "is interrupted": "print('before')\nraise KeyboardInterrupt\n",
    "reads its environment and directory": "import os, sys\nprint(os.environ['MOLGEN_DATA'], os.getcwd(), sys.argv[0], sys.path[0])\n",
    "ends its threads and atexit handlers": ("import atexit, threading, time\natexit.register(lambda: print('atexit ran'))\n"
                                              "threading.Thread(target=lambda: (time.sleep(0.2), print('thread ran'))).start()\n"),
    # C's stdout into a file is buffered until exit(3) flushes it, unless python runs unbuffered (-u, PYTHONUNBUFFERED)
    "prints through C's stdio": "import ctypes\nctypes.CDLL(None).printf(b'from C')\nprint('from python')\n",
    "uses torch on one thread": "import torch\nprint(torch.get_num_threads(), torch.ones(3).sum().item())\n",
    "is run as __main__": "print(__name__)\nif __name__ == '__main__':\n    print('main ran')\n",
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_forked_script_ends_as_a_fresh_process_does(name, tmp_path):
    (tmp_path / "script.py").write_text(SCRIPTS[name])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOLGEN_DATA": str(tmp_path / "data")}
    assert _forkable(["script.py"], env)
    forked = run_python(["script.py", "a", "b c"], cwd=tmp_path, env=env)
    fresh = subprocess.run([sys.executable, "script.py", "a", "b c"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (forked.returncode, forked.stdout) == (fresh.returncode, fresh.stdout)
    if name == "raises":  # the same traceback's end; the forked one also lists the server's frames above the script's
        assert fresh.stderr.splitlines()[-1] == forked.stderr.splitlines()[-1] == "ValueError: boom"
        assert "Traceback" in forked.stderr and 'script.py", line 2, in f' in forked.stderr
    elif name == "is interrupted":  # ended by SIGINT in both
        assert forked.returncode == -signal.SIGINT and fresh.stderr.splitlines()[-1] == forked.stderr.splitlines()[-1] == "KeyboardInterrupt"
    else:
        assert forked.stderr == fresh.stderr


def test_a_module_runs_with_dash_m_and_timeouts_stop_the_child(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "tool.py").write_text("import sys\nprint(__name__, sys.argv)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    forked = run_python(["-m", "pkg.tool", "x"], cwd=tmp_path, env=env)
    fresh = subprocess.run([sys.executable, "-m", "pkg.tool", "x"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert forked.returncode == fresh.returncode == 0 and forked.stdout == fresh.stdout
    (tmp_path / "slow.py").write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        run_python(["slow.py"], cwd=tmp_path, env=env, timeout=0.5)
    assert run_python(["pkg/tool.py"], cwd=tmp_path, env=env).returncode == 0  # the server still answers


def test_numpy_draws_a_fresh_seed_in_each_child(tmp_path):
    (tmp_path / "draw.py").write_text("import numpy\nprint(numpy.random.rand())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    draws = {run_python(["draw.py"], cwd=tmp_path, env=env).stdout for _ in range(3)}
    assert len(draws) == 3


def test_another_thread_count_starts_a_plain_process(tmp_path):
    assert not _forkable(["x.py"], {**os.environ, "OMP_NUM_THREADS": "2"})
    assert not _forkable(["-c", "pass"], {**os.environ, "OMP_NUM_THREADS": "1"})
    (tmp_path / "threads.py").write_text("import torch\nprint(torch.get_num_threads())\n")
    assert run_python(["threads.py"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.strip() == "2"


PARENT = """import subprocess, sys
with open("child.log", "a") as f:
    f.write("first line\\n")
    f.flush()
    code = subprocess.run([sys.executable, "child.py", "to a file"], stdout=f, stderr=subprocess.STDOUT).returncode
print("file child exit", code)
print("inherited child exit", subprocess.run([sys.executable, "child.py", "inherited"], cwd="sub").returncode)
captured = subprocess.run([sys.executable, "child.py", "captured"], capture_output=True, text=True)
print("captured child exit", captured.returncode, repr(captured.stdout))
try:
    subprocess.run([sys.executable, "child.py", "checked"], check=True, stdout=subprocess.DEVNULL)
except subprocess.CalledProcessError as e:
    print("checked child raised", e.returncode)
"""
CHILD = """import os, sys
print("child", sys.argv[1:], os.path.basename(os.getcwd()), os.environ["MOLGEN_DATA"])
print("child err", file=sys.stderr)
sys.exit(5)
"""


def test_a_scripts_own_python_children_are_forked_and_end_as_fresh_ones_do(tmp_path):
    """scale.py starts train.py for each point: those children are forked from the warm state too (they find torch
    imported), and the script sees what it would see from fresh processes: exit status, output in its files."""
    (tmp_path / "sub").mkdir()
    for where in (tmp_path, tmp_path / "sub"):
        (where / "child.py").write_text(CHILD)
    (tmp_path / "parent.py").write_text(PARENT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOLGEN_DATA": "d"}
    fresh = subprocess.run([sys.executable, "parent.py"], cwd=tmp_path, env=env, capture_output=True, text=True)
    fresh_log = (tmp_path / "child.log").read_text()
    (tmp_path / "child.log").unlink()
    forked = run_python(["parent.py"], cwd=tmp_path, env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 0 and "checked child raised 5" in fresh.stdout
    assert (tmp_path / "child.log").read_text() == fresh_log  # the child's lines in their buffered order
    assert sorted(fresh_log.splitlines()) == ["child ['to a file'] " + tmp_path.name + " d", "child err", "first line"]
    (tmp_path / "child.py").write_text("import sys\nprint('torch' in sys.modules)\n")
    (tmp_path / "parent.py").write_text("import subprocess, sys\nsubprocess.run([sys.executable, 'child.py'])\n")
    assert run_python(["parent.py"], cwd=tmp_path, env=env).stdout == "True\n"  # forked from the warm state


@pytest.mark.skipif(not HAS_UNSHARE, reason="needs `unshare -rm` (a private mount namespace)")
def test_private_mounts_are_seen_by_the_script_alone(tmp_path):
    """The hostile tables' read-only and full disks: a forked script (and a plain one, when the environment sends it
    to a fresh interpreter) runs over a read-only tmpfs that nothing outside it sees."""
    (tmp_path / "mnt").mkdir()
    (tmp_path / "write.py").write_text("import sys\ntry:\n    open('mnt/f', 'w')\nexcept OSError as e:\n"
                                       "    sys.exit(f'refused: {e.strerror}')\nprint('written')\n")
    read_only = f"mount -t tmpfs -o ro tmpfs {tmp_path / 'mnt'}"
    for threads in ("1", "2"):  # forked, then a plain process under `unshare`
        proc = run_python(["write.py"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": threads},
                          private_mounts=read_only)
        assert (proc.returncode, proc.stderr) == (1, "refused: Read-only file system\n")
    assert run_python(["write.py"], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout == "written\n"
