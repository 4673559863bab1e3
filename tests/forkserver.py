"""The tests' way to run a script as a process: `run_python(args)` forks it from a warm server instead of starting an
interpreter that imports torch again.

Most of a short script run in the tests is start-up (importing torch and torch._dynamo, which the first optimiser step
imports, about 5 s on one core here), and the suite runs a few hundred of them. A server process (this file run as a
script) imports the third-party libraries once, then for each request forks a child that runs the script with runpy as
`python SCRIPT ARGS` would: its own argv, cwd, environment, stdin at /dev/null, stdout and stderr to files, and the
interpreter's ending (_end), so an uncaught exception prints its traceback and exits 1, `sys.exit("message")` prints
the message, atexit handlers and threads finish; only the teardown of modules is skipped. The child imports the
repository's own modules itself. The preloaded libraries may read the environment as they load, so the server starts
with OMP_NUM_THREADS=1 (as every script the tests start runs) and a request whose load-time variables
(LOAD_TIME_PREFIXES) differ from the server's, or that passes interpreter flags, starts a plain process, and tests
that signal or time a process (tests/test_crash_safety.py) start their own.

A script that starts python scripts of its own (scale.py runs train.py, sample.py and evaluate.py for each point) would
pay the imports again in each of them, so every child forks a helper from the warm state before its script runs, and
its `subprocess.run([sys.executable, SCRIPT, ...], stdout=FILE, ...)` calls are forked by that helper (the same rules:
no interpreter flags, the same load-time variables; a call with a timeout, input or captured output runs as it would).
The hostile tables' read-only and full disks are mounts in a private namespace: the child enters one itself
(`private_mounts`), as `unshare -rm` would, before its script runs.

tests/test_forkserver.py checks that a forked run and a fresh process agree: exit status, stdout, stderr.
"""
import atexit
import gc
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

# Imported once by the server. torch._dynamo is the largest part (about 2.7 s on one core here, more than torch
# itself): torch.optim imports it at the first optimiser step, so every training run pays it. CHGNet (about 4 s
# more, pymatgen's modules with it) judges and labels crystals; smact and pymatgen's StructureMatcher score every
# crystal sample file.
PRELOAD = ("torch", "torch._dynamo", "numpy", "scipy.spatial", "scipy.optimize", "h5py", "ase.io", "tqdm", "rdkit.Chem",
           "matplotlib.pyplot", "pymatgen.core", "pymatgen.analysis.structure_matcher", "smact", "smact.screening",
           "chgnet.model", "chgnet.model.dynamics")
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
# Variables the preloaded libraries may read as they load (OpenMP's thread count, dynamo's and inductor's settings,
# matplotlib's backend): a request must agree with the server on every one of them, or it runs as a plain process.
LOAD_TIME_PREFIXES = ("OMP_", "MKL_", "KMP_", "TORCH", "PYTORCH", "TRITON", "CUDA", "MPL", "PYTHON", "LD_")
# FREEZE: before each fork, the objects that exist are moved out of the garbage collector's sight (gc.freeze). A child's
# collections, the one at its interpreter's ending above all, would otherwise write to the header of every one of the
# server's half-million objects, and each write copies its page: a script that does nothing took 1.9 s to end here,
# 0.4 s with the freeze. The child's own objects are collected as ever; the server's are alive in the server anyway.


# ---- the server (this file run as a script) ----

def _serve() -> None:
    """Answer requests from stdin, one JSON line each ({argv, cwd, env, stdout, stderr, timeout, private_mounts}),
    with a JSON line ({returncode, timed_out}) on the pipe that was stdout when the server started."""
    import importlib
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the server itself prints (a library's notice at import) stays out of the replies
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        gc.freeze()  # see FREEZE
        pid = os.fork()
        if pid == 0:
            replies.close()
            _run_child(request)  # never returns: the child ends as the interpreter ends a script
        killed = []  # the timer's thread has ended (joined below) before the next fork
        timer = threading.Timer(request["timeout"], lambda: killed.append(os.kill(pid, signal.SIGKILL))) \
            if request["timeout"] else None
        if timer:
            timer.start()
        _, status = os.waitpid(pid, 0)
        if timer:
            timer.cancel()
            timer.join()
        replies.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "timed_out": bool(killed)}) + "\n")
        replies.flush()


