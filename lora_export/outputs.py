"""Output directories: refuse to overwrite, and write through a temporary sibling renamed when complete.

Temporary siblings are named ``.NAME.partial-PID-*`` (and ``.NAME.merged-PID-*``); one whose process is
gone (a killed run) is removed by the next run that writes NAME, so a kill leaves nothing behind for long
and nothing at NAME itself.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BadInput, Problem


NAME_MAX = 255  # bytes in one file name on Linux file systems
_SIBLING = ".{name}.partial-{pid}-xxxxxxxx"  # the longest temporary sibling name we create


def output_problem(out: Path) -> Problem | None:
    """Why ``out`` cannot be a new output directory, checked before any work: its name is too long for a
    temporary sibling, it is a symbolic link, it exists and is not an empty directory, or its folder is not
    writable."""
    out = Path(out)
    longest = len(_SIBLING.format(name=out.name, pid=os.getpid()).encode())
    if longest > NAME_MAX:  # checked first: the file system refuses even to look up a name past its limit
        return Problem(str(out)[:120] + ("..." if len(str(out)) > 120 else ""),
                       f"the name is {len(out.name.encode())} bytes; with the temporary sibling's prefix and suffix "
                       f"it passes the file system's {NAME_MAX}-byte limit",
                       f"use a name of at most {max(NAME_MAX - longest + len(out.name.encode()), 1)} bytes")
    try:
        if out.is_symlink():
            return Problem(str(out), "is a symbolic link; an output is written beside it and renamed into place, "
                           "which would replace the link", "pass the real directory path (or a new one) as --out")
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            return Problem(str(out), "output directory exists and is not empty",
                           "choose a new --out directory, or remove this one")
        folder = out.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    except OSError as e:  # a component too long, a loop of links, no permission to look
        return Problem(str(out), f"cannot be used as an output path ({e.strerror or e})", "choose another --out")
    if not folder.is_dir():
        return Problem(str(out), f"{folder} is not a directory", "choose --out inside a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        return Problem(str(out), f"its folder {folder} is not writable", "choose --out in a folder you can write")
    return None


def check_new_output(out: Path) -> None:
    problem = output_problem(out)
    if problem:
        raise BadInput([problem])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove temporary siblings of ``out`` left by runs that were killed. Returns what it removed."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*"):
        parts = p.name[len(out.name) + 2:].split("-")
        if len(parts) >= 2 and parts[0] in ("partial", "merged") and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def scratch(out: Path, tag: str):
    """A temporary sibling of ``out`` for intermediate files, removed afterwards whatever happens."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def claimed(out: Path):
    """Hold an exclusive lock on ``.NAME.lock`` beside ``out`` while writing ``out``: a second run for the same
    output is refused at once instead of failing after all its work. The kernel releases the lock when its
    process dies, however it dies, so a lock file left by a killed run is simply locked again."""
    import fcntl

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise BadInput.one(str(out), f"another lora-export (pid {holder}) is writing this output now",
                               "wait for it to finish, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and our lock: lock the new one
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still locked: a waiting run then locks a fresh file
        os.close(fd)


@contextmanager
def staged(out: Path):
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block completes.

    A failure never leaves anything at ``out``: the sibling is removed on any exception, and one left by a
    killed run is swept by the next run. The output is claimed (``claimed``) for the whole block.
    """
    out = Path(out)
    with claimed(out):
        sweep_stale(out)
        with scratch(out, "partial") as tmp:
            yield tmp
            try:
                if out.exists():
                    out.rmdir()  # checked empty before the work started
                tmp.rename(out)
            except OSError as e:
                raise BadInput.one(str(out), f"something else wrote here while this run worked ({e.strerror})",
                                   "choose a new --out; this run's output was removed") from e


def sweep_temp(prefix: str) -> list[Path]:
    """Remove ``{tmp}/{prefix}{pid}-*`` folders of processes that are gone (a killed validate's merge)."""
    removed = []
    for p in Path(tempfile.gettempdir()).glob(f"{prefix}*-*"):
        pid = p.name[len(prefix):].split("-")[0]
        if p.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def check_free_disk(out: Path, need: int, what: str) -> None:
    """Refuse up front when the filesystem that will hold ``out`` has less than ``need`` bytes free."""
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise BadInput.one(str(out), f"{free / 1e9:.2f} GB free on its disk; {what} needs about {need / 1e9:.2f} GB",
                           "free disk space, or write --out on a disk with room")
