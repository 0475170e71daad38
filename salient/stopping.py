"""SIGTERM, the way schedulers stop a process (Kubernetes stops a pod with it), turned into an
orderly stop of a run.

A handler that raises wherever the main thread happens to be can leave a lock held (the logging
module's, one of Prefect's) and hang the exit, and an exception raised in a fork hook while
``ray.init`` starts processes is ignored by Python. So the handler only notes the signal, and raises
:class:`Stopped` at once only while the main thread waits in an :func:`interruptible` block (waiting
for Ray's workers, for another run's lease); elsewhere the run's loops call :func:`check` between
items. Ray's ``wait`` turns the exception into ``SystemExit(1)`` on the way out: what counts is
:func:`received`, not the exception that ends the run."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

EXIT_CODE = 128 + signal.SIGTERM  # the shell's code for a process ended by SIGTERM
_received = threading.Event()
_waiting = 0  # interruptible blocks the main thread is in
_noting = 0  # noting_sigterm blocks the main thread is in


class Stopped(SystemExit):
    """A SIGTERM, raised in the main thread so that every ``with`` and ``finally`` on the way out
    (Ray's shutdown, the lease's release) runs. A SystemExit: no stage retry catches it, Ray's
    ``wait`` gives up waiting on it (on other exceptions it waits on), and a process that lets it
    through exits with 143."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE)


def received() -> bool:
    """Whether a SIGTERM arrived since the outermost :func:`noting_sigterm` block was entered."""
    return _received.is_set()


def check() -> None:
    """Raise :class:`Stopped` if a SIGTERM was noted."""
    if _received.is_set():
        raise Stopped()


def _note(signum: int, frame: FrameType | None) -> None:
    first = not _received.is_set()
    _received.set()
    if first and _waiting:  # a second SIGTERM must not cut the cleanup of the first short
        raise Stopped()


@contextmanager
def noting_sigterm() -> Iterator[None]:
    """While the block runs in the main thread, a SIGTERM is noted instead of handled by the
    handler in place (Prefect's, inside a flow). Blocks inside one another share one note (one noted
    before a flow started stays noted inside it); the outermost clears it on entry."""
    global _noting
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield
        return
    if not _noting:
        _received.clear()
    _noting += 1
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not _note:
        signal.signal(signal.SIGTERM, _note)
    try:
        yield
    finally:
        _noting -= 1
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interruptible() -> Iterator[None]:
    """A block of the main thread that only waits, where a SIGTERM may raise :class:`Stopped` at once."""
    global _waiting
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    check()
    _waiting += 1
    try:
        yield
    finally:
        _waiting -= 1
