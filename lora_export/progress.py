"""The one progress convention: a stage reports with ``progress(line)``; by default nothing is said.

Every stage that reports takes ``progress: Progress = quiet``; the CLI passes its console's line writer,
``isolate.run_in_child`` forwards a child's lines to the parent's.
"""

from __future__ import annotations

from typing import Callable

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    """The default progress: say nothing."""
