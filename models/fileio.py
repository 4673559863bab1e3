"""Files: atomic writes, downloads, exclusive locks, writable-directory checks.

Everything a script writes that a later step reads (checkpoints, caches, samples, labels) goes through
`atomic_write`: the data goes to a temporary file in the same directory, is flushed to disk, and is
renamed over the target. A crash (kill -9, power loss, full disk) leaves the old file or the new one,
never half of one; temporary files left by a killed writer are named `<target>.<random>.tmp`.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np


_UMASK = os.umask(0o022)
os.umask(_UMASK)


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, the record and the problem."""


def finite_number(text: str, what: str, where: str) -> float:
    """float(text); DataError naming where and what when the text is not a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} is {text!r}, not a finite number")
    return value


class DiskFull(OSError):
    """The device ran out of space (or quota) while writing; the message names the file."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """write(tmp_path), fsync, then rename over path: a crash leaves the old file or the new one, never half.

    A full disk raises DiskFull naming `path`; the old file is untouched and the temporary file removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # what open() would have given, not mkstemp's owner-only 0600
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except Exception as e:
        # Libraries report a full disk in their own words (torch.save: "unexpected pos"), so ask the device too.
        if is_disk_full(e) or shutil.disk_usage(path.parent).free < (1 << 20):
            raise DiskFull(errno.ENOSPC, f"no space left on the device while writing {path} "
                                         f"(the previous version of that file, if any, is unchanged)") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC / EDQUOT, also when a library (h5py, torch) wrapped it in another exception's text."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e).lower()
    return "no space left" in text or "disk quota" in text


def require_free_space(path: Path, nbytes: int) -> None:
    """Raise DiskFull naming `path` unless its directory's device has nbytes free. For writers that cannot fail
    cleanly in the middle (HDF5: a write that hits a full disk can crash the process when the library exits)."""
    free = shutil.disk_usage(Path(path).parent).free
    if free < nbytes:
        raise DiskFull(errno.ENOSPC, f"no space left on the device for {path}: {free / 2**20:.1f} MiB free, about "
                                     f"{nbytes / 2**20:.1f} MiB needed (nothing was changed)")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete `<path>.*.tmp` files left by an atomic_write that was killed; call only while no other
    process writes `path` (under its lock, or from the only process that writes it)."""
    path = Path(path)
    stale = [p for p in path.parent.glob(path.name + ".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_npz(path: Path, arrays: dict) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
            np.savez(f, **arrays)

    atomic_write(path, write)


def set_aside(path: Path, why: str) -> Path:
    """Rename a damaged file to <name>.damaged (or .damaged.2, .damaged.3, ...: an earlier one is kept too) and return
    the new path: never deleted, since it may still hold work that can be recovered by hand. A DataError naming the
    file and `why` it is damaged when it cannot be renamed (a read-only directory)."""
    path = Path(path)
    n = 1
    while (target := path.with_name(f"{path.name}.damaged" + (f".{n}" if n > 1 else ""))).exists():
        n += 1
    try:
        os.rename(path, target)
    except OSError as e:
        raise DataError(f"{path} is damaged ({why}) and cannot be set aside as {target.name} ({e.strerror or e}): "
                        f"move it away, or make {path.parent} writable, and run again") from None
    return target


def read_npz_cache(path: Path, fields: tuple[str, ...], log) -> dict | None:
    """The arrays `fields` of the .npz cache at path, or None when there is none. A damaged cache (not a readable
    .npz, or without one of the fields) is set aside (set_aside) with a warning on `log`, and None is returned,
    so that the caller rebuilds it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in fields}
    except Exception as e:  # a truncated zip, garbage, a missing field, a directory: all mean "rebuild"
        why = f"{type(e).__name__}: {e}"
        moved = set_aside(path, why)
        log.warning(f"warning: {path} is damaged ({why}); set aside as {moved.name}, and rebuilt")
        return None


def git_blob_sha1(path: Path) -> str:
    """The SHA-1 git gives a file's content (its blob id): a checksum that a repository's tree lists for every
    file, so a download from a pinned commit can be verified against that commit's listing."""
    h = hashlib.sha1(b"blob %d\0" % Path(path).stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, blob_sha1: str | None = None) -> Path:
    """Download url to dest atomically, with a progress bar. With blob_sha1, a download whose git blob id
    differs raises OSError naming url and both ids, and nothing is written."""
    from tqdm import tqdm

    def write(tmp):
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if blob_sha1 is not None and (got := git_blob_sha1(tmp)) != blob_sha1:
            raise OSError(f"{url}: downloaded content has git blob id {got}, expected {blob_sha1} (changed upstream or "
                          f"damaged in transit); {dest} not written")

    atomic_write(dest, write)
    return dest


class Busy(RuntimeError):
    """Another process holds the lock; the message names it."""


class ExclusiveLock:
    """An exclusive lock on `<target>.lock`, held until release() or process exit: refused at once (Busy) when
    another process holds it, or with wait, waited for (on_wait(holder) is called first).

    The kernel drops a flock when its process dies, so a writer killed with -9 leaves no stale lock. The
    lock file records who holds it (pid, host, command, start time), so a refused second writer is told."""

    def __init__(self, target: Path, what: str | None = None, wait: bool = False, on_wait=None):
        """what: how the refusal names the target (default: its path)."""
        self.target, self.what = Path(target), what
        self.path = self.target.with_name(self.target.name + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            if not wait:
                os.close(self.fd)
                raise Busy(f"{self.what or self.target} is being written by another process ({holder}); wait for it to "
                           f"finish, or write elsewhere") from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())

    def _holder(self) -> str:
        try:
            info = json.loads(os.pread(self.fd, 4096, 0).decode() or "{}")
            return f"pid {info['pid']} on {info['host']} since {info['since']}: {info['command']}"
        except (ValueError, KeyError, OSError):
            return f"see {self.path}"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def check_writable_dir(path: Path, what: str) -> Path:
    """Create directory `path` if needed and prove that files can be created in it, before hours of work.
    Raises PermissionError / NotADirectoryError with a message naming the directory and `what` needs it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{what} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test.")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path} is not writable ({e.strerror or e}); "
                              f"make it writable or choose another directory") from None
    return path