def _run_child(request: dict) -> None:
    """In the forked child: become `python ARGV` in request's cwd and environment, with stdout and stderr in files."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["stdout"], os.O_WRONLY | os.O_TRUNC),
                            (2, request["stderr"], os.O_WRONLY | os.O_TRUNC)):
        opened = os.open(path, flags)
        os.dup2(opened, fd)
        os.close(opened)
    if request.get("private_mounts"):
        _enter_private_mounts(request["private_mounts"])
    _become(request)


def _enter_private_mounts(shell: str) -> None:
    """What `unshare -rm sh -c SHELL` does before it runs a command: a user namespace where this user is root and a
    mount namespace of this process's own (a forked child has one thread, as unshare(2) requires), then SHELL's
    mounts in it; the script and its children see them, nothing outside does."""
    import ctypes
    uid, gid = os.getuid(), os.getgid()
    clone_newns, clone_newuser = 0x00020000, 0x10000000
    if ctypes.CDLL(None, use_errno=True).unshare(clone_newuser | clone_newns) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER | CLONE_NEWNS) failed")
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
        Path("/proc/self", name).write_text(text)
    subprocess.run(["sh", "-c", "mount --make-rprivate / && " + shell], check=True)


def _become(request: dict) -> None:
    """Run request's script as `python ARGV` in its cwd and environment (stdin, stdout and stderr already in place),
    with a helper forked first for the script's own python children; then end as the script would (_end: a str exit
    code printed, an exception's traceback printed and status 1, atexit handlers run)."""
    import runpy
    ours, helpers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        ours.close()
        _fork_children(helpers)  # never returns
    helpers.close()
    _forward_python_children(ours)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    import numpy
    numpy.random.seed()  # a fresh process draws numpy's global seed from the OS; forked children would share one
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[0] = os.getcwd()
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
        code, interrupted = 0, False
    except SystemExit as stop:
        code, interrupted = stop.code, False
    except BaseException as error:
        sys.excepthook(*sys.exc_info())
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    _end(code, interrupted)


def _end(code, interrupted: bool) -> None:
    """End the child as the interpreter ends a script, short of tearing its modules down: a SystemExit's code as
    Python reads it, threads joined, atexit handlers run, the standard streams flushed, and after an uncaught
    KeyboardInterrupt (interrupted) a SIGINT, as python ends then. The teardown is skipped because it touches
    every object the child holds, and with them the server's, at a cost of 0.4 s a child (FREEZE);
    only a finaliser of an object still referenced at the end would have run in it (an unclosed file's buffer flushed
    at exit, say), and a script that needs one has a bug the forked run then shows."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    import ctypes
    ctypes.CDLL(None).fflush(None)  # what C code wrote through stdio (a Fortran or C library's prints), as exit(3) does
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


# ---- a script's own python children ----

_MESSAGE_BYTES = 1 << 20  # one request: argv, cwd and the environment as JSON


def _fork_children(sock: socket.socket) -> None:
    """The helper: still in the warm state the script started from, it forks one child per request that arrives with
    its stdout and stderr descriptors, and answers with the child's exit status; it ends when the script does."""
    while True:
        message, fds, _, _ = socket.recv_fds(sock, _MESSAGE_BYTES, 2)
        if not message:
            os._exit(0)
        gc.freeze()  # see FREEZE
        pid = os.fork()
        if pid == 0:
            sock.close()
            os.dup2(fds[0], 1)
            os.dup2(fds[1], 2)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            for fd in (*fds, devnull):
                os.close(fd)
            _become(json.loads(message))  # never returns
        for fd in fds:
            os.close(fd)
        _, status = os.waitpid(pid, 0)
        try:
            sock.send(str(os.waitstatus_to_exitcode(status)).encode())
        except OSError:  # the script has ended while its child ran
            os._exit(0)


