"""What every fault scenario shares: its result record and small process/port helpers.

A scenario injects faults into the real tool (a local Label Studio, the real backend, the real stages), lets
the tool recover (or stop with its one-line error) and checks that nothing was lost or duplicated. Each one
stops by itself (bounded loops and timeouts) and touches only 127.0.0.1. ``benchmarks/faults.py`` runs them
all and writes the JSON; the fast ones also run as tests (``tests/test_faults.py``).
"""

from __future__ import annotations

import socket
from dataclasses import asdict, dataclass, field


@dataclass
class ScenarioResult:
    """One scenario's outcome; the suite's goal is ``survived == injected`` and every loss counter 0."""

    name: str
    faults_injected: int = 0
    faults_survived: int = 0
    annotations_lost: int = 0
    duplicate_tasks: int = 0
    backend_5xx: int = 0
    detail: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return (self.faults_survived == self.faults_injected and self.annotations_lost == 0
                and self.duplicate_tasks == 0 and self.backend_5xx == 0)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (a stopped server released it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True
