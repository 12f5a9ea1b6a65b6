"""What the terminal shows, and the log file that keeps everything else.

By default the terminal gets one line per stage, with the time since the command started, and the
command's result; everything the libraries print (their warnings, INFO logs, progress bars, the output of
our child processes and of the graph builder) goes to a log file, and ``-v`` shows it live as well. The
redirection is done on file descriptors 1 and 2, so it also catches native code and child processes,
which inherit them; this is written by hand because no library does that for a whole process tree
(``contextlib.redirect_stdout`` only swaps the Python object).
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# Libraries' own progress bars and advisory noise off: the log is read as text, and our stage lines say
# what is running. Children inherit these through the environment.
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
             "TQDM_DISABLE": "1"}


@dataclass
class Console:
    """Stage lines and results for the terminal; details for the log (and the terminal with ``verbose``)."""

    out: TextIO = field(default_factory=lambda: sys.stdout)  # results: the final table, paths
    err: TextIO = field(default_factory=lambda: sys.stderr)  # stage lines and error messages
    log: TextIO | None = None
    verbose: bool = False
    quiet: bool = False  # stage lines and results to the log only (a process other than torchrun's rank 0)
    start: float = field(default_factory=time.monotonic)

    def _stamp(self, msg: str) -> str:
        elapsed = int(time.monotonic() - self.start)
        return f"[{elapsed // 60}:{elapsed % 60:02d}] {msg}"

    def _to_log(self, line: str) -> None:
        if self.log is not None:
            self.log.write(line + "\n")
            self.log.flush()

    def stage(self, msg: str) -> None:
        line = self._stamp(msg)
        if not self.quiet:
            print(line, file=self.err, flush=True)
        self._to_log(line)

    def detail(self, msg: str) -> None:
        line = self._stamp("  " + msg)
        if self.verbose:
            print(line, file=self.err, flush=True)
        self._to_log(line)

    def progress(self, msg: str) -> None:
        """The one progress callback the library gets: an indented message is a detail, else a stage."""
        (self.detail if msg[:1].isspace() else self.stage)(msg.strip())

    def result(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.out, flush=True)
        self._to_log(text)

    def error(self, text: str) -> None:
        print(text, file=self.err, flush=True)
        self._to_log(text)

    @property
    def interactive(self) -> bool:
        if self.quiet:
            return False
        try:
            return self.err.isatty()
        except (AttributeError, ValueError):
            return False


def _private_copy(stream: TextIO, fd: int) -> TextIO:
    """A stream that keeps writing where ``stream`` writes now, after fd ``fd`` is redirected."""
    try:
        if stream.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                             errors="replace")
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        pass
    return stream  # not a file descriptor (pytest's capture, a StringIO): unaffected by the redirection


@contextmanager
def captured(log_path: Path, verbose: bool = False, quiet: bool = False):
    """Send fds 1 and 2 (this process, its libraries and its children) to ``log_path``; yield a Console that
    writes stage lines and results to the terminal as it was. With ``verbose`` the log is also shown live; with
    ``quiet`` stage lines and results go to the log only (errors still reach the terminal)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    out, err = _private_copy(sys.stdout, 1), _private_copy(sys.stderr, 2)
    log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr
    tee = None
    if verbose:  # a pipe read by a thread that writes each chunk to the log and to the terminal
        read_fd, write_fd = os.pipe()
        # the thread owns its own copies of both descriptors: if a straggling grandchild keeps the pipe open
        # past the join below, it goes on writing to the same files, never to a reused descriptor number
        tee = threading.Thread(target=_tee, args=(read_fd, os.dup(log.fileno()), os.dup(saved[1])), daemon=True)
        tee.start()
        target = write_fd
    else:
        target = log.fileno()
    os.dup2(target, 1)
    os.dup2(target, 2)
    if verbose:
        os.close(write_fd)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
    console = Console(out=out, err=err, log=log, verbose=verbose, quiet=quiet)
    try:
        yield console
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        sys.stdout, sys.stderr = saved_streams
        if tee is not None:
            tee.join(timeout=5)  # the pipe's last writer is gone: the thread reads to its end and stops
        log.close()
        for stream in (out, err):
            if stream not in saved_streams:  # our private copies of the terminal's descriptors
                stream.close()


def _tee(read_fd: int, *fds: int) -> None:
    with os.fdopen(read_fd, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            for fd in fds:
                try:
                    os.write(fd, chunk)
                except OSError:
                    pass
    for fd in fds:
        os.close(fd)
