"""Run one heavy stage in a fresh process, so that the process tree holds one big thing at a time.

``lora-export export`` and ``validate`` keep their own process light (no torch imported): the adapter
checks and the streaming merge, the reference, the other PyTorch models and the ONNX Runtime session each
run in a child that exits before the next starts, so no stage's memory (nor torch's own) is stacked on
the graph builder's or another stage's peak. The child is ``python -m lora_export.isolate``: the stage
and its arguments go in as a pickle on stdin, progress lines and the result (or the error, re-raised
here: ``BadInput`` stays ``BadInput``, with the child's traceback attached as a note for ``--debug``) come
back as pickles on a pipe of their own, so whatever libraries print keeps going to the terminal. The child
gets SIGKILL when this process dies (Linux), so a killed run leaves nothing running.

Written by hand rather than with ``multiprocessing``: its spawn start method adds a resource-tracker
process to the tree for the whole run, and its fork start method would copy this process's state.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import traceback
from typing import Any, Callable

from .errors import ToolchainFailed
from .progress import Progress, quiet


class StageCrashed(ToolchainFailed):
    """The child process died without a result (killed, out of memory, or a crash in native code)."""


# glibc raises its mmap threshold as large blocks are freed, so later temporaries of a few MB come from the
# heap and stay in RSS after they are freed; a fixed 1 MiB threshold returns them at once. Measured on the
# 135M shape: the graph builder's peak 1362 -> 1120 MB, a PyTorch decode stage's 1132 -> 1022 MB, same speed.
MMAP_THRESHOLD = str(1 << 20)


def lean_env() -> dict:
    """The environment for a child process: ours, with glibc's mmap threshold fixed unless the user set it."""
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)}


def run_in_child(fn: Callable[..., Any], *args, progress: Progress = quiet) -> Any:
    """``fn(*args, progress=...)`` in a fresh Python process; returns its result or raises its error.

    ``fn`` must be a module-level function; its arguments and result must pickle."""
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lora_export.isolate", str(write_fd)], stdin=subprocess.PIPE,
                                pass_fds=(write_fd,), preexec_fn=die_with_parent, env=lean_env())
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as messages:
        try:
            proc.stdin.write(pickle.dumps((fn, args)))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            while True:
                message = _receive(messages)
                if message is None:
                    proc.wait()
                    raise StageCrashed(f"the {fn.__name__} stage's process ended without a result (exit code "
                                       f"{proc.returncode}; a negative code is the signal that killed it, -9 often "
                                       "means out of memory)")
                kind, payload = message
                if kind == "progress":
                    progress(payload)
                elif kind == "error":
                    raise payload
                else:
                    return payload
        except BaseException:
            proc.kill()  # interrupted (a signal) or failed: the stage stops now, not when it would have finished
            raise
        finally:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _receive(stream):
    head = stream.read(8)
    if len(head) < 8:
        return None
    body = stream.read(struct.unpack("<Q", head)[0])
    return pickle.loads(body)


def serve(fd: int) -> None:
    """The child's side: run the stage read from stdin, report on ``fd``."""
    die_with_parent()
    with os.fdopen(fd, "wb") as out:
        def send(kind: str, payload) -> None:
            body = pickle.dumps((kind, payload))
            out.write(struct.pack("<Q", len(body)) + body)
            out.flush()

        try:
            fn, args = pickle.loads(sys.stdin.buffer.read())
            result = fn(*args, progress=lambda msg: send("progress", msg))
        except BaseException as e:  # everything goes back to the parent, which decides
            e.add_note(f"in a child process:\n{traceback.format_exc()}")
            try:
                send("error", e)
            except Exception:  # an exception that does not pickle: send its text
                send("error", StageCrashed(f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        else:
            send("result", result)


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed run leaves nothing writing on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    from lora_export import isolate  # the importable module's classes, not __main__'s

    isolate.serve(int(sys.argv[1]))
