"""Output directories: refuse to overwrite, and write through a temporary sibling renamed when complete."""

from __future__ import annotations

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


@contextmanager
def staged(out: Path):
    """Yield a temporary sibling of ``out``; rename it to ``out`` only if the block completes.

    A failure (or a kill) never leaves anything at ``out``; the hidden ``.NAME.partial-*`` sibling is
    removed on any exception.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # checked empty before the work started
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
