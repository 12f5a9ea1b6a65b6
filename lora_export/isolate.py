"""Run one heavy stage in a fresh process, so that the process tree holds one big thing at a time.

``lora-export export`` keeps its own process light (no torch imported) until the graph is built: the
adapter checks and the streaming merge run in a spawned child that exits before the graph builder starts,
so the builder's peak is not stacked on top of torch, PEFT and the merge's memory. Progress lines come back
over a pipe; an error raised in the child is raised again here (``BadInput`` stays ``BadInput``), with the
child's traceback attached as a note for ``--debug``. The child gets SIGKILL when this process dies
(Linux), so a killed export leaves nothing running.
"""

from __future__ import annotations

import multiprocessing
import traceback
from typing import Any, Callable

from .errors import LoraExportError


class StageCrashed(LoraExportError):
    """The child process died without a result (killed, out of memory, or a crash in native code)."""


def run_in_child(fn: Callable[..., Any], *args, progress: Callable[[str], None] = lambda m: None) -> Any:
    """``fn(*args, progress=...)`` in a spawned process; returns its result or raises its error.

    ``fn`` must be a module-level function; its arguments and result must pickle."""
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args), daemon=True)
    proc.start()
    send.close()
    try:
        while True:
            try:
                kind, payload = receive.recv()
            except EOFError:
                proc.join()
                raise StageCrashed(f"the {fn.__name__} stage's process ended without a result (exit code "
                                   f"{proc.exitcode}; a negative code is the signal that killed it, -9 often "
                                   "means out of memory)") from None
            if kind == "progress":
                progress(payload)
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        receive.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()


def _child(send, fn, args) -> None:
    die_with_parent()
    try:
        result = fn(*args, progress=lambda msg: send.send(("progress", msg)))
    except BaseException as e:  # everything goes back to the parent, which decides
        e.add_note(f"in a child process:\n{traceback.format_exc()}")
        try:
            send.send(("error", e))
        except Exception:  # an exception that does not pickle: send its text
            send.send(("error", StageCrashed(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
    else:
        send.send(("result", result))
    finally:
        send.close()


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent dies, so a killed run leaves nothing writing on."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
