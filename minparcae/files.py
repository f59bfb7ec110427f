"""The files a run writes, kept whole through kills, crashes, full disks and a second process.

A run folder (train.py's --out) holds

    ckpt.npz    the checkpoint, replaced atomically (`atomic_write`)
    log.jsonl   one JSON record per optimiser step (`RunLog`)
    .lock       locked by the process training in the folder, and holding its pid (`RunFolder`)

and these rules keep them whole and in agreement:
  * One process per folder. The lock is an advisory `flock`, which the operating system releases
    when its holder dies, even by SIGKILL, so a killed run never leaves a stale lock behind; a
    second process exits at once with the holder's pid.
  * A temporary file carries its writer's pid (`.ckpt.npz.<pid>.tmp`) and is removed when the
    write fails in any way, Ctrl-C included; the next holder of the lock removes any that a
    SIGKILL left.
  * A step's log record is written before that step's checkpoint, and flushed to disk with it. So
    a kill between the two loses no record: a resumed run drops the records past its checkpoint's
    step, and the log always ends where the checkpoint does. A torn last line (a write cut short
    by a kill or a full disk) is dropped; damage anywhere else stops the resume with the log named.
  * Every operating-system error (a full disk, a read-only folder, a path under a file) becomes
    one sentence naming the path and the reason.
"""

import json
import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: msvcrt's byte-range lock, also released when the process dies
    fcntl = None
    import msvcrt


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as asked; the message says why and what to do."""


def describe_os_error(err, action="cannot use", path=None):
    """'<action> <path>: <reason>', e.g. 'cannot write runs/a/log.jsonl: No space left on device';
    `path` names the file when the error's own is a temporary one."""
    reason = err.strerror or str(err) or type(err).__name__
    path = path or err.filename
    where = f" {path}" if path else ""
    return f"{action}{where}: {reason}"


def temp_path(path):
    """The temporary name a write of `path` goes through: hidden, in the same folder (so the
    rename is atomic), and private to this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path, write):
    """Write a file whole or not at all: `write(tmp)` into `temp_path(path)`, then rename it over
    `path`. Readers see the old file or the new one, never a part; on any failure (an exception,
    Ctrl-C) the temporary file is removed. Returns what `write` returns."""
    tmp = temp_path(path)
    try:
        result = write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    return result


def durable_write(path, fill):
    """Write a binary file whole or not at all and on disk before it is visible: its folder is
    made if needed, `fill(f)` writes into the open temporary file, which is synced and renamed over
    `path` (atomic_write)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    atomic_write(path, write)


class RunPaths:
    """The paths of a run folder, without creating or locking it: what the ranks other than 0 of
    a data-parallel run use (rank 0 holds the RunFolder; the others only read its checkpoint)."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoint = self.path / "ckpt.npz"
        self.log = self.path / "log.jsonl"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class RunFolder:
    """A run folder, created if needed and locked for this process (use it as a context manager).

    Opening checks everything that later writes need: that the folder can be made, is a folder,
    and takes a new file; so a bad --out fails before any data is prepared."""

    def __init__(self, path):
        self.path = Path(path)
        self.checkpoint = self.path / "ckpt.npz"
        self.log = self.path / "log.jsonl"
        self._fd = None

    def __enter__(self):
        if self.path.is_file():
            raise RunFolderError(f"--out {self.path} is a file, not a folder: choose another --out.")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunFolderError(describe_os_error(err, "cannot create the run folder")
                                 + ": choose another --out.") from None
        lock = self.path / ".lock"
        try:
            self._fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            self._lock()
            os.ftruncate(self._fd, 0)
            os.write(self._fd, f"{os.getpid()}\n".encode())
            probe = temp_path(self.path / "write-check")
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            self.__exit__()
            raise RunFolderError(describe_os_error(err, "cannot write in the run folder")
                                 + ": choose another --out.") from None
        for stale in self.path.glob(".*.tmp"):  # left by a killed process; the lock is ours now
            stale.unlink(missing_ok=True)
        return self

    def _lock(self):
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            else:
                msvcrt.locking(self._fd, msvcrt.LK_NBLCK, 1)
        except (BlockingIOError, PermissionError):
            holder = os.read(self._fd, 32).decode(errors="replace").strip() or "unknown"
            self.__exit__()
            raise RunFolderError(f"run folder {self.path} is in use by another process (pid "
                                 f"{holder}): wait for it to finish, or choose another --out.") from None

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


class RunLog:
    """log.jsonl, opened fresh (`resume_step` None: any old content goes) or for a resumed run
    (records past `resume_step` dropped, a torn last line dropped)."""

    def __init__(self, path, resume_step=None):
        self.path = Path(path)
        try:
            if resume_step is None:
                self._file = open(self.path, "w")
            else:
                kept = _records_through(self.path, resume_step)
                atomic_write(self.path, lambda tmp: tmp.write_text("".join(kept)))
                self._file = open(self.path, "a")
        except OSError as err:
            raise RunFolderError(describe_os_error(err, "cannot write the log", self.path) + ".") from None

    def write(self, record):
        """Append one record and flush it to the operating system (which keeps it through a kill
        of this process)."""
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as err:
            raise RunFolderError(describe_os_error(err, "cannot write the log", self.path) + ".") from None

    def sync(self):
        """Flush the log to the disk itself (before a checkpoint, so both survive a power cut)."""
        try:
            os.fsync(self._file.fileno())
        except OSError as err:
            raise RunFolderError(describe_os_error(err, "cannot write the log", self.path) + ".") from None

    def close(self):
        try:
            self._file.close()
        except OSError:
            pass  # a failed flush was already reported by write()


def _records_through(path, step):
    """The lines of the log at `path` whose records have step <= `step`, each ending in a newline."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as err:
        reason = describe_os_error(err, "cannot read") if isinstance(err, OSError) else "not text"
        raise RunFolderError(f"the log {path} is unreadable ({reason}): move it away to resume "
                             "with a fresh log.") from None
    kept = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            past = record["step"] > step
        except (ValueError, TypeError, KeyError):
            if n == len(lines):
                break  # a torn last line: the write that a kill or a full disk cut short
            raise RunFolderError(f"line {n} of the log {path} is not a step record: move the log "
                                 "away to resume with a fresh one.") from None
        if not past:
            kept.append(line + "\n")
    return kept