def _forward_python_children(sock: socket.socket) -> None:
    """Patch subprocess.run in the script's process: a call that starts this python on a script, with its output in
    files or inherited and no timeout, input or capture, is sent to the helper; any other call runs as it would."""
    plain_run = subprocess.run
    lock = threading.Lock()

    def descriptor(stream, inherited: int) -> int | None:
        if stream is None:
            return inherited
        if isinstance(stream, int):
            return stream if stream >= 0 else None  # PIPE, DEVNULL and STDOUT are negative
        if hasattr(stream, "fileno"):
            return stream.fileno()  # not flushed first: subprocess does not flush it either
        return None

    def run(args, **kwargs):
        forwardable = (isinstance(args, (list, tuple)) and len(args) > 1 and str(args[0]) == sys.executable
                       and set(kwargs) <= {"cwd", "env", "stdout", "stderr", "check"})
        if forwardable:
            argv = [os.fspath(a) for a in args[1:]]
            env = dict(os.environ if kwargs.get("env") is None else kwargs["env"])
            out = descriptor(kwargs.get("stdout"), 1)
            err = out if kwargs.get("stderr") == subprocess.STDOUT else descriptor(kwargs.get("stderr"), 2)
            forwardable = None not in (out, err) and _forkable(argv, env)
        if not forwardable:
            return plain_run(args, **kwargs)
        request = dict(argv=argv, cwd=os.path.abspath(kwargs.get("cwd") or os.getcwd()), env=env)
        with lock:
            socket.send_fds(sock, [json.dumps(request).encode()], [out, err])
            returncode = int(sock.recv(64))
        if kwargs.get("check") and returncode != 0:
            raise subprocess.CalledProcessError(returncode, args)
        return subprocess.CompletedProcess(args, returncode)

    subprocess.run = run


# ---- the client (imported by the tests) ----

class _Server:
    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env={**os.environ, **SERVER_ENV}, text=True)

    def run(self, argv: list[str], cwd: str, env: dict, timeout: float | None,
            private_mounts: str | None) -> tuple[int, bool, str, str]:
        with tempfile.TemporaryDirectory() as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            out.touch()
            err.touch()
            self.proc.stdin.write(json.dumps(dict(argv=argv, cwd=cwd, env=env, stdout=str(out), stderr=str(err),
                                                  timeout=timeout, private_mounts=private_mounts)) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
            if not reply:
                raise RuntimeError(f"the test fork server (pid {self.proc.pid}) stopped")
            reply = json.loads(reply)
            decode = dict(encoding="utf-8", errors="backslashreplace")
            return reply["returncode"], reply["timed_out"], out.read_text(**decode), err.read_text(**decode)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


_idle: queue.SimpleQueue = queue.SimpleQueue()  # servers not running a request; one more starts when none is idle
_all: list[_Server] = []
_lock = threading.Lock()


@atexit.register
def _close_servers():
    for server in _all:
        server.close()


def _forkable(argv: list[str], env: dict) -> bool:
    """Whether a forked child can stand in for `python ARGV` in env: no interpreter flags, and the server's values of
    the load-time variables (in the server's children, os.environ already holds them)."""
    server_env = {**os.environ, **SERVER_ENV}
    load_time = {k for k in {*env, *server_env} if k.startswith(LOAD_TIME_PREFIXES)}
    return (bool(argv) and (argv[0] == "-m" or not argv[0].startswith("-"))
            and all(env.get(k) == server_env.get(k) for k in load_time))


def run_python(args, *, cwd, env: dict | None = None, timeout: float | None = None, check: bool = False,
               private_mounts: str | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    check=check)`, forked from a warm server when it can stand in for a fresh interpreter (the module's docstring).
    private_mounts: shell commands (mounts) to run first in a private mount namespace, as
    `unshare -rm sh -c 'PRIVATE_MOUNTS && exec python ARGS'` would."""
    argv = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    if not _forkable(argv, env):
        command = [sys.executable, *argv]
        if private_mounts:
            command = ["unshare", "-rm", "sh", "-c", private_mounts + ' && exec "$@"', "sh", *command]
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=check)
    try:
        server = _idle.get_nowait()
    except queue.Empty:
        server = _Server()
        with _lock:
            _all.append(server)
    returncode, timed_out, stdout, stderr = server.run(argv, str(cwd), env, timeout, private_mounts)
    _idle.put(server)
    if timed_out:
        raise subprocess.TimeoutExpired([sys.executable, *argv], timeout, stdout, stderr)
    if check and returncode != 0:
        raise subprocess.CalledProcessError(returncode, [sys.executable, *argv], stdout, stderr)
    return subprocess.CompletedProcess([sys.executable, *argv], returncode, stdout, stderr)


if __name__ == "__main__":
    _serve()
