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


def output_problem(out: Path) -> Problem | None:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return Problem(str(out), "output directory exists and is not empty",
                       "choose a new --out directory, or remove this one")
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
def staged(out: Path):
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block completes.

    A failure never leaves anything at ``out``: the sibling is removed on any exception, and one left by a
    killed run is swept by the next run.
    """
    out = Path(out)
    sweep_stale(out)
    with scratch(out, "partial") as tmp:
        yield tmp
        if out.exists():
            out.rmdir()  # checked empty before the work started
        tmp.rename(out)


def check_free_disk(out: Path, need: int, what: str) -> None:
    """Refuse up front when the filesystem that will hold ``out`` has less than ``need`` bytes free."""
    probe = Path(out).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise BadInput.one(str(out), f"{free / 1e9:.2f} GB free on its disk; {what} needs about {need / 1e9:.2f} GB",
                           "free disk space, or write --out on a disk with room")
