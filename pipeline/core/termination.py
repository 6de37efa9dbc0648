"""Stopping on SIGTERM and SIGHUP as cleanly as on Ctrl-C.

A plain ``kill``, ``docker stop`` or a closed terminal's SIGHUP ends a Python process at once by default:
no ``finally`` runs, so a local Label Studio that the command started (in its own session, so that Ctrl-C in
the terminal reaches only the tool) keeps running on its port. Inside :func:`graceful_termination` those
signals raise :class:`Terminated` in the main thread instead, a :class:`KeyboardInterrupt`, so every path that
already cleans up after Ctrl-C (servers stopped, temporary files removed, the one-line message) does the same
for them.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SIGINT already raises KeyboardInterrupt


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by ``signum``; raised where the main thread happens to be."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


@contextmanager
def graceful_termination() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Terminated` while inside; the previous handlers come back after.

    Only the main thread may install handlers; elsewhere (a server's worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
