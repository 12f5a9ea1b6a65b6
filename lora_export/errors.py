"""One exception family. Every error says what went wrong, where, and how to fix it.

Library code raises these; only ``cli.py`` turns them into exit codes: 2 for ``BadInput`` (the user's input
cannot be used), 3 for ``ToolchainFailed`` (a library or tool we drive failed: the graph builder, the ONNX
exporter, ONNX Runtime, a child process that died) and for any exception that is not ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Problem:
    """One thing wrong with one input: where it is, what is wrong, and what to do about it."""

    where: str
    what: str
    fix: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}. Fix: {self.fix}"


class LoraExportError(Exception):
    """Base of every error this package raises on purpose."""


@dataclass
class BadInput(LoraExportError):
    """The user's input cannot be used. Holds every problem found, so the user fixes them in one pass."""

    problems: list[Problem] = field(default_factory=list)

    @classmethod
    def one(cls, where: str, what: str, fix: str) -> "BadInput":
        return cls([Problem(str(where), what, fix)])

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems:"] + [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class UnreadableModel(BadInput):
    """An ONNX model that cannot be read or loaded: the user's fault when they hand it to validate or bench
    (exit 2), the toolchain's when our own build just wrote it (export turns it into ToolchainFailed)."""


class ToolchainFailed(LoraExportError):
    """A tool we drive failed on input we had accepted: not the user's fault, so not exit 2."""


class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every temporary folder is removed on the way out."""


def raise_if(problems: list[Problem]) -> None:
    """Raise one BadInput listing every collected problem, if there are any."""
    if problems:
        raise BadInput(problems)
