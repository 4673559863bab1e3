"""Per-structure work with a time limit, on worker processes that can be stopped.

Some structures make a library run without end: CrystalNN on a cell 1e-4 A thin puts millions of periodic images
in its cutoff sphere and hands them to qhull, and CHGNet builds a graph of as many edges. Such a call sits in C
code, where no Python signal handler runs, so the only sure bound is to kill the process that computes it.
`bounded_imap` runs fn on each item in forked worker processes, one item at a time each; a worker past `seconds`
on one item is killed and replaced, and that item comes back as Stopped("over the time limit"). A worker that dies
(a segfault in qhull, the kernel's out-of-memory killer) fails only its own item, where multiprocessing.Pool would
wait for that item for ever.

`time_limit` bounds Python code inside one process (SIGALRM), for loops over many small steps that are each safe
to interrupt, such as the pairs StructureMatcher compares within one group.
"""
from __future__ import annotations

import os
import signal
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Stopped:
    """What bounded_imap gives for an item whose work did not finish; reason says why."""

    reason: str


OVER_TIME = "over the time limit"


def count_stopped(outcomes) -> dict[str, int]:
    """{reason: count} of the Stopped among outcomes."""
    from collections import Counter

    return dict(Counter(o.reason for o in outcomes if isinstance(o, Stopped)))


def describe(reasons: dict[str, int], seconds: float | None) -> str:
    """{reason: count} in words: '2 over the time limit of 600 s per structure (--structure-timeout), 1 not well
    formed'."""
    return ", ".join(f"{n} {why}" + (f" of {seconds:g} s per structure (--structure-timeout)" if why == OVER_TIME else "")
                     for why, n in reasons.items())


class TimeLimit(Exception):
    """Raised inside `time_limit` when its seconds are spent."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise TimeLimit in the block once `seconds` of wall time have passed (None: no limit). The main thread of a
    process only; the caller's SIGALRM handler and timer are restored after the block."""
    if seconds is None:
        yield
        return

    def expire(signum, frame):
        raise TimeLimit(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies, so that a killed evaluate.py leaves no worker
    computing on (elsewhere a worker ends when it next reads its closed pipe)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(fn, conn, parent: int) -> None:
    _die_with_parent()
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the workers itself
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        index, item = job
        try:
            conn.send((index, fn(item)))
        except Exception:  # a bug in fn: the parent raises it with this traceback
            conn.send((index, _Failed(traceback.format_exc())))


@dataclass(frozen=True)
class _Failed:
    traceback: str


class _Worker:
    def __init__(self, ctx, fn):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(fn, child, os.getpid()), daemon=True)
        self.proc.start()
        child.close()  # the parent keeps no copy, so the worker's death reads as EOF here
        self.index, self.since = None, 0.0

    def give(self, index: int, item) -> None:
        self.index, self.since = index, time.monotonic()
        self.conn.send((index, item))

    def outcome(self, ready: list, seconds: float | None):
        """(index, value or Stopped) once this worker's item is done, stopped or dead; None while it runs."""
        if self.conn in ready:
            try:
                return self.conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                code = self.proc.exitcode
                how = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
                return self.index, Stopped(f"its process died ({how})")
        if seconds is not None and time.monotonic() - self.since >= seconds:
            return self.index, Stopped(OVER_TIME)
        return None

    def stop(self, kill: bool = False) -> None:
        if not kill:
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


def bounded_imap(fn, items: list, workers: int | None = None, seconds: float | None = None, progress: bool = False,
                 desc: str = "", unit: str = " items"):
    """Yields (index, fn(items[index])) as each item finishes, in any order, computed on `workers` forked processes
    (default: every core; the items and fn's results go through pipes, so they must pickle). An item that runs past
    `seconds` (None: no limit) comes as (index, Stopped(OVER_TIME)), and its worker is killed and replaced; one
    whose worker dies, as (index, Stopped("its process died (...)")). An exception that fn raises is a bug: it is
    raised here as a RuntimeError carrying the worker's traceback."""
    import multiprocessing
    from multiprocessing.connection import wait

    from tqdm import tqdm

    if not items:
        return
    ctx = multiprocessing.get_context("fork")
    pending = list(range(len(items)))[::-1]  # popped from the end: items go out in order
    pool = []
    bar = tqdm(total=len(items), desc=desc, unit=unit, disable=not progress, mininterval=1)

    def give(worker) -> None:
        i = pending.pop()
        worker.give(i, items[i])

    try:
        for _ in range(min(workers or os.cpu_count() or 1, len(items))):
            pool.append(_Worker(ctx, fn))
            give(pool[-1])
        while pool:
            timeout = None if seconds is None else max(0.0, min(w.since for w in pool) + seconds - time.monotonic())
            ready = wait([w.conn for w in pool], timeout)
            for worker in list(pool):
                outcome = worker.outcome(ready, seconds)
                if outcome is None:
                    continue
                if isinstance(outcome[1], _Failed):
                    raise RuntimeError(f"{desc or fn.__name__}: item {outcome[0]} failed in its worker:\n"
                                       f"{outcome[1].traceback}")
                if isinstance(outcome[1], Stopped):
                    worker.stop(kill=True)
                    pool.remove(worker)
                    if pending:
                        pool.append(worker := _Worker(ctx, fn))
                elif not pending:
                    worker.stop()
                    pool.remove(worker)
                if pending:
                    give(worker)
                bar.update(1)
                yield outcome
    finally:
        bar.close()
        for worker in pool:
            worker.stop(kill=True)


def bounded_map(fn, items: list, workers: int | None = None, seconds: float | None = None, progress: bool = False,
                desc: str = "", unit: str = " items") -> list:
    """bounded_imap's outcomes in the order of the items."""
    out = [None] * len(items)
    for index, value in bounded_imap(fn, items, workers, seconds, progress, desc, unit):
        out[index] = value
    return out
